"""Precision levels per layer: beyond "quantized with the recipe" or "left in float".

A candidate of a static QDQ recipe gives each searched layer one level (:data:`LEVELS`, most precise first):

* ``fp32``: left in float (the paper's exclusion);
* ``fp16``: left in float, its weight stored as float16 behind a ``Cast`` to float (ONNX Runtime folds the
  Cast when the session loads: the layer runs the fp32 kernel on fp16-rounded weights, at half the bytes of an
  fp32 exclusion);
* ``a16``: the recipe's int8 weights, the layer's input read at 16 bits: a QuantizeLinear/DequantizeLinear pair
  of its own on its input activation (uint16, or int16 for int8 activations), scale and zero point from the
  recipe's calibrated range by ONNX Runtime's ``compute_scale_zp``; the other readers of that activation keep
  8 bits. ONNX Runtime's CPU provider has no 16-bit convolution: the layer runs in float (same bytes as int8,
  more accuracy where the activation's quantization is the error, slower), and so does the producer of that
  activation when the layer was its only reader (its output is then quantized at 16 bits only, as ONNX Runtime's
  quantizer does with a 16-bit ``TensorQuantOverrides`` entry);
* ``int8``: the recipe's quantization (every layer's level unless said otherwise);
* ``int4``: the recipe's activations, the weight quantized to 4 bits per output channel (symmetric, ONNX
  Runtime's ``compute_data_quant_params``/``quantize_onnx_initializer`` arithmetic), its bias re-quantized with
  the new weight scales. The file stores the 4-bit values two to a byte and unpacks them with plain operators
  that ONNX Runtime folds when the session loads (:func:`_unpacking`): no runtime has a 4-bit convolution
  here, so the layer runs in float on its int4-valued weight, at no per-run cost and at the speed of a float
  layer (a 4-bit ``DequantizeLinear``, as ONNX Runtime's quantizer writes it, is never folded and cost
  Lite0's classifier 1.4 ms a run). Its outputs equal those of ONNX Runtime's quantizer with an int4
  override (a test).

:func:`apply_levels` rewrites a candidate derived for its float layers (``fp32`` and ``fp16`` ones excluded,
:mod:`tuneqn.controller.quantize.edits`) into the one with every level; it is deterministic, so a candidate's
bytes are a function of (recipe, levels). What does not fit a level raises :class:`edits.Unsupported`
(a weight shared with another node, a layer without its weight's DequantizeLinear, …).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import get_args

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType, pack_bytes_to_4bit

from tuneqn.controller.config import LevelName
from tuneqn.controller.quantize.edits import Unsupported

__all__ = [
    "DEFAULT_LEVEL",
    "Activations16",
    "FLOAT_LEVELS",
    "Int4Cache",
    "LEVELS",
    "apply_levels",
    "fits",
    "float_layers",
    "int4_per_channel",
    "int4_tensor",
    "runtime_float",
    "level_tag",
    "normalize_levels",
]

MS_DOMAIN = "com.microsoft"


#: Every level, most precise first: the names of ``config.LevelName``, declared once there.
LEVELS: tuple[str, ...] = get_args(LevelName)
#: A layer's level unless a candidate says otherwise.
DEFAULT_LEVEL = "int8"
#: The levels that leave a layer in float (its weight in the file as float32 or float16).
FLOAT_LEVELS = frozenset({"fp32", "fp16"})


def normalize_levels(levels: Mapping[str, str] | Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """``(layer, level)`` pairs sorted by layer, the default level left out (ValueError for an unknown level)."""
    pairs = dict(levels.items() if isinstance(levels, Mapping) else levels)
    unknown = sorted({lv for lv in pairs.values() if lv not in LEVELS})
    if unknown:
        raise ValueError(f"unknown precision level {unknown[0]!r} (known: {', '.join(LEVELS)})")
    return tuple(sorted((layer, lv) for layer, lv in pairs.items() if lv != DEFAULT_LEVEL))


def runtime_float(excluded: Iterable[str], levels: Mapping[str, str]) -> list[str]:
    """The layers that run in float once a session folds the candidate's constants: its float layers and its int4
    ones (what ``WeightBiasQuantization`` would quantize at load if it were on)."""
    return sorted({*excluded, *(layer for layer, lv in levels.items() if lv == "int4")})


def float_layers(levels: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    """The layers a candidate keeps in float (``fp32`` and ``fp16``), sorted."""
    return tuple(sorted(layer for layer, lv in levels if lv in FLOAT_LEVELS))


def level_tag(levels: Iterable[tuple[str, str]]) -> str:
    """The levels as text for a candidate's content hash: ``layer=level`` lines of the non-fp32 ones (an
    exclusion set alone hashes as before)."""
    return "\n".join(f"{layer}={lv}" for layer, lv in sorted(levels) if lv != "fp32")


#: A model's int4 weights computed so far: (float weight name, axis) -> (scales, int4 values as int8).
Int4Cache = dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Activations16:
    """What the ``a16`` level needs: the recipe's calibrated ranges by tensor name, its activation type and
    symmetry."""

    ranges: Mapping[str, tuple[float, float]]
    signed: bool = False
    symmetric: bool = False


def apply_levels(
    model: onnx.ModelProto,
    float_model: onnx.ModelProto,
    levels: Mapping[str, str],
    cache: Int4Cache | None = None,
    a16: Activations16 | None = None,
) -> onnx.ModelProto:
    """``model`` (a QDQ candidate whose ``fp32``/``fp16`` layers are already in float) with every other level
    applied: ``fp16`` weights stored as float16, ``int4`` weights re-quantized (kept in ``cache``, which belongs
    to ``float_model``), ``a16`` inputs at 16 bits (from ``a16``'s ranges). Returns a new model."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    edits = _Graph(out, float_model, {} if cache is None else cache)
    for layer, level in sorted(levels.items()):
        if level == "fp16":
            edits.fp16_weight(layer)
        elif level == "int4":
            edits.int4_weight(layer)
        elif level == "a16":
            if a16 is None:
                raise Unsupported(f"a16 of {layer!r}: no calibrated ranges (a static recipe's calibration)")
            edits.a16_input(layer, a16)
        elif level not in ("fp32", DEFAULT_LEVEL):
            raise ValueError(f"unknown precision level {level!r} (known: {', '.join(LEVELS)})")
    edits.finish()
    return out


def fits(
    model: onnx.ModelProto, float_model: onnx.ModelProto, layer: str, level: str, a16: Activations16 | None = None
) -> str | None:
    """Why ``layer`` of ``model`` cannot take ``level`` (None: it can), e.g. int4 on a layer whose weight another
    node shares."""
    try:
        if level == "fp16":  # a float layer: its float weight must be its own float32 initializer
            probe = onnx.ModelProto()
            probe.CopyFrom(float_model)
            _Graph(probe, probe, {}).fp16_weight(layer)
        else:
            apply_levels(model, float_model, {layer: level}, a16=a16)
    except Unsupported as exc:
        return str(exc)
    return None


class _Graph:
    """One candidate's graph, indexed for the level edits."""

    def __init__(self, model: onnx.ModelProto, float_model: onnx.ModelProto, cache: Int4Cache) -> None:
        self.model = model
        self.cache = cache
        self.graph = model.graph
        self.nodes = {n.name: n for n in self.graph.node}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.users: dict[str, int] = {}
        for n in self.graph.node:
            for i in n.input:
                self.users[i] = self.users.get(i, 0) + 1
        self.inits = {t.name: t for t in self.graph.initializer}
        self.float_nodes = {n.name: n for n in float_model.graph.node}
        self.float_inits = {t.name: t for t in float_model.graph.initializer}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.needs_ms_domain = False

    def _layer(self, name: str, what: str) -> onnx.NodeProto:
        node = self.nodes.get(name)
        if node is None or node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            raise Unsupported(f"{what} of {name!r}: not a Conv/Gemm/MatMul layer of the candidate")
        return node

    def _float_weight(self, name: str) -> TensorProto:
        fnode = self.float_nodes.get(name)
        weight = self.float_inits.get(fnode.input[1]) if fnode is not None and len(fnode.input) > 1 else None
        if weight is None or weight.data_type != TensorProto.FLOAT:
            raise Unsupported(f"layer {name!r}: its float weight is not a float32 initializer")
        return weight

    def _only_use(self, tensor: str, name: str) -> None:
        if self.users.get(tensor, 0) != 1:
            raise Unsupported(f"layer {name!r}: tensor {tensor!r} is shared with another node")

    def fp16_weight(self, name: str) -> None:
        """The float layer's weight as a float16 initializer and a Cast to float in front of the layer."""
        node = self._layer(name, "fp16")
        weight = self.inits.get(node.input[1])
        if weight is None or weight.data_type != TensorProto.FLOAT:
            raise Unsupported(f"fp16 of {name!r}: the layer does not read a float32 weight (is it in float?)")
        self._only_use(weight.name, name)
        half = numpy_helper.from_array(numpy_helper.to_array(weight).astype(np.float16), f"{weight.name}_fp16")
        weight.CopyFrom(half)
        cast = helper.make_node(
            "Cast", [half.name], [node.input[1]], name=f"{name}_weight_fp16_cast", to=TensorProto.FLOAT
        )
        self.graph.node.insert(list(self.graph.node).index(node), cast)

    def int4_weight(self, name: str) -> None:
        """The quantized layer's weight at 4 bits per output channel, its bias re-quantized to match."""
        node = self._layer(name, "int4")
        w_dq = self.producer.get(node.input[1])
        if w_dq is None or w_dq.op_type != "DequantizeLinear" or w_dq.input[0] not in self.inits:
            raise Unsupported(f"int4 of {name!r}: the layer's weight is not a quantized initializer (is it in float?)")
        x_dq = self.producer.get(node.input[0])
        x_scale = self.inits.get(x_dq.input[1]) if x_dq is not None and x_dq.op_type == "DequantizeLinear" else None
        if x_scale is None:
            raise Unsupported(f"int4 of {name!r}: its input is not dequantized from a constant scale")
        for tensor in (node.input[1], *w_dq.input):
            self._only_use(tensor, name)
        weight = self._float_weight(name)
        axis = _weight_axis(node)
        key = (weight.name, axis)
        if key not in self.cache:
            self.cache[key] = int4_per_channel(numpy_helper.to_array(weight), axis)
        scale_arr, q = self.cache[key]
        nodes, inits = _unpacking(f"{name}_int4", q, scale_arr, axis, node.input[1])
        self._drop(w_dq)  # the int8 weight, its scale and zero point go with it
        at = list(self.graph.node).index(node)
        for k, n in enumerate(nodes):
            self.graph.node.insert(at + k, n)
        self.graph.initializer.extend(inits)
        if len(node.input) > 2 and node.input[2]:
            self._requantize_bias(name, node, float(numpy_helper.to_array(x_scale)), scale_arr)

    def _requantize_bias(self, name: str, node: onnx.NodeProto, x_scale: float, w_scales: np.ndarray) -> None:
        """The int32 bias with scale ``x_scale · w_scale[c]`` per channel (as ORT's ``quantize_bias_static``)."""
        b_dq = self.producer.get(node.input[2])
        if b_dq is None or b_dq.op_type != "DequantizeLinear" or b_dq.input[0] not in self.inits:
            raise Unsupported(f"int4 of {name!r}: its bias is not a quantized initializer")
        for tensor in (node.input[2], *b_dq.input):
            self._only_use(tensor, name)
        fnode = self.float_nodes[name]
        bias = self.float_inits.get(fnode.input[2]) if len(fnode.input) > 2 else None
        if bias is None:
            raise Unsupported(f"int4 of {name!r}: its float bias is not an initializer")
        b = numpy_helper.to_array(bias).astype(np.float64)
        scale = (x_scale * w_scales.astype(np.float64)).astype(np.float32)
        info = np.iinfo(np.int32)
        q = np.clip(np.round(b / scale.astype(np.float64)), info.min, info.max).astype(np.int32)
        self.inits[b_dq.input[0]].CopyFrom(numpy_helper.from_array(q, b_dq.input[0]))
        self.inits[b_dq.input[1]].CopyFrom(numpy_helper.from_array(scale, b_dq.input[1]))
        if len(b_dq.input) > 2:
            self.inits[b_dq.input[2]].CopyFrom(numpy_helper.from_array(np.zeros(len(q), np.int32), b_dq.input[2]))
        _set_axis(b_dq, 0)

    def a16_input(self, name: str, a16: Activations16) -> None:
        """The quantized layer reads its input through a 16-bit QuantizeLinear/DequantizeLinear pair of its own;
        the 8-bit pair goes when the layer was its only reader."""
        node = self._layer(name, "a16")
        w_dq = self.producer.get(node.input[1])
        x_dq = self.producer.get(node.input[0])
        x_q = self.producer.get(x_dq.input[0]) if x_dq is not None and x_dq.op_type == "DequantizeLinear" else None
        if w_dq is None or w_dq.op_type != "DequantizeLinear" or x_q is None or x_q.op_type != "QuantizeLinear":
            raise Unsupported(f"a16 of {name!r}: not a quantized layer reading a quantized activation")
        tensor = x_q.input[0]
        if tensor not in a16.ranges:
            raise Unsupported(f"a16 of {name!r}: no calibrated range for its input {tensor!r}")
        qtype = TensorProto.INT16 if a16.signed else TensorProto.UINT16
        qmin, qmax = get_qmin_qmax_for_qType(qtype, symmetric=a16.symmetric)
        low, high = (np.array(v, dtype=np.float32) for v in a16.ranges[tensor])
        zero, scale = compute_scale_zp(low, high, qmin, qmax, a16.symmetric)
        base = f"{tensor}_{name}_a16"
        inits = [
            numpy_helper.from_array(np.asarray(scale, dtype=np.float32), f"{base}_scale"),
            numpy_helper.from_array(np.asarray(zero).astype(qmin.dtype), f"{base}_zero_point"),
        ]
        domain = MS_DOMAIN if self.opset < 21 else ""
        self.needs_ms_domain |= bool(domain)
        q = helper.make_node("QuantizeLinear", [tensor, inits[0].name, inits[1].name], [f"{base}_q"], name=f"{base}_q")
        dq = helper.make_node(
            "DequantizeLinear", [q.output[0], inits[0].name, inits[1].name], [f"{base}_dq"], name=f"{base}_dq"
        )
        q.domain = dq.domain = domain
        old = node.input[0]
        node.input[0] = dq.output[0]
        self.users[old] -= 1
        at = list(self.graph.node).index(node)
        self.graph.node.insert(at, dq)
        self.graph.node.insert(at, q)
        self.graph.initializer.extend(inits)
        if x_dq is not None and not self.users[old] and not any(o.name == old for o in self.graph.output):
            self._drop(x_dq)  # the layer was the 8-bit pair's only reader
            if self.users.get(x_q.output[0], 0) == 0:
                self._drop(x_q)

    def _drop(self, node: onnx.NodeProto) -> None:
        """Remove a node and its initializers that nothing else reads."""
        self.graph.node.remove(node)
        for i in node.input:
            self.users[i] -= 1
            if not self.users[i] and i in self.inits:
                self.graph.initializer.remove(self.inits.pop(i))

    def finish(self) -> None:
        """Declare the com.microsoft opset when a 4-bit DequantizeLinear uses it."""
        if self.needs_ms_domain and not any(o.domain == MS_DOMAIN for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def int4_per_channel(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """A float weight quantized to symmetric int4 per channel along ``axis``: the scales (float32) and the values
    (int8 in [-8, 7], zero points 0). The same as ONNX Runtime's ``compute_data_quant_params`` and
    ``quantize_onnx_initializer`` channel by channel (a test compares :func:`int4_tensor` of them), computed for
    all channels at once."""
    qmin, qmax = (int(v) for v in get_qmin_qmax_for_qType(TensorProto.INT4, symmetric=True))
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    absmax = np.maximum(np.abs(np.minimum(moved.min(axis=1), 0)), np.abs(np.maximum(moved.max(axis=1), 0)))
    wide = (2.0 * absmax.astype(np.float64)) / float(qmax - qmin)
    scale = np.where(wide < np.finfo(np.float32).tiny, 1.0, wide).astype(np.float32)
    zero = int(np.round((qmin + qmax) / 2.0))
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip((w.astype(np.float32) / scale.reshape(shape)).round() + zero, qmin, qmax).astype(np.int8)
    return scale, q


def int4_tensor(q: np.ndarray, name: str) -> TensorProto:
    """int4 values as ONNX Runtime's quantizer stores them: an INT4 tensor, two's complement nibbles."""
    return helper.make_tensor(name, TensorProto.INT4, list(q.shape), bytes(pack_bytes_to_4bit(q.tobytes())), raw=True)


def _unpacking(
    base: str, q: np.ndarray, scale: np.ndarray, axis: int, output: str
) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Nodes that compute ``output`` = ``q`` · ``scale`` (per channel along ``axis``) from ``q`` stored at 4 bits:
    two values per byte, offset by 8 (``uint8``), unpacked with Cast, BitShift, Sub, Concat, Reshape, Slice and
    scaled with Mul. Every input is constant, so ONNX Runtime folds them when the session loads: the layer runs
    on its float weight with no per-run cost (a DequantizeLinear is never folded: dequantizing 1.28 M weights
    cost Lite0's classifier 1.4 ms a run). Plain opset-13 operators, which TVM imports too."""
    flat = (q.reshape(-1).astype(np.int16) + 8).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    shape = [1] * q.ndim
    shape[axis] = -1
    inits = [
        numpy_helper.from_array((flat[0::2] | (flat[1::2] << 4)).astype(np.uint8), f"{base}_packed"),
        numpy_helper.from_array(np.array([4], np.uint32), f"{base}_four"),
        numpy_helper.from_array(np.array([-1, 1], np.int64), f"{base}_column"),
        numpy_helper.from_array(np.array([-1], np.int64), f"{base}_row"),
        numpy_helper.from_array(np.array([0], np.int64), f"{base}_start"),
        numpy_helper.from_array(np.array([q.size], np.int64), f"{base}_count"),
        numpy_helper.from_array(np.array(8.0, np.float32), f"{base}_offset"),
        numpy_helper.from_array(np.array(q.shape, np.int64), f"{base}_shape"),
        numpy_helper.from_array(scale.reshape(shape).astype(np.float32), f"{base}_scale"),
    ]
    t = f"{base}_"
    nodes = [
        helper.make_node("Cast", [f"{t}packed"], [f"{t}bytes"], name=f"{t}cast_bytes", to=TensorProto.UINT32),
        helper.make_node("BitShift", [f"{t}bytes", f"{t}four"], [f"{t}high"], name=f"{t}high", direction="RIGHT"),
        helper.make_node("BitShift", [f"{t}high", f"{t}four"], [f"{t}high4"], name=f"{t}high4", direction="LEFT"),
        helper.make_node("Sub", [f"{t}bytes", f"{t}high4"], [f"{t}low"], name=f"{t}low"),
        helper.make_node("Reshape", [f"{t}low", f"{t}column"], [f"{t}low_col"], name=f"{t}low_col"),
        helper.make_node("Reshape", [f"{t}high", f"{t}column"], [f"{t}high_col"], name=f"{t}high_col"),
        helper.make_node("Concat", [f"{t}low_col", f"{t}high_col"], [f"{t}pairs"], name=f"{t}pairs", axis=1),
        helper.make_node("Reshape", [f"{t}pairs", f"{t}row"], [f"{t}nibbles"], name=f"{t}nibbles"),
        helper.make_node("Slice", [f"{t}nibbles", f"{t}start", f"{t}count"], [f"{t}values"], name=f"{t}values"),
        helper.make_node("Cast", [f"{t}values"], [f"{t}float"], name=f"{t}cast_float", to=TensorProto.FLOAT),
        helper.make_node("Sub", [f"{t}float", f"{t}offset"], [f"{t}signed"], name=f"{t}signed"),
        helper.make_node("Reshape", [f"{t}signed", f"{t}shape"], [f"{t}q"], name=f"{t}q"),
        helper.make_node("Mul", [f"{t}q", f"{t}scale"], [output], name=f"{t}dequantized"),
    ]
    return nodes, inits


def _weight_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of a layer's weight (Conv: 0; Gemm: 0 with transB, else 1; MatMul: 1)."""
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1 if node.op_type == "MatMul" else 0


def _set_axis(node: onnx.NodeProto, axis: int) -> None:
    for a in node.attribute:
        if a.name == "axis":
            a.i = axis
            return
    node.attribute.append(helper.make_attribute("axis", axis))
