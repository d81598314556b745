"""Static QOperator candidates by graph edits on the fully quantized model (no quantizer run).

ONNX Runtime's QOperator quantizer walks the float nodes in order with a map ``tensor → (quantized
name, scale, zero point)`` and appends what each node becomes. :class:`QOperatorEditor` replays that
walk symbolically for an exclusion list, taking every quantized operator, weight, bias and scale
from the fully quantized model ``fq`` of the same recipe, so it never quantizes anything itself:

* an excluded node (and any node ONNX Runtime would not quantize) is emitted as in the float model,
  after a ``<x>_DequantizeLinear`` (output ``x``) for each input that is quantized and not yet float;
* a quantized operator (QLinearConv, QGemm, QLinearMatMul, QLinearAdd/Mul, QLinearConcat,
  QLinearSigmoid/LeakyRelu, QLinearAveragePool) reading a float tensor ``x`` gets ``<x>_QuantizeLinear`` (output
  ``x_quantized``, ``x_scale``/``x_zero_point``) in front of it;
* Relu/Clip fused into a quantized producer come back when the producer is float; MaxPool, Reshape,
  Flatten, (Un)Squeeze, Transpose and GlobalAveragePool stay quantized only while their input is;
* graph outputs that are quantized get a DequantizeLinear at the end; initializers are the float
  model's still used (float order) followed by the created ones in creation order, as ONNX Runtime
  writes them; node names are the float names (as :func:`tuneqn.controller.quantize.quantizer.quantize_candidate`
  restores them).

The scale of a newly quantized tensor comes from ``fq`` (its own, or the one ONNX Runtime computed from
the same calibrated range: a fused Relu/Clip's input, a Reshape-like op's input). Whatever cannot be
derived exactly raises :class:`Unsupported`, and the caller runs the quantizer instead. The
editor checks itself once: with nothing excluded it must reproduce ``fq`` byte for byte.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import TensorProto, helper
from onnxruntime.quantization.calibrate import load_tensors_data
from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType
from onnxruntime.quantization.registry import QLinearOpsRegistry

from tuneqn.controller.quantize.edits import Derived, Unsupported
from tuneqn.controller.quantize.quantizer import QuantSettings

__all__ = ["QOperatorEditor", "derive_qoperator"]

log = logging.getLogger(__name__)

_MS = "com.microsoft"
#: Keys of the length-delimited fields the candidate's bytes are joined from (field number << 3 | 2).
_NODE, _INITIALIZER, _INPUT, _GRAPH = b"\x0a", b"\x2a", b"\x5a", b"\x3a"
_GRAPH_NAME, _GRAPH_INITIALIZER, _GRAPH_INPUT, _MODEL_GRAPH = 2, 5, 11, 7
_Q = "_quantized"


#: Quantized operators: the order in which ONNX Runtime creates their initializers ("out": output
#: scale/zero point, an int: that input (its QuantizeLinear parameters, or the quantized initializer
#: group "w" for an initializer input), "all": every input in order), where input i's
#: (quantized, scale, zero point) triple sits in the quantized node, and where its output's pair sits.
@dataclass(frozen=True)
class _Template:
    steps: tuple[str | int, ...]
    base: int  # slot of input 0's triple; input i at base + 3 i
    out: int  # slot of the output scale (zero point next)


_TEMPLATES = {
    "Conv": _Template(("out", 0, 1), 0, 6),
    "Gemm": _Template(("out", 0, 1), 0, 7),
    "MatMul": _Template((0, 1, "out"), 0, 6),
    "Add": _Template(("out", 0, 1), 0, 6),
    "Mul": _Template(("out", 0, 1), 0, 6),
    "Sigmoid": _Template(("out", 0), 0, 3),
    "LeakyRelu": _Template(("out", 0), 0, 3),
    "AveragePool": _Template(("out", 0), 0, 3),
    "Concat": _Template(("out", "all"), 2, 0),
    "GlobalAveragePool": _Template(("out",), 0, 3),
}
#: Ops ONNX Runtime leaves out when their input is quantized (the producer's output takes their place).
_FUSED = {"Relu", "Clip"}
#: Direct 8-bit ops: quantized (same scale as their input) exactly when their input is.
_DIRECT8 = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose", "MaxPool"}
#: Ops whose output holds the same values as their input (so the same calibrated range).
_SAME_VALUES = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose"}


@dataclass(frozen=True)
class _QV:
    q: str
    scale: str
    zp: str


@dataclass
class _Node:
    """One float node and what the fully quantized model made of it."""

    node: onnx.NodeProto
    kind: str  # "qop", "fused", "direct8", "float"
    qnode: onnx.NodeProto | None = None
    own: tuple[str, ...] = ()  # "w" group: initializers only this quantized node created (fq order)
    never: bool = False  # a conditional op ORT leaves float even with a quantized input


class _Run:
    """State of one replay."""

    def __init__(self, graph_inputs: Iterable[str]) -> None:
        self.qmap: dict[str, _QV] = {}
        self.generated: set[str] = set(graph_inputs)
        self.nodes: list[onnx.NodeProto] = []
        self.created: dict[str, onnx.TensorProto] = {}


class QOperatorEditor:
    """Index of one (float model, fully quantized QOperator model) pair; :meth:`derive` builds candidates."""

    def __init__(
        self,
        fq: onnx.ModelProto,
        float_model: onnx.ModelProto,
        calib_cache: Path | None = None,
        settings: QuantSettings | None = None,
    ) -> None:
        """Index ``fq`` (the fully quantized model of ``float_model``). With the recipe's ``settings`` and
        calibration cache, a tensor whose scale ``fq`` does not hold (a MaxPool's output after a float
        layer) gets it computed from its calibrated range as ONNX Runtime does; otherwise such a
        candidate raises :class:`Unsupported`."""
        self._fq_inits = {t.name: t for t in fq.graph.initializer}
        self._fq_pos = {t.name: i for i, t in enumerate(fq.graph.initializer)}
        self._float_inits = list(float_model.graph.initializer)
        self._float_init_names = {t.name for t in self._float_inits}
        self._float_inputs = list(float_model.graph.input)
        self._outputs = [o.name for o in fq.graph.output]
        fnodes = list(float_model.graph.node)
        names = [n.name for n in fnodes]
        if not all(names) or len(set(names)) != len(names):
            raise Unsupported("float model nodes without a name or with a duplicate name")
        self.names = set(names)
        self._producer = {o: n for n in fnodes for o in n.output}
        self._consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in fnodes:
            for i in n.input:
                self._consumers.setdefault(i, []).append(n)
        fq_by_name: dict[str, onnx.NodeProto] = {}
        for n in fq.graph.node:
            fq_by_name.setdefault(n.name, n)
        self._nodes = [self._classify(n, fq_by_name.get(n.name)) for n in fnodes]
        quantized_inits = {
            t for n in self._nodes if n.kind == "qop" for t in n.node.input if t in self._float_init_names
        }
        shared = sorted(t for t in quantized_inits if len(self._consumers.get(t, [])) > 1)
        if shared:
            raise Unsupported(f"initializer shared by several nodes and quantized: {shared[0]}")
        # The pieces of the candidate's bytes that do not depend on the exclusions, serialized once.
        self._init_bytes = {
            t.name: (t, _field(_INITIALIZER, t.SerializeToString()))
            for t in (*self._float_inits, *fq.graph.initializer)
        }
        self._input_bytes = {i.name: _field(_INPUT, i.SerializeToString()) for i in self._float_inputs}
        graph = fq.graph
        self._graph_name = _only(graph, lambda f: f == _GRAPH_NAME)
        self._graph_doc = _only(graph, lambda f: _GRAPH_INITIALIZER < f < _GRAPH_INPUT)
        self._graph_tail = _only(graph, lambda f: f > _GRAPH_INPUT)
        if any(_GRAPH_NAME < f.number < _GRAPH_INITIALIZER for f, _ in graph.ListFields()):
            raise Unsupported("graph fields between name and initializer")
        self._model_head = _only(fq, lambda f: f < _MODEL_GRAPH)
        # ORT adds the com.microsoft opset (at the end) only when the float model has none and emits such a node.
        self._ms_added = (
            not any(o.domain == _MS for o in float_model.opset_import)
            and bool(fq.opset_import)
            and fq.opset_import[-1].domain == _MS
        )
        self._model_tail_ms = _only(fq, lambda f: f > _MODEL_GRAPH)
        tail = onnx.ModelProto()
        tail.CopyFrom(fq)
        tail.ClearField("graph")
        if self._ms_added:
            del tail.opset_import[-1]
        self._model_tail = _only(tail, lambda f: f > _MODEL_GRAPH)
        self._ranges: dict[str, tuple[float, float]] | None = None
        if calib_cache is not None and settings is not None:
            self._load_ranges(calib_cache, settings)
        # Check: nothing excluded must give fq itself (this also learns which conditional ops never quantize).
        if self._derive((), learn=True).to_bytes() != fq.SerializeToString():
            raise Unsupported("the replay does not reproduce the fully quantized model")

    # ------------------------------------------------------------------ index
    def _classify(self, node: onnx.NodeProto, q: onnx.NodeProto | None) -> _Node:
        if q is None:
            if node.op_type in _FUSED:
                return _Node(node, "fused")
            raise Unsupported(f"{node.name}: {node.op_type} missing from the quantized model")
        if q.op_type == node.op_type and list(q.output) == list(node.output):
            return _Node(node, "float")
        if node.op_type in _DIRECT8 and q.op_type == node.op_type and q.output[0] == node.output[0] + _Q:
            return _Node(node, "direct8", q)
        tmpl = _TEMPLATES.get(node.op_type)
        if tmpl is None or not q.op_type.startswith(("QLinear", "QGemm")):
            raise Unsupported(f"{node.name}: {node.op_type} → {q.op_type} has no edit rule")
        act = {
            tmpl.base + 3 * i + k
            for i, t in enumerate(node.input)
            if t and t not in self._float_init_names
            for k in range(3)
        }
        out = {tmpl.out, tmpl.out + 1}
        own = [
            t
            for s, t in enumerate(q.input)
            if t and s not in act and s not in out and t in self._fq_inits and t not in self._float_init_names
        ]
        own.sort(key=self._fq_pos.__getitem__)
        return _Node(node, "qop", q, tuple(own))

    def _load_ranges(self, calib_cache: Path, settings: QuantSettings) -> None:
        """Calibrated ranges for scales ``fq`` lacks, kept only if they give every activation scale of ``fq``."""
        data = load_tensors_data(calib_cache)
        self._ranges = {name: (td.range_value[0], td.range_value[1]) for name, td in data.items()}
        self._qtype = TensorProto.UINT8 if settings.activation_type == "uint8" else TensorProto.INT8
        self._symmetric = settings.activation_symmetric
        activations = set(self._producer) | {i.name for i in self._float_inputs}
        for tensor in sorted(activations):
            if tensor + "_scale" not in self._fq_inits or tensor + "_zero_point" not in self._fq_inits:
                continue
            got = self._computed(tensor, set())
            if got is None or got != (self._fq_inits[tensor + "_zero_point"], self._fq_inits[tensor + "_scale"]):
                log.debug("calibration ranges do not give %s's scale: not used", tensor)
                self._ranges = None
                return

    def _computed(self, tensor: str, excluded: set[str]) -> tuple[TensorProto, TensorProto] | None:
        """``tensor``'s zero point and scale from its calibrated range (ORT's ``calculate_quantization_params``
        and ``_get_quantization_params``, with ``adjust_tensor_ranges``'s Relu/Clip rule)."""
        assert self._ranges is not None
        source = tensor
        consumers = self._consumers.get(tensor, [])
        if (
            len(consumers) == 1
            and consumers[0].op_type in _FUSED
            and consumers[0].name not in excluded
            and tensor in self._ranges
            and consumers[0].output[0] in self._ranges
        ):
            source = consumers[0].output[0]
        if source not in self._ranges:
            return None
        rmin, rmax = self._ranges[source]
        qmin, qmax = get_qmin_qmax_for_qType(self._qtype, reduce_range=False, symmetric=self._symmetric)
        zero, scale = compute_scale_zp(rmin, rmax, qmin, qmax, self._symmetric, None)
        zp = helper.make_tensor(tensor + "_zero_point", self._qtype, [], np.array([zero]).ravel().tolist())
        sc = helper.make_tensor(tensor + "_scale", TensorProto.FLOAT, [], np.array([scale]).reshape((-1,)).tolist())
        return zp, sc

    # ------------------------------------------------------------------ replay
    def derive(self, exclude: Collection[str]) -> Derived:
        """The candidate that keeps ``exclude`` (float node names) in float, as the Study writes it
        (:class:`edits.Derived`: its bytes, serialized once, with its nodes and initializer names)."""
        return self._derive(exclude)

    def derive_model(self, exclude: Collection[str]) -> onnx.ModelProto:
        """The candidate as a model."""
        return onnx.ModelProto.FromString(self.derive_bytes(exclude))

    def derive_bytes(self, exclude: Collection[str]) -> bytes:
        """The candidate's file contents (what ``onnx.save_model`` writes for :meth:`derive_model`'s model)."""
        return self._derive(exclude).to_bytes()

    def size(self, exclude: Collection[str]) -> int:
        """The candidate's exact file size."""
        return self._derive(exclude).size

    def _derive(self, exclude: Collection[str], learn: bool = False) -> Derived:
        excluded = set(exclude) & self.names  # ORT ignores names that are not nodes
        run = _Run(i.name for i in self._float_inputs if i.name not in self._float_init_names)
        for n in self._nodes:
            node = n.node
            if node.name in excluded or n.kind == "float" and (n.never or node.op_type not in QLinearOpsRegistry):
                self._emit_float(run, node, dq=True)
            elif n.kind == "qop":
                if node.op_type == "GlobalAveragePool" and node.input[0] not in run.qmap:
                    self._emit_float(run, node, dq=True)
                else:
                    self._emit_qop(run, n, excluded)
            elif n.kind == "fused":
                if node.input[0] in run.qmap:
                    run.qmap[node.output[0]] = run.qmap[node.input[0]]
                else:
                    self._emit_float(run, node, dq=True)
            elif n.kind == "direct8":
                qv = run.qmap.get(node.input[0])
                if qv is None:
                    self._emit_float(run, node, dq=False)
                else:
                    assert n.qnode is not None
                    new = onnx.NodeProto()
                    new.CopyFrom(n.qnode)
                    new.input[0] = qv.q
                    run.qmap[node.output[0]] = _QV(new.output[0], qv.scale, qv.zp)
                    self._append(run, [new])
            else:  # a conditional op the fully quantized model left float
                if node.input and node.input[0] in run.qmap:
                    if not learn:
                        raise Unsupported(f"{node.name}: would ONNX Runtime quantize this {node.op_type}?")
                    n.never = True
                self._emit_float(run, node, dq=True)
        for name in self._outputs:
            self._dequantize(run, name)
        return self._assemble(run)

    def _append(self, run: _Run, nodes: list[onnx.NodeProto]) -> None:
        run.nodes.extend(nodes)
        for n in nodes:
            run.generated.update(n.output)

    def _dequantize(self, run: _Run, name: str) -> None:
        qv = run.qmap.get(name)
        if qv is not None and name not in run.generated:
            self._append(
                run, [helper.make_node("DequantizeLinear", [qv.q, qv.scale, qv.zp], [name], name + "_DequantizeLinear")]
            )

    def _emit_float(self, run: _Run, node: onnx.NodeProto, dq: bool) -> None:
        if dq:
            for name in node.input:
                self._dequantize(run, name)
        self._append(run, [node])

    def _create(self, run: _Run, names: Iterable[str]) -> None:
        for name in names:
            if name not in run.created and name not in self._float_init_names:
                run.created[name] = self._fq_inits[name]

    def _emit_qop(self, run: _Run, n: _Node, excluded: set[str]) -> None:
        node, q = n.node, n.qnode
        assert q is not None
        tmpl = _TEMPLATES[node.op_type]
        new_nodes: list[onnx.NodeProto] = []
        triples: dict[int, _QV] = {}
        own_done = False

        def quantize_input(i: int) -> None:
            nonlocal own_done
            name = node.input[i]
            if not name:
                return
            if name in self._float_init_names:
                if not own_done:
                    self._create(run, n.own)
                    own_done = True
                return
            qv = run.qmap.get(name)
            if qv is None:
                zp, scale = self._params(run, name, excluded)
                qv = _QV(name + _Q, scale, zp)
                new_nodes.append(
                    helper.make_node("QuantizeLinear", [name, scale, zp], [qv.q], name + "_QuantizeLinear")
                )
                run.qmap[name] = qv
            triples[i] = qv

        if node.op_type == "GlobalAveragePool":
            triples[0] = run.qmap[node.input[0]]
        for step in tmpl.steps:
            if step == "out":
                consumers = self._consumers.get(node.output[0], [])
                if len(consumers) == 1 and consumers[0].op_type in _FUSED and consumers[0].name in excluded:
                    raise Unsupported(
                        f"{node.name}: its fused {consumers[0].op_type} is excluded (the output range changes)"
                    )
                self._create(run, sorted(q.input[tmpl.out : tmpl.out + 2], key=self._fq_pos.__getitem__))
            elif step == "all":
                for i in range(len(node.input)):
                    quantize_input(i)
            else:
                assert isinstance(step, int)
                if step < len(node.input):
                    quantize_input(step)
        if not own_done:
            self._create(run, n.own)
        new = onnx.NodeProto()
        new.CopyFrom(q)
        for i, qv in triples.items():
            s = tmpl.base + 3 * i
            if (q.input[s + 1], q.input[s + 2]) != (qv.scale, qv.zp) and not self._same(
                run, (q.input[s + 1], q.input[s + 2]), (qv.scale, qv.zp)
            ):
                raise Unsupported(f"{node.name}: input {node.input[i]} would get another scale")
            new.input[s], new.input[s + 1], new.input[s + 2] = qv.q, qv.scale, qv.zp
        if node.op_type == "GlobalAveragePool" and 0 in triples and q.input[3] == q.input[1]:
            new.input[3], new.input[4] = triples[0].scale, triples[0].zp  # no output range: the input's
        run.qmap[node.output[0]] = _QV(new.output[0], new.input[tmpl.out], new.input[tmpl.out + 1])
        self._append(run, [*new_nodes, new])

    def _same(self, run: _Run, a: tuple[str, str], b: tuple[str, str]) -> bool:
        def data(name: str) -> onnx.TensorProto:
            t = run.created.get(name) or self._fq_inits.get(name)
            if t is None:
                raise Unsupported(f"no initializer {name}")
            return t

        def strip(t: onnx.TensorProto) -> bytes:
            c = onnx.TensorProto()
            c.CopyFrom(t)
            c.ClearField("name")
            return c.SerializeToString(deterministic=True)

        return all(strip(data(x)) == strip(data(y)) for x, y in zip(a, b, strict=False))

    def _params(self, run: _Run, tensor: str, excluded: set[str]) -> tuple[str, str]:
        """Create ``tensor``'s zero point and scale (in ORT's order) as ORT computes them from its range."""
        zp, scale = tensor + "_zero_point", tensor + "_scale"
        try:
            src = self._param_source(tensor, excluded, depth=0)
        except Unsupported:
            computed = self._computed(tensor, excluded) if self._ranges is not None else None
            if computed is None:
                raise
            for t in computed:
                if t.name not in run.created and t.name not in self._float_init_names:
                    run.created[t.name] = t
            return zp, scale
        for name, from_name in ((zp, src + "_zero_point"), (scale, src + "_scale")):
            if name in run.created or name in self._float_init_names:
                continue
            if from_name == name:
                run.created[name] = self._fq_inits[name]
            else:
                t = onnx.TensorProto()
                t.CopyFrom(self._fq_inits[from_name])
                t.name = name
                run.created[name] = t
        return zp, scale

    def _param_source(self, tensor: str, excluded: set[str], depth: int) -> str:
        """A tensor of ``fq`` whose scale and zero point ORT computed from the same range as ``tensor``'s."""
        if depth > 64:
            raise Unsupported(f"no scale for {tensor}")
        consumers = self._consumers.get(tensor, [])
        adjusted_in_fq = len(consumers) == 1 and consumers[0].op_type in _FUSED
        if tensor + "_scale" in self._fq_inits and tensor + "_zero_point" in self._fq_inits:
            if adjusted_in_fq and consumers[0].name in excluded:
                raise Unsupported(f"{tensor}: its Relu/Clip is excluded (the range changes)")
            return tensor
        producer = self._producer.get(tensor)
        if producer is not None and producer.op_type in _FUSED:
            src = producer.input[0]
            if len(self._consumers.get(src, [])) == 1 and src + "_scale" in self._fq_inits:
                return src  # ORT gave the Relu/Clip's range to its input
        if producer is not None and producer.op_type in _SAME_VALUES:
            return self._param_source(producer.input[0], excluded, depth + 1)
        raise Unsupported(f"no scale for {tensor} in the quantized model")

    # ------------------------------------------------------------------ output
    def _assemble(self, run: _Run) -> Derived:
        """The candidate's serialized bytes, as ``SerializeToString`` writes them (fields in number order),
        joined from pieces serialized once (no weight is copied into a new message), with its nodes and
        initializer names."""
        used = {i for n in run.nodes for i in n.input}
        used.update(self._outputs)
        inputs = [i for i in self._float_inputs if i.name not in self._float_init_names or i.name in used]
        inits = [t for t in self._float_inits if t.name in used]
        inits += [t for name, t in run.created.items() if name in used]
        nodes = _topological_sort(run.nodes, [t.name for t in inits] + [i.name for i in inputs])
        parts = [_field(_NODE, n.SerializeToString()) for n in nodes]
        parts.append(self._graph_name)
        for t in inits:
            cached = self._init_bytes.get(t.name)
            parts.append(
                cached[1] if cached is not None and cached[0] is t else _field(_INITIALIZER, t.SerializeToString())
            )
        parts.append(self._graph_doc)
        parts += [self._input_bytes[i.name] for i in inputs]
        parts.append(self._graph_tail)
        ms = self._ms_added and any(n.domain == _MS for n in run.nodes)
        data = b"".join(
            (self._model_head, _field(_GRAPH, b"".join(parts)), self._model_tail_ms if ms else self._model_tail)
        )
        return Derived([data], len(data), nodes, {t.name for t in inits})


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return tag + _varint(len(payload)) + payload


def _only(message: Message, keep: Callable[[int], bool]) -> bytes:
    """``message`` serialized with only the fields whose number passes ``keep``."""
    part = type(message)()
    for field, value in message.ListFields():
        if keep(field.number):
            if isinstance(value, Message):
                getattr(part, field.name).CopyFrom(value)
            elif hasattr(value, "extend"):  # a repeated field
                getattr(part, field.name).extend(value)
            else:
                setattr(part, field.name, value)
    return part.SerializeToString()


def _topological_sort(nodes: list[onnx.NodeProto], input_names: list[str]) -> list[onnx.NodeProto]:
    """The node order ONNX Runtime's quantizer writes (``ONNXModel.topological_sort``, run when it saves)."""
    deps_count = [0] * len(nodes)
    deps_to_nodes: dict[str, list[int]] = {}
    ordered: list[onnx.NodeProto] = []
    for idx, node in enumerate(nodes):
        deps_count[idx] = sum(1 for i in node.input if i)
        if deps_count[idx] == 0:
            ordered.append(node)
            continue
        for name in node.input:
            if name:
                deps_to_nodes.setdefault(name, []).append(idx)
    for name in sorted(set(input_names)):
        for idx in deps_to_nodes.get(name, ()):
            deps_count[idx] -= 1
            if deps_count[idx] == 0:
                ordered.append(nodes[idx])
    start = 0
    while start < len(ordered):
        for output in ordered[start].output:
            for idx in deps_to_nodes.get(output, ()):
                deps_count[idx] -= 1
                if deps_count[idx] == 0:
                    ordered.append(nodes[idx])
        start += 1
    if len(ordered) != len(nodes):
        raise Unsupported("the candidate graph is not a DAG")
    return ordered


def derive_qoperator(
    fq: onnx.ModelProto,
    float_model: onnx.ModelProto,
    exclude: Collection[str],
    *,
    calib_cache: Path | None = None,
    settings: QuantSettings | None = None,
) -> onnx.ModelProto:
    """The QOperator candidate that keeps ``exclude`` (float node names) in float, derived from the fully
    quantized QOperator model ``fq`` of the same recipe by graph edits (bit-identical to ONNX Runtime's
    ``quantize_static(..., quant_format=QOperator, nodes_to_exclude=exclude)`` after tuneqn's name
    restoration); raises :class:`Unsupported` where that cannot be made exact. Build a
    :class:`QOperatorEditor` once to derive many candidates of one recipe."""
    return QOperatorEditor(fq, float_model, calib_cache, settings).derive_model(exclude)
