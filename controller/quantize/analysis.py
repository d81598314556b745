"""Layer activation analysis (paper section IV-C): rank layers by quantization error.

Per quantizable layer, two errors are measured on a small analysis sample:

* ``qdq_err`` — the error of quantizing the layer's output tensor alone.
  Static mode: from ONNX Runtime's ``qdq_loss_debug`` matching of the fully
  quantized QDQ model, ‖ref(pre_qdq) − post_qdq‖ / ‖ref(pre_qdq)‖. When the quantizer
  fused the layer's Relu/Clip into it, ``pre_qdq`` is the *pre-activation* tensor while
  ``post_qdq`` is already clipped; comparing those directly charges every Conv+Clip with
  the activation itself (≈0.4–1.0). ``ref`` therefore applies the fused activation
  (taken from the float model) before comparing, so like is compared with like.
  Static QOperator: a QLinearConv never exposes its float result before requantization,
  so ``qdq_err`` is measured on the QDQ form of the same model, quantized with the
  identical settings and calibration cache (same scales and zero points: the same
  quantity). Dynamic mode (activations quantized at run time, no QDQ tensors exist): the layer is
  re-run in float on the float model's exact inputs with its activation inputs passed
  through DynamicQuantizeLinear→DequantizeLinear and its weights fake-quantized as the
  dynamic quantizer does; ``qdq_err`` is that local output error.
* ``xmodel_err`` — ‖out_fp32 − out_quant‖ / ‖out_fp32‖ at the layer's output (after its
  activation), float model vs fully quantized model, both run on the same inputs. For
  QOperator the quantized model is the real QOperator one (integer kernels): each quantized
  layer keeps its float name, and its output is dequantized with its own scale/zero point.

Norms are L2 over all elements of the analysis sample. Each error is min-max normalized
over the layers; score = w·norm_xmodel + (1−w)·norm_qdq; rank 1 = highest score.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnxruntime.quantization import qdq_loss_debug

from tuneqn.controller.quantize.quantizer import ArrayReader, QuantSettings, quantized_nodes, quiet_ort_python_logs

log = logging.getLogger(__name__)

_ACTIVATIONS = {"Relu", "Clip"}


@dataclass
class LayerError:
    """One ranked layer."""

    name: str
    op_type: str
    index: int
    output: str
    fused_activation: str | None
    qdq_err: float
    xmodel_err: float
    norm_qdq: float = 0.0
    norm_xmodel: float = 0.0
    score: float = 0.0
    rank: int = 0

    def to_dict(self) -> dict[str, object]:
        """Plain dict (JSON/SQLite)."""
        return asdict(self)


@dataclass
class _Layer:
    node: onnx.NodeProto
    index: int
    output: str  # effective output: after a following Relu/Clip if there is one
    act: onnx.NodeProto | None


class _RelErr:
    """Accumulates ‖a − b‖² and ‖a‖² over chunks."""

    def __init__(self) -> None:
        self.num = 0.0
        self.den = 0.0
        self.seen = False

    def add(self, ref: np.ndarray, other: np.ndarray) -> None:
        ref64 = ref.astype(np.float64).ravel()
        oth64 = other.astype(np.float64).ravel()
        self.num += float(np.sum((ref64 - oth64) ** 2))
        self.den += float(np.sum(ref64**2))
        self.seen = True

    def value(self) -> float:
        if not self.seen:
            return math.nan
        if self.den == 0.0:
            return 0.0 if self.num == 0.0 else math.inf
        return math.sqrt(self.num / self.den)


def _const_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def apply_activation(model: onnx.ModelProto, act: onnx.NodeProto, x: np.ndarray) -> np.ndarray:
    """Evaluate a Relu/Clip node of ``model`` on ``x`` (the fused activation)."""
    if act.op_type == "Relu":
        return np.maximum(x, 0)
    lo, hi = -np.inf, np.inf
    attrs = {a.name: helper.get_attribute_value(a) for a in act.attribute}
    if "min" in attrs:
        lo = float(attrs["min"])
    if "max" in attrs:
        hi = float(attrs["max"])
    if len(act.input) > 1 and act.input[1]:
        v = _const_value(model, act.input[1])
        lo = float(v) if v is not None else lo
    if len(act.input) > 2 and act.input[2]:
        v = _const_value(model, act.input[2])
        hi = float(v) if v is not None else hi
    return np.clip(x, lo, hi)


def find_layers(model: onnx.ModelProto, op_types: list[str]) -> list[_Layer]:
    """Layers of the given op types, in graph order, with their effective outputs."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    layers = []
    for idx, node in enumerate(model.graph.node):
        if node.op_type not in op_types:
            continue
        out = node.output[0]
        cons = consumers.get(out, [])
        act = cons[0] if len(cons) == 1 and cons[0].op_type in _ACTIVATIONS and out not in graph_outputs else None
        layers.append(_Layer(node, idx, act.output[0] if act is not None else out, act))
    return layers


def static_layers(fmodel: onnx.ModelProto, qmodel: onnx.ModelProto, op_types: list[str]) -> list[dict[str, object]]:
    """The layers a static analysis ranks, without measuring them: those of ``op_types`` that the fully
    quantized model ``qmodel`` runs quantized, in graph order (``name``, ``op_type``, ``idx``, ``output``,
    ``fused_activation``)."""
    quantized = quantized_nodes(qmodel, "static")
    return [
        {
            "name": la.node.name,
            "op_type": la.node.op_type,
            "idx": la.index,
            "output": la.output,
            "fused_activation": la.act.op_type if la.act is not None else None,
        }
        for la in find_layers(fmodel, op_types)
        if la.node.name in quantized
    ]


def _augment(model_path: Path, out: Path) -> Path:
    with quiet_ort_python_logs():
        qdq_loss_debug.modify_model_output_intermediate_tensors(str(model_path), str(out))
    return out


def _collect(aug: Path, input_name: str, data: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    acts = qdq_loss_debug.collect_activations(str(aug), ArrayReader(input_name, data, batch), session_options=opts)
    return {k: np.concatenate([a.ravel() for a in v]) for k, v in acts.items()}


def _chunks(data: np.ndarray, size: int) -> list[np.ndarray]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def _batch_of(model: onnx.ModelProto, input_name: str) -> int | None:
    for inp in model.graph.input:
        if inp.name == input_name:
            d0 = inp.type.tensor_type.shape.dim[0]
            return d0.dim_value if d0.HasField("dim_value") else None
    return None


def analyze_static(
    float_path: Path, fq_path: Path, input_name: str, data: np.ndarray, op_types: list[str], chunk: int = 8
) -> list[LayerError]:
    """Errors of every quantized layer of a fully quantized static (QDQ) model."""
    return _analyze_static(float_path, fq_path, None, input_name, data, op_types, chunk)


def analyze_qoperator(
    float_path: Path,
    qdq_path: Path,
    qop_path: Path,
    input_name: str,
    data: np.ndarray,
    op_types: list[str],
    chunk: int = 8,
) -> list[LayerError]:
    """Errors of every quantized layer of a fully quantized static QOperator model.

    ``qdq_path`` is the same model quantized to QDQ with the identical settings and
    calibration cache, so every tensor has the same scale and zero point in both files.
    ``qdq_err`` (the error of quantizing one layer's output alone) needs the layer's
    float result before requantization, which a QLinearConv never exposes: it is taken
    from the QDQ form, where it is the same quantity. ``xmodel_err`` compares the float
    model with the real QOperator model (integer kernels, requantization rounding), whose
    layers carry the float layers' names: the output of each quantized layer is
    dequantized with its own output scale and zero point and matched by name.
    """
    return _analyze_static(float_path, qdq_path, qop_path, input_name, data, op_types, chunk)


#: Quantized operator → input positions of its output scale and zero point.
_QOP_OUTPUT_QPARAMS = {"QLinearConv": (6, 7), "QLinearMatMul": (6, 7), "QGemm": (7, 8)}


def _qoperator_probe(qop: onnx.ModelProto, layers: list[_Layer]) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]]:
    """The QOperator model with each layer's output dequantized and exposed as a graph output.

    Returns the model and, per layer name, (probe output name, float-model tensor it
    corresponds to): the layer's effective output when its Relu/Clip was folded into the
    quantized operator (the usual case), its own output when the activation stayed a node.
    """
    model = onnx.ModelProto()
    model.CopyFrom(qop)
    graph = model.graph
    by_name = {n.name: n for n in graph.node}
    existing = {o.name for o in graph.output}
    probes: dict[str, tuple[str, str]] = {}
    for layer in layers:
        node = by_name.get(layer.node.name)
        if node is None:
            continue
        ref = layer.output if layer.act is None or layer.act.name not in by_name else layer.node.output[0]
        idx = _QOP_OUTPUT_QPARAMS.get(node.op_type)
        if idx is not None and len(node.input) > idx[0] and node.input[idx[0]]:
            out = f"{node.name}__tuneqn_dq"
            zp = node.input[idx[1]] if len(node.input) > idx[1] else ""
            graph.node.append(
                helper.make_node("DequantizeLinear", [node.output[0], node.input[idx[0]], zp], [out], name=out)
            )
        elif node.op_type == "QGemm":
            out = node.output[0]  # a QGemm without an output scale writes float
        else:
            log.warning("layer %s: no output scale on its %s node (no xmodel_err)", node.name, node.op_type)
            continue
        if out not in existing:
            graph.output.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
            existing.add(out)
        probes[layer.node.name] = (out, ref)
    return model, probes


def _analyze_static(
    float_path: Path,
    fq_path: Path,
    qop_path: Path | None,
    input_name: str,
    data: np.ndarray,
    op_types: list[str],
    chunk: int,
) -> list[LayerError]:
    fmodel = onnx.load(str(float_path))
    qmodel = onnx.load(str(fq_path))
    qproducers = {o: n for n in qmodel.graph.node for o in n.output}
    quantized = quantized_nodes(qmodel, "static")
    if qop_path is not None:
        qop_quantized = quantized_nodes(onnx.load(str(qop_path), load_external_data=False), "static")
        missing = sorted(qop_quantized - quantized)
        if missing:
            log.warning("QOperator layers without a QDQ counterpart (no qdq_err): %s", ", ".join(missing))
        quantized = qop_quantized
    layers = [layer for layer in find_layers(fmodel, op_types) if layer.node.name in quantized]
    qdq = {layer.node.name: _RelErr() for layer in layers}
    xm = {layer.node.name: _RelErr() for layer in layers}
    batch = _batch_of(fmodel, input_name)
    with tempfile.TemporaryDirectory(prefix="tuneqn-analysis-") as tmp:
        aug_f = _augment(float_path, Path(tmp) / "float_aug.onnx")
        aug_q = _augment(fq_path, Path(tmp) / "qdq_aug.onnx")
        probe_sess = None
        probes: dict[str, tuple[str, str]] = {}
        if qop_path is not None:
            probe, probes = _qoperator_probe(onnx.load(str(qop_path)), layers)
            probe_path = Path(tmp) / "qop_probe.onnx"
            onnx.save_model(probe, str(probe_path))
            probe_sess = ort.InferenceSession(str(probe_path), _no_opt(), providers=["CPUExecutionProvider"])
        for part in _chunks(data, chunk):
            b = batch or len(part)
            f_acts = _collect(aug_f, input_name, part, b)
            q_raw = qdq_loss_debug.collect_activations(
                str(aug_q), ArrayReader(input_name, part, b), session_options=_no_opt()
            )
            f_raw = {k: [v] for k, v in f_acts.items()}
            match = qdq_loss_debug.create_activation_matching(q_raw, f_raw)
            qop_outs: dict[str, np.ndarray] = {}
            if probe_sess is not None:
                names = sorted({out for out, _ in probes.values()})
                runs = [probe_sess.run(names, {input_name: sub}) for sub in _chunks(part, b)]
                qop_outs = {n: np.concatenate([r[i].ravel() for r in runs]) for i, n in enumerate(names)}
            for layer in layers:
                key = layer.output if layer.output in match else layer.node.output[0]
                entry = match.get(key)
                if probe_sess is not None and layer.node.name in probes:
                    out, ref = probes[layer.node.name]
                    xm[layer.node.name].add(f_acts[ref], qop_outs[out])
                if entry is None or entry.get("pre_qdq") is None or entry.get("post_qdq") is None:
                    continue
                pre = np.concatenate([a.ravel() for a in entry["pre_qdq"]])
                post = np.concatenate([a.ravel() for a in entry["post_qdq"]])
                producer = qproducers.get(key)
                fused = layer.act is not None and (producer is None or producer.op_type not in _ACTIVATIONS)
                expected = apply_activation(fmodel, layer.act, pre) if fused and layer.act is not None else pre
                qdq[layer.node.name].add(expected, post)
                if probe_sess is None:
                    xm[layer.node.name].add(f_acts[layer.output], post)
    return _to_errors(layers, qdq, xm)


def _no_opt() -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    return opts


def _fake_quant_weight(w: np.ndarray, settings: QuantSettings, axis: int | None) -> np.ndarray:
    """Quantize-dequantize a weight as ORT's dynamic quantizer does (int8 symmetric / uint8 asymmetric)."""
    w = w.astype(np.float32)
    red = tuple(i for i in range(w.ndim) if i != axis) if axis is not None else None
    if settings.weight_type == "int8":
        amax = np.max(np.abs(w), axis=red, keepdims=True) if red is not None else np.max(np.abs(w))
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        return (np.clip(np.round(w / scale), -127, 127) * scale).astype(np.float32)
    lo = np.minimum(np.min(w, axis=red, keepdims=True) if red is not None else np.min(w), 0.0)
    hi = np.maximum(np.max(w, axis=red, keepdims=True) if red is not None else np.max(w), 0.0)
    scale = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)
    zp = np.round(-lo / scale)
    return ((np.clip(np.round(w / scale) + zp, 0, 255) - zp) * scale).astype(np.float32)


def _weight_axis(node: onnx.NodeProto, settings: QuantSettings) -> int | None:
    if not settings.per_channel:
        return None
    if node.op_type in ("Conv",):
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1  # MatMul: per output column


def _shadow_model(fmodel: onnx.ModelProto, layers: list[_Layer], settings: QuantSettings) -> onnx.ModelProto:
    """The float model plus, per layer, a copy fed with dynamically quantized inputs."""
    model = onnx.ModelProto()
    model.CopyFrom(fmodel)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    del graph.value_info[:]
    for layer in layers:
        node = layer.node
        new_inputs = list(node.input)
        for i in (0, 1):
            if i >= len(node.input) or not node.input[i]:
                continue
            name = node.input[i]
            sq = f"{node.name}__shadow_in{i}"
            if name in inits:
                w = numpy_helper.to_array(inits[name])
                fq = _fake_quant_weight(w, settings, _weight_axis(node, settings) if i == 1 else None)
                graph.initializer.append(numpy_helper.from_array(fq, sq))
            else:
                graph.node.extend(
                    [
                        helper.make_node(
                            "DynamicQuantizeLinear", [name], [sq + "_q", sq + "_s", sq + "_z"], name=sq + "_DQL"
                        ),
                        helper.make_node("DequantizeLinear", [sq + "_q", sq + "_s", sq + "_z"], [sq], name=sq + "_DQ"),
                    ]
                )
            new_inputs[i] = sq
        shadow = helper.make_node(node.op_type, new_inputs, [node.output[0] + "__shadow"], name=node.name + "__shadow")
        shadow.attribute.extend(node.attribute)
        graph.node.append(shadow)
        existing = {o.name for o in graph.output}
        for out in (node.output[0], node.output[0] + "__shadow"):
            if out not in existing:
                graph.output.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    return model


def analyze_dynamic(
    float_path: Path,
    fq_path: Path,
    input_name: str,
    data: np.ndarray,
    op_types: list[str],
    settings: QuantSettings,
    chunk: int = 8,
) -> list[LayerError]:
    """Errors of every quantized layer of a fully dynamically quantized model."""
    fmodel = onnx.load(str(float_path))
    qmodel = onnx.load(str(fq_path))
    quantized = quantized_nodes(qmodel, "dynamic")
    layers = [layer for layer in find_layers(fmodel, op_types) if layer.node.name in quantized]
    qdq = {layer.node.name: _RelErr() for layer in layers}
    xm = {layer.node.name: _RelErr() for layer in layers}
    batch = _batch_of(fmodel, input_name)
    shadow = _shadow_model(fmodel, layers, settings)
    opts = _no_opt()
    with tempfile.TemporaryDirectory(prefix="tuneqn-analysis-") as tmp:
        shadow_path = Path(tmp) / "shadow.onnx"
        onnx.save_model(shadow, str(shadow_path))
        sess = ort.InferenceSession(str(shadow_path), opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        aug_f = _augment(float_path, Path(tmp) / "float_aug.onnx")
        aug_q = _augment(fq_path, Path(tmp) / "dyn_aug.onnx")
        for part in _chunks(data, chunk):
            b = batch or len(part)
            outs: dict[str, list[np.ndarray]] = {}
            for sub in _chunks(part, b):
                for n, v in zip(names, sess.run(names, {input_name: sub}), strict=True):
                    outs.setdefault(n, []).append(v)
            f_acts = _collect(aug_f, input_name, part, b)
            q_acts = _collect(aug_q, input_name, part, b)
            for layer in layers:
                y = np.concatenate([a.ravel() for a in outs[layer.node.output[0]]])
                ys = np.concatenate([a.ravel() for a in outs[layer.node.output[0] + "__shadow"]])
                qdq[layer.node.name].add(y, ys)
                if layer.output in f_acts and layer.output in q_acts:
                    xm[layer.node.name].add(f_acts[layer.output], q_acts[layer.output])
    return _to_errors(layers, qdq, xm)


def _to_errors(layers: list[_Layer], qdq: dict[str, _RelErr], xm: dict[str, _RelErr]) -> list[LayerError]:
    return [
        LayerError(
            name=layer.node.name,
            op_type=layer.node.op_type,
            index=layer.index,
            output=layer.output,
            fused_activation=layer.act.op_type if layer.act is not None else None,
            qdq_err=qdq[layer.node.name].value(),
            xmodel_err=xm[layer.node.name].value(),
        )
        for layer in layers
    ]


def _minmax(values: list[float]) -> list[float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return [0.0 for _ in values]
    lo, hi = min(finite), max(finite)
    out = []
    for v in values:
        if math.isnan(v):
            out.append(0.0)
        elif math.isinf(v):
            out.append(1.0)
        else:
            out.append((v - lo) / (hi - lo) if hi > lo else 0.0)
    return out


def rank_layers(errors: list[LayerError], xmodel_weight: float = 0.5) -> list[LayerError]:
    """Min-max normalize both errors, score them and sort descending (rank 1 first)."""
    nq = _minmax([e.qdq_err for e in errors])
    nx = _minmax([e.xmodel_err for e in errors])
    for e, q, x in zip(errors, nq, nx, strict=True):
        e.norm_qdq, e.norm_xmodel = q, x
        e.score = xmodel_weight * x + (1.0 - xmodel_weight) * q
    ordered = sorted(errors, key=lambda e: (-e.score, e.index))
    for r, e in enumerate(ordered, start=1):
        e.rank = r
    return ordered


# --------------------------------------------------------------------------- FP32 confidence check

#: Below this (normalized) mean top-1 probability the FP32 model looks confused on the sample.
#: EfficientNet-Lite0 on the example's 120 photos: 0.74 with the right preprocessing (lite), 0.65–0.71 with
#: x/255, ImageNet mean/std, BGR or no crop, 0.22 with raw 0–255 pixels (docs/reference.md, Image preprocessing).
MIN_MEAN_TOP1 = 0.35
#: ... or when this share of the images (at least 8, of a model with at least 10 classes) get one class.
MAX_ONE_CLASS = 0.75
#: Images the check runs the FP32 model on (the first of the calibration sample).
CONFIDENCE_SAMPLES = 32


@dataclass
class ConfidenceCheck:
    """How sure the FP32 model is of its top-1 class on a few preprocessed samples."""

    samples: int
    classes: int
    #: The model's outputs already are probabilities (else softmax was applied to them).
    probabilities: bool
    #: Mean top-1 probability, rescaled so that chance (1/classes) is 0 and certainty 1.
    mean_top1: float
    #: The share of the samples whose top-1 is the most frequent class.
    one_class: float
    top_class: int

    def problem(self) -> str | None:
        """What looks wrong (one sentence naming the check and the value), None when nothing does."""
        if not math.isfinite(self.mean_top1):
            return f"the FP32 model gives non-finite outputs (NaN or inf) on {self.samples} sample images"
        if self.mean_top1 < MIN_MEAN_TOP1:
            return (
                f"the FP32 model looks confused on the sample: mean top-1 probability {self.mean_top1:.2f} over "
                f"{self.samples} images (below {MIN_MEAN_TOP1:g}; rescaled: 0 = chance, 1 = sure)"
            )
        if self.classes >= 10 and self.samples >= 8 and self.one_class >= MAX_ONE_CLASS:
            return (
                f"the FP32 model gives {self.one_class:.0%} of {self.samples} sample images the same class "
                f"({self.top_class}; at most {MAX_ONE_CLASS:.0%} expected unless the images are of one class)"
            )
        return None


def _looks_like_probabilities(out: np.ndarray) -> bool:
    return bool(np.all(out >= -1e-6) and np.all(out <= 1 + 1e-6) and np.allclose(out.sum(axis=1), 1.0, atol=1e-3))


def fp32_confidence(
    model_path: Path, input_name: str, data: np.ndarray, max_samples: int = CONFIDENCE_SAMPLES
) -> ConfidenceCheck | None:
    """Run the float model on the first ``max_samples`` samples; None unless its first output is classifier-like
    (2-D [batch, classes], classes ≥ 2). Softmax is applied unless the outputs already are probabilities."""
    data = data[:max_samples]
    if len(data) == 0:
        return None
    # ORT's graph optimizations on: this check runs before any calibration starts, and the unoptimized graph
    # takes 2-3x as long (Lite1: 2.8 s vs 1.1 s); a mean confidence does not need the unfused graph's bits
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    model = onnx.load(str(model_path), load_external_data=False)
    batch = _batch_of(model, input_name) or len(data)
    out_name = sess.get_outputs()[0].name
    outs = [sess.run([out_name], {input_name: part})[0] for part in _chunks(data, batch)]
    if any(o.ndim != 2 for o in outs) or outs[0].shape[1] < 2:
        return None
    y = np.concatenate(outs).astype(np.float64)
    probs = _looks_like_probabilities(y)
    if not probs:
        z = np.exp(y - y.max(axis=1, keepdims=True))
        y = z / z.sum(axis=1, keepdims=True)
    classes = y.shape[1]
    top1 = float(np.mean(y.max(axis=1)))
    counts = np.bincount(y.argmax(axis=1), minlength=classes)
    return ConfidenceCheck(
        samples=len(y),
        classes=classes,
        probabilities=probs,
        mean_top1=(top1 - 1 / classes) / (1 - 1 / classes),
        one_class=float(counts.max() / len(y)),
        top_class=int(counts.argmax()),
    )
