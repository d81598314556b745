"""Which recipes ``[quantization] recipes = "auto"`` (the default) tries on a model.

The static presets of :data:`~tuneqn.controller.config.AUTO_RECIPES` (per-tensor / per-channel weights ×
min/max / percentile activation ranges), plus ``dynamic`` when the model is MatMul/Gemm-heavy: at least
:data:`DYNAMIC_SHARE` of the weight bytes of its searched layers (``search.layer_op_types``) belong to
MatMul/Gemm nodes (weights = constant inputs). The recipe gate (:mod:`tuneqn.controller.search.gate`) then
narrows them per model on the fully quantized models' results.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tuneqn.controller.config import AUTO_DYNAMIC, AUTO_RECIPES

#: ``dynamic`` joins auto when MatMul/Gemm hold at least this share of the searched layers' weight bytes.
DYNAMIC_SHARE = 0.5
#: Store meta key: ``{"auto": bool, "models": {model: [recipes]}, "notes": {model: str}}`` (Study.prepare).
META = "recipe_selection"


def matmul_share(model_path: Path, op_types: Iterable[str]) -> float:
    """Share of the weight bytes of the nodes of ``op_types`` that belong to MatMul/Gemm (0 without weights)."""
    import onnx  # noqa: PLC0415 - only when preparing a study
    from onnx import numpy_helper  # noqa: PLC0415

    model = onnx.load(str(model_path), load_external_data=False)
    sizes = {i.name: numpy_helper.to_array(i).nbytes if not i.external_data else 0 for i in model.graph.initializer}
    for node in model.graph.node:  # Constant nodes hold weights too
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    sizes[node.output[0]] = numpy_helper.to_array(attr.t).nbytes
    wanted = set(op_types)
    total = mm = 0
    for node in model.graph.node:
        if node.op_type not in wanted:
            continue
        nbytes = sum(sizes.get(name, 0) for name in node.input[1:2])  # the weight input
        if node.op_type == "MatMul":
            nbytes = max(nbytes, sizes.get(node.input[0], 0))
        total += nbytes
        if node.op_type in ("MatMul", "Gemm"):
            mm += nbytes
    return mm / total if total else 0.0


def auto_recipes(model_path: Path, op_types: Iterable[str]) -> tuple[list[str], str]:
    """The recipes auto tries on a model and a one-line note saying why ``dynamic`` is in or out."""
    share = matmul_share(model_path, op_types)
    recipes = list(AUTO_RECIPES)
    if share >= DYNAMIC_SHARE:
        recipes.append(AUTO_DYNAMIC)
        return recipes, (
            f"dynamic included: MatMul/Gemm hold {share:.0%} of the searched layers' weight bytes "
            f"(≥ {DYNAMIC_SHARE:.0%})"
        )
    return recipes, (
        f"dynamic left out: MatMul/Gemm hold {share:.0%} of the searched layers' weight bytes (< {DYNAMIC_SHARE:.0%})"
    )
