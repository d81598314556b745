"""The percentile calibration's histograms without ORT's copies are ORT's histograms (controller/histograms.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnxruntime.quantization.calibrate import HistogramCollector
from onnx_models import qdq_zoo

from tuneqn.controller import histograms
from tuneqn.controller.quantize import QuantSettings, calibrate


def _collector() -> HistogramCollector:
    return HistogramCollector(method="percentile", symmetric=True, num_bins=2048, num_quantized_bins=128,
                              percentile=99.999, scenario="same")


def _batches(rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    f32 = np.float32
    return {
        "wide": [rng.normal(0, 3, (2, 4, 9, 9)).astype(f32) for _ in range(5)],
        "relu": [np.maximum(rng.normal(0, 1, (1, 7, 5)), 0).astype(f32) for _ in range(3)],
        "negative": [-np.abs(rng.normal(2, 1, (4, 33))).astype(f32) for _ in range(2)],
        "constant": [np.full((2, 3), 1.5, f32) for _ in range(4)],
        "zeros": [np.zeros((3, 2), f32)],
        "one batch": [rng.standard_cauchy((6, 100_000)).astype(f32)],  # more than one of np.histogram's blocks
    }


def _assert_same(lean: HistogramCollector, ort: HistogramCollector) -> None:
    assert lean.histogram_dict.keys() == ort.histogram_dict.keys()
    for name, (hist, edges, low, high) in ort.histogram_dict.items():
        l_hist, l_edges, l_low, l_high = lean.histogram_dict[name]
        assert np.array_equal(l_hist, hist) and l_hist.dtype == hist.dtype, name
        assert np.array_equal(l_edges, edges) and l_edges.dtype == edges.dtype, name
        assert (l_low, l_high) == (low, high) and np.asarray(l_low).dtype == np.asarray(low).dtype, name
    assert lean.compute_collection_result() == ort.compute_collection_result()


def test_the_histograms_are_orts_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    data = _batches(rng)
    untouched = {k: [b.copy() for b in v] for k, v in data.items()}
    lean, ort = _collector(), _collector()
    histograms.collect_absolute_value(lean, data)
    histograms._ORT_METHOD(ort, untouched)
    _assert_same(lean, ort)
    for name, batches in data.items():  # the calibrator's outputs are read, never changed
        assert all(np.array_equal(a, b) for a, b in zip(batches, untouched[name], strict=True)), name


def test_what_it_does_not_cover_goes_to_orts_method() -> None:
    """A second collection merges into the first's histograms (ORT's rebinning); batches of different shapes and
    NaN fail as in ORT."""
    rng = np.random.default_rng(1)
    first = {"t": [rng.normal(0, 1, (2, 8)).astype(np.float32)]}
    second = {"t": [rng.normal(0, 4, (2, 8)).astype(np.float32)],
              "new": [rng.normal(0, 1, (3, 5)).astype(np.float32)]}
    lean, ort = _collector(), _collector()
    for batch in (first, second):
        histograms.collect_absolute_value(lean, {k: [b.copy() for b in v] for k, v in batch.items()})
        histograms._ORT_METHOD(ort, {k: [b.copy() for b in v] for k, v in batch.items()})
    _assert_same(lean, ort)
    for bad in ({"uneven": [np.ones((1, 3), np.float32), np.ones((2, 3), np.float32)]},
                {"nan": [np.array([[1.0, np.nan]], np.float32)]}):
        with pytest.raises(ValueError) as ours:
            histograms.collect_absolute_value(_collector(), bad)
        with pytest.raises(ValueError) as theirs:
            histograms._ORT_METHOD(_collector(), bad)
        assert str(ours.value) == str(theirs.value)


def test_a_percentile_calibration_gives_orts_ranges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole calibration (quantize_static's calibrator on a model with every op kind): the same cache content
    with ORT's own method as with this one."""
    model = qdq_zoo(tmp_path / "zoo.onnx")
    data = np.random.default_rng(2).normal(0.5, 0.3, (12, 3, 16, 16)).astype(np.float32)
    settings = QuantSettings(mode="per-tensor-percentile", format="qdq", per_channel=False, reduce_range=False,
                             activation_type="uint8", weight_type="int8", calibration_method="percentile",
                             op_types=None)
    lean = calibrate(model, "input", "N", data, settings, tmp_path / "lean.json")
    assert HistogramCollector.collect_absolute_value is histograms.collect_absolute_value  # installed by calibrate
    monkeypatch.setattr(HistogramCollector, "collect_absolute_value", histograms._ORT_METHOD)
    monkeypatch.setattr(histograms, "install", lambda: None)
    ort = calibrate(model, "input", "N", data, settings, tmp_path / "ort.json")
    ranges = [json.loads(p.read_text())["data"] for p in (lean, ort)]
    assert len(ranges[0]) > 10 and ranges[0] == ranges[1]
