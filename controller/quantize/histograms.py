"""ORT's percentile calibration, the same ranges in a fraction of the memory.

ONNX Runtime's percentile calibrator (``HistogramCalibrater.collect_data``, then
``HistogramCollector.collect_absolute_value``) keeps every output of every calibrated tensor for the
whole calibration sample, then per tensor stacks the batches into one array, flattens it (a second
copy) and takes its absolute values (a third), before ``np.histogram`` with 2048 bins over the range
of those absolute values. On EfficientNet-Lite1 and 50 images that holds 4.8 GB, and faulting it in
and copying it was about half of the calibration's 20–25 s (8–13 s of system time), on the recipe
gate's critical path.

:func:`collect_data` streams instead, in two passes over the sample: the first keeps per tensor the
minimum and maximum of the values and of their absolute values, the second adds up each batch's
histogram over that common range (the absolute values in one reused buffer). A histogram with uniform
bins counts each value on its own (its bin depends only on the value and the range), so the sum is
ORT's histogram exactly, and the minima, maxima and edges are the same numpy values; the price is a
second inference pass. Checked in the suite against ORT's own methods (``tests/quantize/test_histograms.py``)
and on Lite1 (125 tensors: every range identical).

Only what ORT's first collection of a symmetric percentile calibration does is replaced (float32
outputs of one shape per tensor, no NaN); anything else (a second collection merging into existing
histograms, other methods, other dtypes, shapes that change between batches, NaN) goes to ORT's
method unchanged, on the same batches, and fails there as it would. :func:`install` puts it in place.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
from onnxruntime.quantization.calibrate import CalibrationDataReader, HistogramCollector, PercentileCalibrater

__all__ = ["collect_data", "install"]

log = logging.getLogger(__name__)

_ORT_COLLECT_DATA = PercentileCalibrater.collect_data
_lock = threading.Lock()


class _Replay(CalibrationDataReader):
    """The batches already read, for ORT's own method."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


class _Stop(Exception):
    """An output this module does not handle: ORT's method takes over."""


class _Tensor:
    """One calibrated tensor's running statistics."""

    def __init__(self, first: np.ndarray) -> None:
        self.shape = first.shape
        self.low: Any = None
        self.high: Any = None
        self.abs_low: Any = None
        self.abs_high: Any = None
        self.hist: np.ndarray | None = None
        self.edges = np.empty(0, dtype=np.float32)

    def check(self, out: np.ndarray) -> None:
        if out.dtype != np.float32 or out.size == 0 or out.shape != self.shape:
            raise _Stop


def _magnitude(out: np.ndarray, scratch: list[np.ndarray]) -> np.ndarray:
    if scratch[0].size < out.size:
        scratch[0] = np.empty(out.size, dtype=np.float32)
    return np.absolute(out.reshape(-1), out=scratch[0][: out.size])


def collect_data(self: PercentileCalibrater, data_reader: CalibrationDataReader) -> None:
    """``PercentileCalibrater.collect_data`` (symmetric) with the same histograms, streamed in two passes."""
    if self.collector is not None or self.method != "percentile" or not self.symmetric:
        _ORT_COLLECT_DATA(self, data_reader)
        return
    batches: list[dict[str, np.ndarray]] = []
    while inputs := data_reader.get_next():
        batches.append(inputs)
    try:
        tensors = _histograms(self, batches)
    except _Stop:
        _ORT_COLLECT_DATA(self, _Replay(batches))
        return
    collector = HistogramCollector(
        method=self.method,
        symmetric=self.symmetric,
        num_bins=self.num_bins,
        num_quantized_bins=self.num_quantized_bins,
        percentile=self.percentile,
        scenario=self.scenario,
    )
    for name, t in tensors.items():
        collector.histogram_dict[name] = (t.hist, t.edges.astype(np.float32), t.low, t.high)
    self.collector = collector
    self.clear_collected_data()


def _histograms(self: PercentileCalibrater, batches: list[dict[str, np.ndarray]]) -> dict[str, _Tensor]:
    if not batches:
        raise _Stop  # ORT's "No data is collected."
    names = [o.name for o in self.infer_session.get_outputs()]
    wanted = [(i, name) for i, name in enumerate(names) if name in self.tensors_to_calibrate]
    tensors: dict[str, _Tensor] = {}
    scratch = [np.empty(0, dtype=np.float32)]
    for inputs in batches:  # pass 1: the ranges
        outputs = self.infer_session.run(None, inputs)
        for i, name in wanted:
            out = outputs[i]
            t = tensors.setdefault(name, _Tensor(out))
            t.check(out)
            low, high = out.min(), out.max()
            magnitude = _magnitude(out, scratch)
            abs_low, abs_high = magnitude.min(), magnitude.max()
            if t.low is None:
                t.low, t.high, t.abs_low, t.abs_high = low, high, abs_low, abs_high
            else:
                t.low, t.high = np.minimum(t.low, low), np.maximum(t.high, high)  # NaN stays
                t.abs_low, t.abs_high = np.minimum(t.abs_low, abs_low), np.maximum(t.abs_high, abs_high)
    if any(np.isnan(t.low) or np.isnan(t.high) for t in tensors.values()):
        raise _Stop  # ORT ignores NaN in the minimum and maximum, then fails in np.histogram
    for inputs in batches:  # pass 2: the histograms over each tensor's whole range
        outputs = self.infer_session.run(None, inputs)
        for i, name in wanted:
            t = tensors[name]
            counts, t.edges = np.histogram(
                _magnitude(outputs[i], scratch), bins=self.num_bins, range=(t.abs_low, t.abs_high)
            )
            t.hist = counts if t.hist is None else t.hist + counts
    return tensors


def install() -> None:
    """Use :func:`collect_data` for ORT's percentile calibrations in this process (idempotent)."""
    with _lock:
        if PercentileCalibrater.collect_data is not collect_data:
            PercentileCalibrater.collect_data = collect_data
            log.debug("ORT's percentile calibration streamed in two passes")
