"""Selective quantization with the ONNX Runtime quantizer.

* Static: calibration runs once per (model, calibration sample, settings); its ranges
  are kept in ORT's JSON calibration cache and reused for every candidate.
* Dynamic: weights are quantized ahead of time, activations at run time.
* Candidate = the model quantized with ``nodes_to_exclude``. ORT's session-time
  ``WeightBiasQuantization`` transformer re-quantizes the float weights of an excluded
  Conv/Gemm/ConvTranspose that reads a DequantizeLinear output and feeds a
  QuantizeLinear, so such a candidate carries ``ort_disabled_optimizers`` that every
  evaluation must apply (see :func:`runtime_options`). This holds for both static
  formats: in a QOperator candidate an excluded layer sits between the DequantizeLinear
  of its quantized producer and a QuantizeLinear of its consumer just as in QDQ.
* Node names: the QOperator and the dynamic quantizers rename the nodes they quantize
  (``conv1`` → ``conv1_quant``); candidates get the float names back, so a quantized
  layer (QLinearConv, QGemm, ConvInteger, …) is named as the float layer it replaces and
  rankings, exclusion lists and reports use one set of names in every format.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry, QLinearOpsRegistry

from tuneqn.controller.config import QuantizationSpec, QuantizerSettings, Recipe
from tuneqn.controller.quantize import histograms

__all__ = [
    "QTYPE",
    "WBQ",
    "ArrayReader",
    "QuantSettings",
    "calibrate",
    "calibration_reader",
    "default_op_types",
    "quantize_candidate",
    "quantize_static_file",
    "quantized_nodes",
    "quiet_ort_python_logs",
    "runtime_options",
    "runtime_options_of",
    "static_extra_options",
]

log = logging.getLogger(__name__)

QTYPE = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
_CALIB = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
#: Session transformer that would silently quantize the weights of excluded layers.
WBQ = "WeightBiasQuantization"
_WBQ_OPS = {"Conv", "ConvTranspose", "Gemm"}
_WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


class QuantSettings(QuantizerSettings):
    """Everything that determines a quantized candidate besides the exclusion list: a recipe's quantizer
    settings (:class:`~tuneqn.controller.config.QuantizerSettings`), with its float op types taken out of
    its op types."""

    @classmethod
    def from_spec(cls, spec: QuantizationSpec, recipe: str) -> QuantSettings:
        """Settings of one recipe (a mode name, a study recipe or a preset) of the study config."""
        return cls.from_recipe(spec.resolve(recipe))

    @classmethod
    def from_recipe(cls, r: Recipe) -> QuantSettings:
        """Settings of a resolved recipe (op types it leaves in float are taken out of its op types, or
        out of the quantizer's defaults for its mode: :func:`default_op_types`)."""
        op_types = r.op_types
        if r.exclude_op_types:
            op_types = tuple(sorted(set(op_types or default_op_types(r.mode)) - set(r.exclude_op_types)))
            if not op_types:
                raise ValueError(f"recipe {r.name!r} leaves every op type in float")
        values = {k: getattr(r, k) for k in QuantizerSettings.model_fields}
        return cls(**{**values, "op_types": op_types})

    def key(self) -> str:
        """Stable short hash of the settings."""
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True, default=list).encode()).hexdigest()[:12]

    def calibration_key(self) -> str:
        """Stable short hash of the settings the calibration ranges depend on.

        ORT's calibrator records the ranges of the tensors of the op types to quantize, by the calibration
        method, on the model as :func:`quantize_static` updates it for the activation and weight types;
        weight granularity (``per_channel``), ``reduce_range``, the symmetry flags (tuneqn passes none of the
        ``Calib*`` options) and the format are applied later, to those ranges. So per-tensor and per-channel
        recipes of one method share one calibration (one calibration run instead of two).
        """
        fields = {k: getattr(self, k) for k in _CALIBRATION_FIELDS}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=list).encode()).hexdigest()[:12]


#: The settings that decide a static recipe's calibration cache (see :meth:`QuantSettings.calibration_key`).
_CALIBRATION_FIELDS = ("mode", "activation_type", "weight_type", "calibration_method", "op_types")


def default_op_types(mode: str) -> tuple[str, ...]:
    """The op types ONNX Runtime's quantizer quantizes when given none: its QOperator and QDQ registries
    (static) or its integer-ops registry (dynamic), as ``quantize_static``/``quantize_dynamic`` do."""
    if mode == "static":
        return tuple(sorted({*QLinearOpsRegistry, *QDQRegistry}))
    return tuple(sorted(IntegerOpsRegistry))


class ArrayReader(CalibrationDataReader):
    """Feeds one sample at a time from an array to a single-input model."""

    def __init__(self, input_name: str, data: np.ndarray, batch: int = 1) -> None:
        self.input_name = input_name
        self.data = data
        self.batch = batch
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self.data):
            return None
        chunk = self.data[self._i : self._i + self.batch]
        self._i += self.batch
        return {self.input_name: chunk}

    def __len__(self) -> int:
        return (len(self.data) + self.batch - 1) // self.batch

    def rewind(self) -> None:
        """Start again from the first sample."""
        self._i = 0


@contextmanager
def quiet_ort_python_logs() -> Iterator[None]:
    """Silence the quantizer's root-logger advice while it runs (none about pre-processing on a
    pre-processed model)."""
    root = logging.getLogger()
    flt = _OrtAdviceFilter()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


class _OrtAdviceFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not ("onnxruntime" in record.pathname and record.levelno < logging.ERROR)


def calibration_reader(
    input_name: str, data: np.ndarray, model_batch: int | str, settings: QuantSettings
) -> ArrayReader:
    """Batches of the model's fixed batch size; with a dynamic batch 8 at a time, except for the
    histogram calibrators (entropy, percentile), which stack every batch of a tensor into one
    array and fail on a shorter last batch: they get equal batches (of 1)."""
    if isinstance(model_batch, int):
        batch = model_batch
    elif settings.calibration_method == "minmax" or len(data) % 8 == 0:
        batch = 8
    else:
        batch = 1
    return ArrayReader(input_name, data, batch=batch)


def calibrate(
    model_path: Path,
    input_name: str,
    model_batch: int | str,
    calib_data: np.ndarray,
    settings: QuantSettings,
    cache_path: Path,
) -> Path:
    """Run calibration once and keep ORT's JSON calibration cache at ``cache_path``."""
    if cache_path.is_file():
        return cache_path
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    if settings.calibration_method == "percentile":
        histograms.install()  # the same histograms as ORT's, without copying every tensor three times
    partial = cache_path.with_name(cache_path.name + ".part")
    partial.unlink(missing_ok=True)
    # The histogram calibrators print their progress to stdout: keep the CLI's output clean.
    with tempfile.TemporaryDirectory(prefix="tuneqn-calib-") as tmp, contextlib.redirect_stdout(io.StringIO()):
        quantize_static_file(
            model_path,
            Path(tmp) / "fq.onnx",
            settings,
            [],
            partial,
            calibration_reader(input_name, calib_data, model_batch, settings),
        )
    os.replace(partial, cache_path)
    return cache_path


def static_extra_options(settings: QuantSettings) -> dict[str, Any]:
    """The ``extra_options`` tuneqn gives ``quantize_static`` for a recipe."""
    return {"ActivationSymmetric": settings.activation_symmetric, "WeightSymmetric": settings.weight_symmetric}


def quantize_static_file(
    model_path: Path,
    out: Path,
    settings: QuantSettings,
    exclude: list[str],
    cache_path: Path,
    reader: CalibrationDataReader | None = None,
) -> None:
    """ORT's ``quantize_static`` of ``model_path`` to ``out`` with a recipe's settings, everything but ``exclude``
    quantized; ranges from ``cache_path`` (written there first from ``reader`` when one is given)."""
    extra = static_extra_options(settings)
    with quiet_ort_python_logs():
        quantize_static(
            str(model_path),
            str(out),
            calibration_data_reader=reader,
            quant_format=QuantFormat.QDQ if settings.format == "qdq" else QuantFormat.QOperator,
            op_types_to_quantize=list(settings.op_types) if settings.op_types else None,
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            activation_type=QTYPE[settings.activation_type],
            weight_type=QTYPE[settings.weight_type],
            nodes_to_exclude=list(exclude),
            calibrate_method=_CALIB[settings.calibration_method],
            extra_options=extra,
            calibration_cache_path=str(cache_path),
        )


#: Suffixes the quantizers append to the names of the nodes they replace, longest first.
_RENAMED_SUFFIXES = {"qoperator": ("_quant",), "dynamic": ("_MatMul_quant", "_quant", "_MatMul")}


def _restore_node_names(model: onnx.ModelProto, original: set[str], suffixes: tuple[str, ...]) -> int:
    """Undo the quantizer's renaming (``conv1_quant`` → ``conv1``); returns how many nodes were renamed.

    A node gets its base name back only when that base is a node of the float model and no
    other node of the quantized model already carries it.
    """
    present = {n.name for n in model.graph.node}
    renamed = 0
    for node in model.graph.node:
        if node.name in original:
            continue
        for suffix in suffixes:
            base = node.name[: -len(suffix)] if node.name.endswith(suffix) else None
            if base and base in original and base not in present:
                present.discard(node.name)
                node.name = base
                present.add(base)
                renamed += 1
                break
    return renamed


def _restore_names_in_file(model_path: Path, quantized: Path, suffixes: tuple[str, ...]) -> None:
    """Rewrite ``quantized`` with the float model's node names."""
    model = onnx.load(str(quantized))
    original = {n.name for n in onnx.load(str(model_path), load_external_data=False).graph.node}
    _restore_node_names(model, original, suffixes)
    onnx.save_model(model, str(quantized))


def quantize_candidate(
    model_path: Path,
    out: Path,
    settings: QuantSettings,
    exclude: list[str],
    calib_cache: Path | None,
) -> None:
    """Write the candidate that quantizes everything but ``exclude`` to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    if settings.mode == "static":
        if calib_cache is None or not calib_cache.is_file():
            raise FileNotFoundError(f"calibration cache missing: {calib_cache}")
        quantize_static_file(model_path, tmp, settings, exclude, calib_cache)
        if settings.format == "qoperator":
            _restore_names_in_file(model_path, tmp, _RENAMED_SUFFIXES["qoperator"])
    else:
        # The dynamic quantizer first rewrites Gemm into "<name>_MatMul" + "<name>_Add" and
        # matches nodes_to_exclude against the new names: exclude both spellings.
        exclude = list(exclude) + [f"{name}_MatMul" for name in exclude]
        with quiet_ort_python_logs():
            quantize_dynamic(
                str(model_path),
                str(tmp),
                op_types_to_quantize=list(settings.op_types) if settings.op_types else None,
                per_channel=settings.per_channel,
                reduce_range=settings.reduce_range,
                weight_type=QTYPE[settings.weight_type],
                nodes_to_exclude=list(exclude),
                extra_options={"WeightSymmetric": settings.weight_symmetric},
            )
        _restore_names_in_file(model_path, tmp, _RENAMED_SUFFIXES["dynamic"])
    os.replace(tmp, out)


def runtime_options(model: onnx.ModelProto, excluded: list[str]) -> dict[str, list[str]]:
    """ORT session settings a candidate needs so that its excluded layers really run in float.

    ``WeightBiasQuantization`` fires on a Conv/ConvTranspose/Gemm whose input 0 comes from a
    DequantizeLinear and whose weight is a float initializer; when any excluded layer looks
    like that, the candidate must be run with that transformer disabled. The rule is the same
    for QDQ and QOperator candidates (in QOperator the DequantizeLinear is the one the
    quantizer inserts after the excluded layer's quantized producer).
    """
    return runtime_options_of(model.graph.node, {i.name for i in model.graph.initializer}, excluded)


def runtime_options_of(
    nodes: Iterable[onnx.NodeProto], initializers: set[str] | frozenset[str], excluded: list[str]
) -> dict[str, list[str]]:
    """:func:`runtime_options` of a graph given as its nodes and its initializers' names."""
    nodes = list(nodes)
    producers = {o: n for n in nodes for o in n.output}
    wanted = set(excluded)
    for node in nodes:
        if node.name not in wanted or node.op_type not in _WBQ_OPS or len(node.input) < 2:
            continue
        src = producers.get(node.input[0])
        weight_src = producers.get(node.input[1])
        if (
            src is not None
            and src.op_type == "DequantizeLinear"
            and (node.input[1] in initializers or (weight_src is not None and weight_src.op_type != "DequantizeLinear"))
        ):
            return {"ort_disabled_optimizers": [WBQ]}
    return {"ort_disabled_optimizers": []}


def quantized_nodes(model: onnx.ModelProto, mode: str) -> set[str]:
    """Names of the nodes that run quantized in a candidate model file."""
    if mode == "static":
        producers = {o: n for n in model.graph.node for o in n.output}
        out: set[str] = set()
        for node in model.graph.node:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                continue
            if node.op_type.startswith("QLinear") or node.op_type in ("QGemm", "QAttention"):
                out.add(node.name)
                continue
            fed = [(p := producers.get(i)) is not None and p.op_type == "DequantizeLinear" for i in node.input[:2] if i]
            # A weighted layer runs quantized when its weight comes through a DequantizeLinear;
            # any other node when all of its (first two) inputs do.
            if node.op_type in _WEIGHTED_OPS and len(fed) >= 2:
                if fed[1]:
                    out.add(node.name)
            elif fed and all(fed):
                out.add(node.name)
        return out
    integer_ops = {"ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention"}
    return {n.name for n in model.graph.node if n.op_type in integer_ops}
