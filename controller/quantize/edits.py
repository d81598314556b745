"""Selectively quantized QDQ candidates by graph edits, and their exact file sizes, without the quantizer.

A candidate of a static QDQ recipe is what ONNX Runtime's ``quantize_static(..., nodes_to_exclude=X)``
writes. Its quantization artifacts (quantized weights, scales, zero points, int32 biases) are those of
the recipe's fully quantized model (same calibration cache, same settings), so a candidate is derived
from two files read once per (model, recipe) — the pre-processed float model and the fully quantized
model — by replaying the structural rules of ORT's QDQ quantizer for the exclusion set:

* the marking pass (``QDQQuantizer.quantize_model``): nodes in graph order, each non-excluded node of a
  quantized op type handled by its QDQ registry class: ``QDQOperatorBase`` (every float input and output),
  ``QDQConv``/``QDQGemm``/``QDQMatMul`` (input, output, weight per tensor or per channel, bias),
  ``QDQRemovableActivation`` (Relu/Clip: only when its input is already marked; then it is removed and its
  producer writes its output, when that producer's output has no other consumer), ``QDQDirect8BitOp`` and
  ``QDQMaxPool``/``QDQResize`` (Reshape, Flatten, AveragePool, …: the output shares its input's scale,
  only when the input is already marked), ``QDQSplit``, ``QDQGather``, ``QDQWhere``.
  Marking order matters: a conditional op sees only what earlier nodes marked;
* the emission passes: weights (DequantizeLinear of the quantized initializer), activations
  (QuantizeLinear + DequantizeLinear, consumers — excluded ones too — read the DequantizeLinear's output;
  a graph output keeps its name on the DequantizeLinear), shared-scale tensors, then biases; removed
  activations, unused initializers dropped; ORT's own topological sort (``ONNXModel.topological_sort``).

Exactness: an artifact is taken from the fully quantized model only when everything its bytes depend on
is what it was there (a weight's marking and per-channel axis and the biases that adjust its scale; a
bias's input and weight scales; an activation's own scale). Anything else — an artifact the fully
quantized model lacks (an activation that only a candidate quantizes with its own scale), a rule not
modelled (Pad, normalizations, …; shared biases; excluded Relu/Clip/Softmax,
which change calibration ranges; float16; pre-quantized inputs) — raises :class:`Unsupported`: the caller
then runs the quantizer for that candidate. When the index is built, the empty exclusion set is derived
and compared byte for byte with the fully quantized file: a mismatch (another ORT version, say) turns the
derivation off for that (model, recipe).

Bytes: a candidate file is ``ModelProto`` serialized, so it is assembled from pre-serialized pieces
(each node and initializer as its graph field: tag, varint length, payload) and its size is known exactly
by adding the pieces' lengths (plus the graph field's own tag and varint length) without building it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import onnx
from onnx import TensorProto
from onnxruntime.quantization.calibrate import load_tensors_data
from onnxruntime.quantization.operators.activation import QDQRemovableActivation
from onnxruntime.quantization.operators.conv import QDQConv
from onnxruntime.quantization.operators.direct_q8 import QDQDirect8BitOp
from onnxruntime.quantization.operators.gather import QDQGather
from onnxruntime.quantization.operators.gemm import QDQGemm, get_beta
from onnxruntime.quantization.operators.matmul import QDQMatMul
from onnxruntime.quantization.operators.maxpool import QDQMaxPool
from onnxruntime.quantization.operators.qdq_base_operator import QDQOperatorBase
from onnxruntime.quantization.operators.resize import QDQResize
from onnxruntime.quantization.operators.split import QDQSplit
from onnxruntime.quantization.operators.where import QDQWhere
from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
from onnxruntime.quantization.quant_utils import tensor_proto_to_array
from onnxruntime.quantization.registry import QDQRegistry

from tuneqn.controller.quantize.quantizer import (
    QTYPE,
    QuantSettings,
    default_op_types,
    quiet_ort_python_logs,
    static_extra_options,
)

__all__ = [
    "CandidateIndex",
    "Derivations",
    "Derived",
    "QdqIndex",
    "Unsupported",
    "unsupported_settings",
    "varint_size",
]

log = logging.getLogger(__name__)

_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16)
_DQ_OUT = "_DequantizeLinear_Output"
_Q_OUT = "_QuantizeLinear_Output"
_Q_IN = "_QuantizeLinear_Input"
#: Field numbers in onnx.proto.
_GRAPH_NODE, _GRAPH_NAME, _GRAPH_INIT, _MODEL_GRAPH = 1, 2, 5, 7
#: Which handler of ORT's QDQ registry a node gets (classes not listed here are not modelled).
_HANDLERS = {
    QDQOperatorBase: "base",
    QDQConv: "conv",
    QDQGemm: "gemm",
    QDQMatMul: "matmul",
    QDQRemovableActivation: "removable",
    QDQDirect8BitOp: "direct",
    QDQMaxPool: "maxpool",
    QDQResize: "resize",
    QDQSplit: "split",
    QDQGather: "gather",
    QDQWhere: "where",
}


class Unsupported(Exception):
    """This candidate cannot be derived exactly (the reason); build it with the quantizer."""


def varint_size(n: int) -> int:
    """Bytes of ``n`` as a protobuf varint."""
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field: tag, varint length, payload."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _handler(op_type: str) -> str:
    cls = QDQRegistry.get(op_type, QDQOperatorBase)
    kind = _HANDLERS.get(cls)
    if kind is None:
        raise Unsupported(f"{op_type} ({cls.__name__}) is not modelled")
    return kind


@dataclass
class _Mark:
    """A tensor marked for quantization (ORT's ``QDQTensorQuantInfo``)."""

    kind: str  # "act" | "weight"
    axis: int | None = None
    provider: str | None = None  # shared scale: the input whose scale this tensor uses


@dataclass
class _Replay:
    """The result of replaying ORT's QDQ quantizer on the float graph for one exclusion set."""

    nodes: list[tuple[int, str, tuple[str, ...], tuple[str, ...]]]  # (float index, base, inputs, outputs), pre-sort
    qdq: list[tuple[str, tuple[str, ...], tuple[str, ...], str]]  # (op, inputs, outputs, name) of new Q/DQ nodes
    inits: list[str]  # initializer names in ORT's order (before cleaning)
    weights: dict[str, tuple[object, ...]]  # quantized initializer -> what its artifacts depend on
    biases: dict[str, tuple[object, ...]]  # quantized bias -> what its artifacts depend on
    scales: dict[str, str]  # activation -> the scale initializer it uses


@dataclass
class Derived:
    """A derived candidate: its bytes as pieces (written with :meth:`write`) and its graph for inspection."""

    pieces: list[bytes]
    size: int
    nodes: list[onnx.NodeProto] = field(repr=False)
    initializer_names: set[str] = field(repr=False)

    @classmethod
    def of_model(cls, model: onnx.ModelProto) -> Derived:
        """A candidate given as a whole model (one piece: its serialization)."""
        data = model.SerializeToString()
        names = {i.name for i in model.graph.initializer}
        return cls([data], len(data), list(model.graph.node), names)

    def write(self, path: Path) -> None:
        """Write the candidate file atomically (``path`` + ``.part``, then renamed)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        with open(tmp, "wb") as f:
            f.writelines(self.pieces)
        os.replace(tmp, path)

    def to_bytes(self) -> bytes:
        """The whole file's bytes."""
        return b"".join(self.pieces)

    def sha256(self) -> str:
        """sha256 of the file's bytes (hex)."""
        h = hashlib.sha256()
        for piece in self.pieces:
            h.update(piece)
        return h.hexdigest()


class QdqIndex:
    """The float and fully quantized QDQ models of one (model, recipe), indexed once; candidates derived from
    them (:meth:`derive`) and their sizes (:meth:`size`) in milliseconds.

    Thread-safe for concurrent :meth:`derive` calls (its caches only grow, under a lock)."""

    def __init__(
        self,
        float_model: onnx.ModelProto,
        fq_model: onnx.ModelProto,
        fq_bytes: bytes,
        calib_cache: Path,
        settings: QuantSettings,
    ) -> None:
        why = unsupported_settings(settings)
        if why is not None:
            raise Unsupported(why)
        self.settings = settings
        self._lock = threading.Lock()
        g, fg = float_model.graph, fq_model.graph
        self._op_types = set(settings.op_types or default_op_types("static"))
        self._calib_cache = Path(calib_cache)
        self._calibrated = set(load_tensors_data(calib_cache).keys())
        self._float_model = float_model
        self._ort: QDQQuantizer | None = None  # ORT's own numerics, for artifacts the fully quantized model lacks
        self._own: dict[tuple[str, tuple[object, ...]], onnx.TensorProto] = {}
        self._opset = next((o.version for o in fq_model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self._check_float(float_model)
        # the float graph as ORT's quantizer sees it
        self._float_nodes = list(g.node)
        self._inputs = [tuple(n.input) for n in g.node]
        self._outputs = [tuple(n.output) for n in g.node]
        self._float_inits = {i.name: i for i in g.initializer}
        self._float_init_order = [i.name for i in g.initializer]
        self._graph_inputs = [i.name for i in g.input]
        self._graph_outputs = {o.name for o in g.output}
        # value_info of the shape-inferred float model: the fully quantized model keeps it unchanged
        self._value_types = {
            v.name: v.type.tensor_type.elem_type
            for v in (*fg.value_info, *fg.output, *fg.input)
            if v.type.HasField("tensor_type")
        }
        self._producers: dict[str, list[int]] = {}
        for i, outs in enumerate(self._outputs):
            for name in outs:
                self._producers.setdefault(name, []).append(i)
        self._consumers: dict[str, int] = {}
        for ins in self._inputs:
            for name in ins:
                if name:
                    self._consumers[name] = self._consumers.get(name, 0) + 1
        # the fully quantized model's pieces
        self._fq_nodes = {n.name: n for n in fg.node}
        self._fq_inits = {i.name: i for i in fq_model.graph.initializer}
        self._piece: dict[tuple[object, ...], bytes] = {}  # initializer pieces
        self._node_pieces: dict[tuple[object, ...], tuple[bytes, onnx.NodeProto]] = {}
        self._head, self._tail = _model_frame(fq_model)
        self._graph_head, self._graph_tail = _graph_frame(fg)
        self._fq = self._replay(frozenset())
        derived = self.derive(())
        if derived.to_bytes() != fq_bytes:
            raise Unsupported("the rules do not reproduce this fully quantized model byte for byte")

    @classmethod
    def load(cls, float_path: Path, fq_path: Path, calib_cache: Path, settings: QuantSettings) -> QdqIndex:
        """Index the float model, its fully quantized model and the calibration cache they came from."""
        fq_bytes = Path(fq_path).read_bytes()
        fq = onnx.load_from_string(fq_bytes)
        return cls(onnx.load(str(float_path)), fq, fq_bytes, calib_cache, settings)

    def _check_float(self, model: onnx.ModelProto) -> None:
        g = model.graph
        names = [n.name for n in g.node]
        if any(not n for n in names) or len(set(names)) != len(names):
            raise Unsupported("node names are not unique")
        if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.node):
            raise Unsupported("the float model has Q/DQ nodes")
        if any(i.data_type != TensorProto.FLOAT and i.data_type in _FLOATS for i in g.initializer) or any(
            v.type.tensor_type.elem_type == TensorProto.FLOAT16 for v in (*g.value_info, *g.input, *g.output)
        ):
            raise Unsupported("float16 tensors")
        if {i.name for i in g.initializer} & {i.name for i in g.input}:
            raise Unsupported("initializers listed as graph inputs")
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
            raise Unsupported("subgraphs")

    # ------------------------------------------------------------------ the replay
    def _quantizable(self, name: str) -> bool:
        init = self._float_inits.get(name)
        if init is not None:
            return init.data_type in _FLOATS
        return self._value_types.get(name) in _FLOATS

    def _replay(self, exclude: frozenset[str]) -> _Replay:
        """ORT's ``QDQQuantizer.quantize_model`` on the float graph, structure only."""
        for node in self._float_nodes:
            if node.name in exclude and node.op_type in ("Clip", "Relu", "Softmax") and node.op_type in self._op_types:
                raise Unsupported(f"excluding {node.op_type} {node.name} changes calibrated ranges")
        outputs = [list(o) for o in self._outputs]
        renamed: dict[str, list[int]] = {}  # output name -> nodes renamed to write it
        marks: dict[str, _Mark] = {}
        biases: dict[str, tuple[str, str, str]] = {}  # bias -> (node, input, weight)
        removed: set[int] = set()
        handled: set[int] = set()
        per_channel = self.settings.per_channel
        symmetric = self.settings.activation_symmetric

        def act(name: str) -> None:
            if self._quantizable(name) and name not in marks:
                marks[name] = _Mark("act")

        def weight(name: str, default_axis: int) -> None:
            init = self._float_inits.get(name)
            if per_channel and init is not None:
                rank = len(init.dims)
                if -rank <= default_axis < rank:
                    if init.data_type in _FLOATS:
                        marks[name] = _Mark("weight", default_axis % rank)
                    return
            if self._quantizable(name) and name not in marks:
                marks[name] = _Mark("weight")

        def bias(node: onnx.NodeProto, name: str, inp: str, w: str) -> None:
            init = self._float_inits.get(name)
            if init is None or init.data_type not in _FLOATS:
                return
            if name in biases:
                raise Unsupported(f"bias {name} is shared")
            biases[name] = (node.name, inp, w)

        def shared(name: str, provider: str) -> None:
            if self._quantizable(name):
                marks[name] = _Mark("act", provider=provider)

        def marked(name: str) -> bool:
            return name in marks or name in biases

        for i, node in enumerate(self._float_nodes):
            if node.op_type not in self._op_types or node.name in exclude:
                continue
            kind = _handler(node.op_type)
            if kind == "gemm":
                handled.add(i)  # ORT sets its beta to 1 (the bias scale carries it)
            ins, outs = self._inputs[i], outputs[i]
            if kind == "base":
                for name in (*ins, *outs):
                    act(name)
            elif kind in ("conv", "gemm"):
                act(ins[0])
                act(outs[0])
                if kind == "conv":
                    axis = 0 if node.op_type == "Conv" else 1
                else:
                    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                    axis = 0 if trans_b else 1
                weight(ins[1], axis)
                if len(ins) == 3 and (kind == "conv" or ins[2] in self._float_inits):
                    bias(node, ins[2], ins[0], ins[1])
            elif kind == "matmul":
                for name in (*ins, *outs):
                    if name in self._float_inits:
                        weight(name, 1)
                    else:
                        act(name)
            elif kind == "removable":
                if not marked(ins[0]):
                    continue
                up, out = ins[0], outs[0]
                if not symmetric and self._replace_upstream(up, out, outputs, renamed):
                    marks.pop(up, None)
                    removed.add(i)
                else:
                    act(up)
                act(out)
            elif kind in ("direct", "maxpool", "resize"):
                if (kind == "maxpool" and self._opset < 12) or (kind == "resize" and self._opset < 11):
                    continue
                if marked(ins[0]):
                    shared(outs[0], ins[0])
            elif kind == "split":
                if not marked(ins[0]):
                    act(ins[0])
                for name in outs:
                    shared(name, ins[0])
            elif kind == "gather":
                init = self._float_inits.get(ins[0])
                if init is not None and init.data_type in _FLOATS:
                    act(ins[0])
                    shared(outs[0], ins[0])
                elif marked(ins[0]):
                    shared(outs[0], ins[0])
            elif kind == "where":
                if marked(ins[1]) and marked(ins[2]):
                    for name in outs:
                        act(name)
        return self._emit(marks, biases, removed, handled, outputs)

    def _replace_upstream(self, up: str, out: str, outputs: list[list[str]], renamed: dict[str, list[int]]) -> bool:
        """``QDQQuantizer.try_replacing_upstream_output``: the producer of ``up`` writes ``out`` instead."""
        if up not in self._calibrated:
            raise Unsupported(f"{up} has no calibrated range")
        if (
            out not in self._calibrated
            or self._consumers.get(up, 0) != 1
            or up in self._graph_outputs
            or up in self._graph_inputs
        ):
            return False
        for i in (*self._producers.get(up, ()), *renamed.get(up, ())):  # the nodes that write ``up`` now
            outs = outputs[i]
            for j, name in enumerate(outs):
                if name == up:
                    outs[j] = out
                    renamed.setdefault(out, []).append(i)
        return True

    def _emit(
        self,
        marks: dict[str, _Mark],
        biases: dict[str, tuple[str, str, str]],
        removed: set[int],
        handled: set[int],
        outputs: list[list[str]],
    ) -> _Replay:
        """ORT's emission passes: normal tensors, shared-scale tensors, biases."""
        rename_in: dict[str, str] = {}
        rename_out: dict[str, str] = {}
        qdq: list[tuple[str, tuple[str, ...], tuple[str, ...], str]] = []
        inits = list(self._float_init_order)
        have = set(inits)
        scale_of: dict[str, tuple[str, str]] = {}  # tensor -> (scale, zero point) names
        weights: dict[str, tuple[object, ...]] = {}

        def add(*names: str) -> None:
            for name in names:
                if name not in have:
                    have.add(name)
                    inits.append(name)

        def pair(t: str, scale: str, zp: str) -> None:
            q_in, dq_out = t, t + _DQ_OUT
            if t in self._graph_outputs:
                q_in, dq_out = t + _Q_IN, t
                rename_out[t] = q_in
            else:
                rename_in[t] = dq_out
            qdq.append(("QuantizeLinear", (q_in, scale, zp), (t + _Q_OUT,), t + "_QuantizeLinear"))
            qdq.append(("DequantizeLinear", (t + _Q_OUT, scale, zp), (dq_out,), t + "_DequantizeLinear"))
            scale_of[t] = (scale, zp)

        bias_of_weight: dict[str, list[tuple[str, str]]] = {}
        for b, (_node_name, inp, w) in biases.items():
            if inp in marks and inp in self._calibrated:  # ORT adjusts a weight's scale for these biases
                bias_of_weight.setdefault(w, []).append((b, inp))
        for t, m in list(marks.items()):
            if m.provider is not None:
                continue
            if t in self._float_inits:
                add(t + "_zero_point", t + "_scale", t + "_quantized")
                rename_in[t] = t + _DQ_OUT
                qdq.append(("DequantizeLinear*", (t,), (t + _DQ_OUT,), t + "_DequantizeLinear"))
                scale_of[t] = (t + "_scale", t + "_zero_point")
                weights[t] = (m.kind, m.axis, tuple(bias_of_weight.get(t, ())))
            else:
                if t not in self._calibrated:
                    raise Unsupported(f"{t} has no calibrated range")
                add(t + "_zero_point", t + "_scale")
                pair(t, t + "_scale", t + "_zero_point")
            del marks[t]
        while marks:
            progress = False
            for t, m in list(marks.items()):
                if m.provider in scale_of:
                    if t in self._float_inits:
                        raise Unsupported(f"{t}: an initializer sharing a scale (ORT refuses)")
                    del marks[t]
                    pair(t, *scale_of[m.provider])
                    progress = True
            if not progress:
                raise Unsupported("shared-scale tensors whose providers are never quantized (ORT loops)")
        bias_deps: dict[str, tuple[object, ...]] = {}
        for b, (node_name, inp, w) in biases.items():
            if w not in scale_of or inp not in scale_of:
                raise Unsupported(f"bias {b}: its input or weight has no scale")
            add(b + "_quantized", b + "_quantized_scale", b + "_quantized_zero_point")
            have.discard(b)
            inits.remove(b)
            qdq.append(("DequantizeLinear*", (b,), (b,), b + "_DequantizeLinear"))
            bias_deps[b] = (node_name, scale_of[inp][0], scale_of[w][0])
        nodes = []
        for i in range(len(self._float_nodes)):
            if i in removed:
                continue
            ins = tuple(rename_in.get(x, x) for x in self._inputs[i])
            outs = tuple(rename_out.get(x, x) for x in outputs[i])
            nodes.append((i, "gemm" if i in handled else "float", ins, outs))
        return _Replay(
            nodes,
            qdq,
            inits,
            weights,
            bias_deps,
            {t: s for t, (s, _) in scale_of.items() if t not in self._float_inits},
        )

    # ------------------------------------------------------------------ candidates
    def derive(self, exclude: Iterable[str]) -> Derived:
        """The candidate that keeps ``exclude`` in float, as ORT's quantizer would write it."""
        r = self._replay(frozenset(exclude))
        own = self._artifacts(r)
        entries: list[tuple[tuple[str, ...], tuple[str, ...], tuple[object, ...]]] = []
        for i, base, ins, outs in r.nodes:
            entries.append((ins, outs, ("node", i, base, ins, outs)))
        for op, ins, outs, name in r.qdq:
            if op == "DequantizeLinear*":  # a weight's or a bias's: the fully quantized model's node
                fq = self._fq_nodes[name]
                entries.append((tuple(fq.input), tuple(fq.output), ("fq", name)))
            else:
                entries.append((ins, outs, ("qdq", op, ins, outs, name)))
        used = {x for ins, _, _ in entries for x in ins if x} | self._graph_outputs
        produced = {x for _, outs, _ in entries for x in outs}
        inits = [n for n in r.inits if n in used and n not in produced]
        order = _topological_order([(ins, outs) for ins, outs, _ in entries], sorted(inits + self._graph_inputs))
        with self._lock:
            node_pieces = [self._node_piece(entries[j][2]) for j in order]
            init_pieces = [self._init_piece(n, own.get(n)) for n in inits]
        graph_len = (
            sum(len(p) for p, _ in node_pieces)
            + len(self._graph_head)
            + sum(len(p) for p in init_pieces)
            + len(self._graph_tail)
        )
        graph_tag = _varint(_MODEL_GRAPH << 3 | 2) + _varint(graph_len)
        pieces = [
            self._head,
            graph_tag,
            *(p for p, _ in node_pieces),
            self._graph_head,
            *init_pieces,
            self._graph_tail,
            self._tail,
        ]
        size = len(self._head) + len(graph_tag) + graph_len + len(self._tail)
        return Derived(pieces, size, [n for _, n in node_pieces], set(inits))

    def size(self, exclude: Iterable[str]) -> int:
        """The candidate's file size in bytes (exact), without building it."""
        return self.derive(exclude).size

    def _artifacts(self, r: _Replay) -> dict[str, tuple[object, ...]]:
        """The initializers this candidate cannot take from the fully quantized model, each with what its bytes
        depend on (they are computed by ORT's own code: :meth:`_own_piece`). Every other quantization artifact
        is taken from the fully quantized model, where it depended on the same things."""
        own: dict[str, tuple[object, ...]] = {}
        for w, deps in r.weights.items():
            if self._fq.weights.get(w) != deps:
                raise Unsupported(
                    f"weight {w} is quantized differently than in the fully quantized model "
                    "(shared by an excluded layer)"
                )
        for t, scale in r.scales.items():
            if scale == t + "_scale" and scale not in self._fq_inits:  # quantized with its own scale only here
                own[t + "_scale"] = own[t + "_zero_point"] = ("activation", t)
        for b, deps in r.biases.items():
            if self._fq.biases.get(b) != deps:  # its input is quantized with another scale than there
                for suffix in ("_quantized", "_quantized_scale", "_quantized_zero_point"):
                    own[b + suffix] = ("bias", b, *deps)
        for name in r.inits:
            if name not in own and name not in self._float_inits and name not in self._fq_inits:
                raise Unsupported(f"{name} is not in the fully quantized model")
        return own

    def _numerics(self) -> QDQQuantizer:
        """ORT's QDQ quantizer on the float model with the recipe's settings and ranges (nothing quantized
        with it: its methods compute the artifacts the fully quantized model lacks). Built on first use."""
        if self._ort is None:
            s = self.settings
            model = onnx.ModelProto()
            model.CopyFrom(self._float_model)
            with quiet_ort_python_logs():
                self._ort = QDQQuantizer(
                    model,
                    s.per_channel,
                    s.reduce_range,
                    QTYPE[s.weight_type],
                    QTYPE[s.activation_type],
                    load_tensors_data(self._calib_cache),
                    [],
                    [],
                    sorted(self._op_types),
                    static_extra_options(s),
                )
        return self._ort

    def _own_tensor(self, name: str, key: tuple[object, ...]) -> onnx.TensorProto:
        """An artifact computed by ORT's code (``_make_scale_zp_initializers``, ``quantize_bias_static_impl``)."""
        got = self._own.get((name, key))
        if got is not None:
            return got
        q = self._numerics()
        made: list[onnx.TensorProto]
        if key[0] == "activation":
            t = str(key[1])
            inits = q._make_scale_zp_initializers(t, q.quantization_params[t].original)
            made = [inits.scale, inits.zero_point]
        else:
            b, node_name, input_scale, weight_scale = (str(k) for k in key[1:])
            node = next(n for n in self._float_nodes if n.name == node_name)
            beta = get_beta(node) if node.op_type == "Gemm" else 1.0
            x_scale = tensor_proto_to_array(self._tensor(input_scale, ("activation", input_scale[: -len("_scale")])))
            w_scale = tensor_proto_to_array(self._fq_inits[weight_scale])
            graph = q.model.model.graph
            q.quantize_bias_static_impl(b, x_scale, w_scale, beta)
            made = [copy for copy in (onnx.TensorProto() for _ in range(3))]
            for dst, src in zip(made, graph.initializer[-3:], strict=True):
                dst.CopyFrom(src)
            del graph.initializer[-3:]
        for tensor in made:
            self._own[(tensor.name, key)] = tensor
        return self._own[(name, key)]

    def _tensor(self, name: str, own_key: tuple[object, ...] | None) -> onnx.TensorProto:
        if name in self._float_inits:
            return self._float_inits[name]
        if name in self._fq_inits:
            return self._fq_inits[name]
        if own_key is None:
            raise Unsupported(f"{name} is not in the fully quantized model")
        return self._own_tensor(name, own_key)

    def _node_piece(self, key: tuple[object, ...]) -> tuple[bytes, onnx.NodeProto]:
        got = self._node_pieces.get(key)
        if got is None:
            node = self._make_node(key)
            got = (_field(_GRAPH_NODE, node.SerializeToString()), node)
            self._node_pieces[key] = got
        return got

    def _make_node(self, key: tuple[object, ...]) -> onnx.NodeProto:
        if key[0] == "fq":
            return self._fq_nodes[str(key[1])]
        if key[0] == "qdq":
            _, op, ins, outs, name = key
            return onnx.helper.make_node(str(op), list(ins), list(outs), str(name))  # type: ignore[call-overload]
        _, i, base, ins, outs = key
        src = self._float_nodes[int(i)]  # type: ignore[call-overload]
        if base == "float" and tuple(src.input) == ins and tuple(src.output) == outs:
            return src
        node = onnx.NodeProto()
        node.CopyFrom(src)
        if base == "gemm":  # operators.gemm.set_default_beta
            for a in node.attribute:
                if a.name == "beta":
                    a.f = 1.0
        del node.input[:]
        node.input.extend(ins)
        del node.output[:]
        node.output.extend(outs)
        return node

    def _init_piece(self, name: str, own_key: tuple[object, ...] | None) -> bytes:
        key = ("init", name, own_key)
        got = self._piece.get(key)
        if got is None:
            src = self._own_tensor(name, own_key) if own_key is not None else self._tensor(name, None)
            got = _field(_GRAPH_INIT, src.SerializeToString())
            self._piece[key] = got
        return got


def _model_frame(model: onnx.ModelProto) -> tuple[bytes, bytes]:
    """The model's fields before and after its graph, serialized."""
    head, tail = onnx.ModelProto(), onnx.ModelProto()
    for fd, _ in model.ListFields():
        if fd.number == _MODEL_GRAPH:
            continue
        dst = head if fd.number < _MODEL_GRAPH else tail
        _copy_field(model, dst, fd.name)
    return head.SerializeToString(), tail.SerializeToString()


def _graph_frame(graph: onnx.GraphProto) -> tuple[bytes, bytes]:
    """The graph's fields between its nodes and initializers (its name), and after its initializers."""
    head, tail = onnx.GraphProto(), onnx.GraphProto()
    for fd, _ in graph.ListFields():
        if fd.number in (_GRAPH_NODE, _GRAPH_INIT):
            continue
        if fd.number > _GRAPH_INIT:
            _copy_field(graph, tail, fd.name)
        elif fd.number == _GRAPH_NAME:
            _copy_field(graph, head, fd.name)
        else:
            raise Unsupported(f"graph field {fd.name} is not modelled")
    return head.SerializeToString(), tail.SerializeToString()


def _copy_field(src: onnx.ModelProto | onnx.GraphProto, dst: onnx.ModelProto | onnx.GraphProto, name: str) -> None:
    fd = src.DESCRIPTOR.fields_by_name[name]
    value = getattr(src, name)
    if fd.is_repeated:
        getattr(dst, name).extend(value)
    elif fd.message_type is not None:
        getattr(dst, name).CopyFrom(value)
    else:
        setattr(dst, name, value)


def _topological_order(nodes: list[tuple[tuple[str, ...], tuple[str, ...]]], sorted_inputs: list[str]) -> list[int]:
    """The node order of ``ONNXModel.topological_sort`` (ORT's quantizer sorts before it saves)."""
    deps_count = [0] * len(nodes)
    deps_to_nodes: dict[str, list[int]] = {}
    order: list[int] = []
    for idx, (ins, _) in enumerate(nodes):
        deps_count[idx] = sum(1 for x in ins if x)
        if deps_count[idx] == 0:
            order.append(idx)
            continue
        for x in ins:
            if x:
                deps_to_nodes.setdefault(x, []).append(idx)
    prev = None
    for name in sorted_inputs:
        if name == prev:
            continue
        prev = name
        for idx in deps_to_nodes.get(name, ()):
            deps_count[idx] -= 1
            if deps_count[idx] == 0:
                order.append(idx)
    start = 0
    while start < len(order):
        for out in nodes[order[start]][1]:
            for idx in deps_to_nodes.get(out, ()):
                deps_count[idx] -= 1
                if deps_count[idx] == 0:
                    order.append(idx)
        start += 1
    if len(order) != len(nodes):
        raise Unsupported("the graph is not a DAG")
    return order


def unsupported_settings(settings: QuantSettings) -> str | None:
    """Why candidates of a recipe are not derived by :class:`QdqIndex` (None: they are)."""
    if settings.mode != "static":
        return "dynamic quantization: the quantizer builds its candidates"
    if settings.format != "qdq":
        return f"{settings.format} format: not derived by the QDQ rules"
    if settings.activation_type not in ("int8", "uint8") or settings.weight_type not in ("int8", "uint8"):
        return "only 8-bit types are modelled"
    return None


class CandidateIndex(Protocol):
    """What :class:`Derivations` keeps per (model, recipe): candidates and their sizes from one fully quantized
    model (:class:`QdqIndex`; for QOperator recipes ``edits_qop.QOperatorEditor``), each raising
    :class:`Unsupported` where it cannot be exact."""

    def derive(self, exclude: Collection[str]) -> Derived: ...
    def size(self, exclude: Collection[str]) -> int: ...


class Derivations:
    """The :class:`CandidateIndex` of each (model, recipe) of a study, built once from its fully quantized model
    and kept while that model's build key holds (a study owns one; thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._indexes: dict[tuple[str, str], tuple[str, CandidateIndex | str]] = {}  # -> (fq key, index | why not)

    def index(self, model: str, recipe: str, fq_key: str, load: Callable[[], CandidateIndex]) -> CandidateIndex | None:
        """The index of (model, recipe) for the fully quantized model with build key ``fq_key``, made by ``load``
        the first time (None: ``load`` raised :class:`Unsupported`; the reason is logged once)."""
        with self._lock:
            held = self._indexes.get((model, recipe))
            if held is None or held[0] != fq_key:
                try:
                    got: CandidateIndex | str = load()
                except Unsupported as exc:
                    got = str(exc)
                    log.info("%s/%s: candidates built by the quantizer (%s)", model, recipe, got)
                held = (fq_key, got)
                self._indexes[(model, recipe)] = held
        return None if isinstance(held[1], str) else held[1]

    def ready(self, model: str, recipe: str, fq_key: str) -> CandidateIndex | str | None:
        """The index if it was built for ``fq_key``; the reason if it cannot be; None if not built yet."""
        with self._lock:
            held = self._indexes.get((model, recipe))
        return None if held is None or held[0] != fq_key else held[1]
