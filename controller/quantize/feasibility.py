"""Feasibility planning: which recipe runs on a device that cannot run every ONNX op type.

A device whose ``Device.supported_ops`` is non-empty (a TVM agent: the ops its ONNX frontend
imports) can run only candidates whose op types (every node of the built model) are in that
set. With ``[evaluation] feasibility = "adapt"`` the orchestrator decides per (model, recipe,
device class) from the recipe's *fully quantized* candidate — its quantized op types are a
superset of the recipe's other candidates' — what runs there:

* the recipe itself, when its fully quantized candidate fits;
* else a *variant* recipe (:func:`next_recipe`): ``<recipe>.qdq`` when the recipe is QOperator and
  the device has QuantizeLinear/DequantizeLinear ("pick the format it can"), else
  ``<recipe>.float-<Op>-…``, the recipe with the float op types of the unsupported quantized ops
  left out of quantization ("exclude the op types it cannot run"); the variant's own fully
  quantized candidate is checked the same way, again while something changes;
* the recipe itself after giving up (nothing left to change): its candidates are then reported
  infeasible by the device.

This module holds the pure parts (op types, the next recipe, descriptions); the orchestrator
runs the builds and keeps the decisions in the store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import onnx

from tuneqn.controller.config import VARIANT_FLOAT, QuantizationSpec, variant_name

#: Quantized op types and the float op each replaces, for nodes that do not keep the float node's
#: name (tuneqn restores the names the quantizers change, so most are found by name instead).
#: ONNX Runtime's registries map float ops to quantizer classes, not to the op types they write.
QUANTIZED_TO_FLOAT: dict[str, str] = {
    "QLinearConv": "Conv",
    "ConvInteger": "Conv",
    "QLinearMatMul": "MatMul",
    "MatMulInteger": "MatMul",
    "QGemm": "Gemm",
    "QLinearAdd": "Add",
    "QLinearMul": "Mul",
    "QLinearConcat": "Concat",
    "QLinearGlobalAveragePool": "GlobalAveragePool",
    "QLinearAveragePool": "AveragePool",
    "QLinearSigmoid": "Sigmoid",
    "QLinearLeakyRelu": "LeakyRelu",
    "QLinearSoftmax": "Softmax",
    "QLinearWhere": "Where",
    "QAttention": "Attention",
}

#: What a device needs for the QDQ form.
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})

#: Decision statuses.
FEASIBLE, ADAPTED, GAVE_UP = "feasible", "adapted", "gave-up"


def _graph_ops(graph: onnx.GraphProto, out: set[str]) -> None:
    for node in graph.node:
        out.add(node.op_type)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _graph_ops(attr.g, out)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _graph_ops(g, out)


def model_op_types(path: Path) -> frozenset[str]:
    """The op types of every node of an ONNX model file (subgraphs included)."""
    ops: set[str] = set()
    _graph_ops(onnx.load(str(path), load_external_data=False).graph, ops)
    return frozenset(ops)


def ops_digest(ops: Iterable[str]) -> str:
    """A short digest of a set of supported op types (decisions are reused while it stays the same)."""
    return hashlib.sha256("\n".join(sorted(set(ops))).encode()).hexdigest()[:16]


def unsupported(op_types: Iterable[str], supported: frozenset[str]) -> list[str]:
    """The op types a device cannot run (sorted); none when ``supported`` is empty (no known restriction)."""
    if not supported:
        return []
    return sorted(set(op_types) - supported)


def float_ops_of(unsupported_ops: Iterable[str], candidate: Path, float_model: Path) -> tuple[set[str], list[str]]:
    """The float op types behind unsupported quantized op types, and the unsupported ops without one.

    A quantized node carries the name of the float node it replaces (tuneqn restores the names the
    quantizers change), so its float op type is read from the float model; nodes without such a
    name fall back to :data:`QUANTIZED_TO_FLOAT`. An unsupported op that is no quantized layer
    (QuantizeLinear, DynamicQuantizeLinear, a float op) cannot be left in float.
    """
    wanted = set(unsupported_ops)
    float_by_name = {n.name: n.op_type for n in onnx.load(str(float_model), load_external_data=False).graph.node}
    found: dict[str, set[str]] = {op: set() for op in wanted}
    for node in onnx.load(str(candidate), load_external_data=False).graph.node:
        if node.op_type not in wanted:
            continue
        float_op = float_by_name.get(node.name)
        if float_op is not None and float_op != node.op_type:
            found[node.op_type].add(float_op)
        elif node.op_type in QUANTIZED_TO_FLOAT:
            found[node.op_type].add(QUANTIZED_TO_FLOAT[node.op_type])
    floats = {f for ops in found.values() for f in ops}
    return floats, sorted(op for op, ops in found.items() if not ops)


def _split_float_suffix(recipe: str) -> tuple[str, tuple[str, ...]]:
    """``r.qdq.float-Add-Conv`` → (``r.qdq``, (Add, Conv)); a name without that suffix → (name, ())."""
    base, dot, suffix = recipe.rpartition(".")
    if dot and suffix.startswith(VARIANT_FLOAT):
        return base, tuple(suffix[len(VARIANT_FLOAT) :].split("-"))
    return recipe, ()


def next_recipe(
    quantization: QuantizationSpec,
    recipe: str,
    unsupported_ops: list[str],
    supported: frozenset[str],
    candidate: Path,
    float_model: Path,
) -> str | None:
    """The variant of ``recipe`` to try when its fully quantized ``candidate`` has ``unsupported_ops``;
    None when nothing can change (give up).

    QOperator with QuantizeLinear/DequantizeLinear supported → ``<recipe>.qdq``; otherwise the float
    op types behind the unsupported quantized ops are left out of quantization
    (``<recipe>.float-<Op>-…``, merged with the float ops the recipe already leaves out).
    """
    from tuneqn.controller.quantize.quantizer import QuantSettings  # noqa: PLC0415 - ORT only where variants are planned

    resolved = quantization.resolve(recipe)
    if resolved.mode == "static" and resolved.format == "qoperator" and QDQ_OPS <= supported:
        return variant_name(recipe, qdq=True)
    floats, _ = float_ops_of(unsupported_ops, candidate, float_model)
    new = floats - set(resolved.exclude_op_types)
    if not new:
        return None
    base, already = _split_float_suffix(recipe)
    name = variant_name(base, float_ops=sorted({*already, *new}))
    try:
        QuantSettings.from_spec(quantization, name)
    except ValueError:  # every op type would be left in float: nothing to quantize
        return None
    return name


def describe(
    device: str,
    recipe: str,
    planned: str,
    status: str,
    unsupported_ops: list[str],
    tried: list[dict[str, Any]] | None = None,
) -> str:
    """One line saying what runs of a recipe on a device, e.g.
    ``pixel7: per-tensor-qop → per-tensor-qop.qdq: QLinearConv, QLinearAdd unsupported``."""
    ops = ", ".join(unsupported_ops)
    if status == ADAPTED:
        return f"{device}: {recipe} → {planned}: {ops} unsupported"
    if status == GAVE_UP:
        chain = " → ".join(str(t.get("recipe")) for t in tried or []) or recipe
        last = (tried or [{}])[-1]
        why = (
            f"{last.get('recipe')} does not build: {last['error']}"
            if last.get("error")
            else f"{', '.join(str(o) for o in (last.get('unsupported') or unsupported_ops))} unsupported"
        )
        return (
            f"{device}: {recipe} kept, no variant runs there ({chain}; {why}): "
            "its candidates are infeasible on this device"
        )
    return f"{device}: {recipe} runs as is"
