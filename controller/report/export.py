"""``tuneqn export``: one evaluated candidate out of a study folder, with the facts that make it trustworthy.

Read-only: the study's store is opened with :meth:`Store.open_readonly` and nothing in the folder is
written, so a moved, copied or read-only study exports from the folder it is given.  The exported
model is the evaluated candidate file (``DIR/candidates/<model>/<recipe>/<tag>.onnx``, checked against
the sha256 the store holds; nothing is re-quantized) with two changes:

* **A plain-session form.**  ONNX Runtime's session-time ``WeightBiasQuantization`` transformer
  quantizes the float weights of a Conv/ConvTranspose/Gemm whose input comes from a DequantizeLinear
  with a per-tensor (scalar) scale, so the candidate was evaluated with
  ``disabled_optimizers=["WeightBiasQuantization"]``.  Each such excluded layer gets its own
  DequantizeLinear with the same scale and zero point repeated along the channel axis (per-axis, the
  same arithmetic value by value): the transformer leaves a layer with a non-scalar input scale alone,
  so a plain ``onnxruntime.InferenceSession(path)`` runs it in float and computes the very outputs
  the candidate computed with the option.  When a layer cannot be rewritten (a scale that is not an
  initializer, opset < 13, no weight initializer), the file keeps the evaluated graph and the facts
  and the command's output name the session option it needs.
* **Facts** (:func:`facts`): candidate, sha256 of the evaluated file, recipe, float layers, metrics per
  device with n and the loss's 95 % interval, the session options and the tool versions, in
  ``FILE.json`` beside the model (with the written file's sha256) and, compactly, in the model's
  ``metadata_props`` (key ``tuneqn``).

Exports are bit-identical run to run: no time stamps, deterministic serialization.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tuneqn.controller.common.errors import StudyFailed, UserError
from tuneqn.controller.common.files import atomic_write_bytes, file_digest
from tuneqn.controller.common.versions import tool_versions
from tuneqn.controller.quantize.levels import runtime_float
from tuneqn.controller.quantize.quantizer import WBQ, runtime_options
from tuneqn.controller.report.answer import candidate_file, float_layers, layer_order, wilson_interval

log = logging.getLogger(__name__)

#: The ``metadata_props`` key holding the facts (compact JSON).
METADATA_KEY = "tuneqn"

_SUFFIX = "_tuneqn_float_in"


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _input_channels(node: onnx.NodeProto, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(axis, size) of the channel axis of a Conv/ConvTranspose/Gemm's input 0, from its weight's shape."""
    a = _attrs(node)
    if node.op_type == "Conv" and len(shape) >= 3:
        return 1, int(shape[1]) * int(a.get("group", 1))
    if node.op_type == "ConvTranspose" and len(shape) >= 3:
        return 1, int(shape[0])
    if node.op_type == "Gemm" and len(shape) == 2:
        return (0 if a.get("transA", 0) else 1), int(shape[1] if a.get("transB", 0) else shape[0])
    return None


def _weight_shape(
    name: str, inits: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]
) -> tuple[int, ...] | None:
    """The shape of a layer's weight: an initializer, one stored as fp16 behind a Cast, or int4 values unpacked
    and scaled (``Mul`` of a ``Reshape`` to a constant shape; precision levels)."""
    if name in inits:
        return tuple(inits[name].dims)
    p = producers.get(name)
    if p is not None and p.op_type == "Cast" and p.input[0] in inits:
        return tuple(inits[p.input[0]].dims)
    r = producers.get(p.input[0]) if p is not None and p.op_type == "Mul" else None
    if r is not None and r.op_type == "Reshape" and r.input[1] in inits:
        return tuple(int(d) for d in numpy_helper.to_array(inits[r.input[1]]))
    return None


def plain_form(model: onnx.ModelProto, excluded: list[str]) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """A copy of ``model`` in which ONNX Runtime keeps the ``excluded`` layers in float without session options.

    Returns (model, rewritten layers, layers still needing ``disabled_optimizers=[WeightBiasQuantization]``).
    Each rewritten layer reads a DequantizeLinear of its own whose scale and zero point are the shared
    one's, repeated along the input's channel axis (see the module docstring).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 0)
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    rewritten: list[str] = []
    remaining: list[str] = []
    inserts: dict[int, onnx.NodeProto] = {}
    wanted = set(excluded)
    for pos, node in enumerate(g.node):
        if node.name not in wanted or not runtime_options(model, [node.name]).get("ort_disabled_optimizers"):
            continue
        dq = producers[node.input[0]]
        scale = inits.get(dq.input[1])
        zp = inits.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        shape = _weight_shape(node.input[1], inits, producers)
        channels = None if shape is None else _input_channels(node, shape)
        if (
            opset < 13
            or scale is None
            or channels is None
            or numpy_helper.to_array(scale).size != 1
            or (len(dq.input) > 2 and dq.input[2] and zp is None)
        ):
            remaining.append(node.name)
            continue
        axis, size = channels
        s = numpy_helper.to_array(scale).reshape(())
        names = [f"{node.name}{_SUFFIX}_scale", f"{node.name}{_SUFFIX}_zero_point", f"{node.name}{_SUFFIX}"]
        g.initializer.append(numpy_helper.from_array(np.full(size, s, dtype=s.dtype), names[0]))
        dq_inputs = [dq.input[0], names[0]]
        if zp is not None:
            z = numpy_helper.to_array(zp).reshape(())
            g.initializer.append(numpy_helper.from_array(np.full(size, z, dtype=z.dtype), names[1]))
            dq_inputs.append(names[1])
        inserts[pos] = helper.make_node(
            "DequantizeLinear", dq_inputs, [names[2]], name=f"{node.name}{_SUFFIX}", axis=axis
        )
        node.input[0] = names[2]
        rewritten.append(node.name)
    if inserts:
        nodes = list(g.node)
        del g.node[:]
        for pos, node in enumerate(nodes):
            if pos in inserts:
                g.node.append(inserts[pos])  # right before its one consumer: topological order holds
            g.node.append(node)
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        unused = [n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] not in used]
        for n in unused:  # the shared DequantizeLinear when the float layer was its only reader
            g.node.remove(n)
    return out, rewritten, remaining


def needs_option(model: onnx.ModelProto, excluded: list[str]) -> list[str]:
    """The session option ``model`` needs so that ``excluded`` layers run in float (``[]``: none).

    Like :func:`tuneqn.controller.quantize.quantizer.runtime_options`, but a layer whose input DequantizeLinear has a
    per-axis scale is safe (the transformer requires a scalar one).
    """
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.name not in excluded or not runtime_options(model, [node.name]).get("ort_disabled_optimizers"):
            continue
        scale = inits.get(producers[node.input[0]].input[1])
        if scale is None or numpy_helper.to_array(scale).size == 1:
            return [WBQ]
    return []


@dataclass(frozen=True)
class Exported:
    """What :func:`export_candidate` wrote."""

    path: Path
    sidecar: Path
    sha256: str
    size_bytes: int
    plain: bool  # a plain InferenceSession keeps the float layers float
    facts: dict[str, Any]


def evaluated_file(study_dir: Path, cand: dict[str, Any]) -> Path:
    """The evaluated candidate file in ``study_dir``, checked against the store's sha256 (one-line error)."""
    rel = candidate_file({**cand, "recipe": cand.get("mode") or cand.get("recipe")})
    path = Path(study_dir) / rel
    rebuild = (
        "rebuild it with 'tuneqn tune' on the study (it rebuilds the candidates its searches evaluated "
        "and reuses their results; 'tuneqn analyze STUDY.toml --candidates' rebuilds the paper's)"
    )
    if not path.is_file():
        raise StudyFailed(f"{path}: the evaluated candidate {cand['id']} is missing; {rebuild}")
    sha, _ = file_digest(path)
    if sha != cand["sha256"]:
        raise StudyFailed(
            f"{path}: sha256 {sha[:12]}… is not the evaluated candidate's ({cand['sha256'][:12]}…): "
            f"the file changed since it was evaluated; {rebuild}"
        )
    return path


def metrics_of(report_cand: dict[str, Any] | None, labelled: int | None) -> list[dict[str, Any]]:
    """The candidate's full results per device: agreement, loss with n and 95 % interval, accuracy, latency."""
    out = []
    for r in (report_cand or {}).get("results") or []:
        if r.get("status") != "done" or r.get("agreement") is None:
            continue
        n = r.get("num_samples")
        loss = 1.0 - float(r["agreement"])
        ci = wilson_interval(round(loss * n), n) if isinstance(n, int) and n > 0 else None
        out.append(
            {
                "device": r.get("device"),
                "agreement": r["agreement"],
                "accuracy_loss": loss,
                "n": n,
                "loss_ci95": None if ci is None else [ci[0], ci[1]],
                "accuracy": r.get("accuracy"),
                "accuracy_n": labelled if r.get("accuracy") is not None else 0,
                "latency_ms": r.get("latency_ms"),
                "latency_p10_ms": r.get("latency_p10_ms"),
                "latency_p90_ms": r.get("latency_p90_ms"),
                "backend": r.get("backend"),
                "feasible": r.get("feasible"),
            }
        )
    return out


def facts(
    cand: dict[str, Any], report: dict[str, Any], plain: bool, disabled: list[str], pick: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The facts of an export (everything but the written file's own sha256)."""
    report_cand = next((c for c in report.get("candidates") or [] if c.get("id") == cand["id"]), None)
    labelled = (report.get("dataset") or {}).get("labelled_eval_samples")
    layers = float_layers({**cand, "recipe": cand["mode"]}, layer_order(report))
    if plain and cand.get("runtime", {}).get("ort_disabled_optimizers"):
        graph = (
            "rewritten for a plain session: each float layer reads its own per-channel DequantizeLinear "
            "(same scale and zero point), which ONNX Runtime's WeightBiasQuantization leaves alone; "
            "outputs equal the evaluated file's run with disabled_optimizers=['WeightBiasQuantization']"
        )
    else:
        graph = "the evaluated file's graph"
    out: dict[str, Any] = {
        "candidate": cand["id"],
        "model": cand["model"],
        "recipe": cand["mode"],
        "label": cand.get("label"),
        "k": cand.get("k"),
        "evaluated_file": candidate_file({**cand, "recipe": cand["mode"]}),
        "evaluated_sha256": cand["sha256"],
        "evaluated_size_bytes": cand.get("size_bytes"),
        "float_layers": layers,
        "levels": dict(sorted((cand.get("levels") or {}).items())),
        "graph": graph,
        "session_options": {"disabled_optimizers": disabled} if disabled else {},
        "load": (
            "onnxruntime.InferenceSession(path)"
            if not disabled
            else f"onnxruntime.InferenceSession(path, disabled_optimizers={disabled})"
        ),
        "metrics": metrics_of(report_cand, labelled),
        "dataset": {k: (report.get("dataset") or {}).get(k) for k in ("eval_samples", "labelled_eval_samples")},
        "versions": dict(tool_versions()),
    }
    if pick is not None:
        out["answer"] = {
            "scope": pick.get("scope"),
            "devices": pick.get("devices"),
            "met": pick.get("met"),
            "constraint": (report.get("answer") or {}).get("constraint"),
            "warnings": pick.get("warnings") or [],
        }
    return out


def export_candidate(
    study_dir: Path, cand: dict[str, Any], report: dict[str, Any], out: Path, pick: dict[str, Any] | None = None
) -> Exported:
    """Write the evaluated candidate ``cand`` (a store row) of ``study_dir`` to ``out`` with its facts
    (``out`` + ``.json`` and the model's metadata); see the module docstring."""
    src = evaluated_file(study_dir, cand)
    model = onnx.load_from_string(src.read_bytes())
    disabled = list((cand.get("runtime") or {}).get("ort_disabled_optimizers") or [])
    plain = True
    if disabled:
        floats = runtime_float(cand.get("excluded") or [], cand.get("levels") or {})
        rewritten, done, remaining = plain_form(model, floats)
        if remaining or needs_option(rewritten, floats):
            log.warning(
                "cannot rewrite %s for a plain session (%s); keeping the evaluated graph",
                cand["id"],
                ", ".join(remaining) or "?",
            )
            plain = False
        else:
            model = rewritten
            disabled = []
            log.info("%s: %d float layers rewritten for a plain session", cand["id"], len(done))
    info = facts(cand, report, plain, disabled, pick)
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(info, sort_keys=True, separators=(",", ":")))
    data = model.SerializeToString(deterministic=True)
    try:
        atomic_write_bytes(out, data)
    except OSError as exc:
        raise UserError(f"-o/--output: cannot write {out} ({exc.strerror or exc.__class__.__name__})") from None
    sha, size = file_digest(out)
    sidecar = out.with_name(out.name + ".json")
    atomic_write_bytes(
        sidecar,
        (
            json.dumps(
                {"file": out.name, "sha256": sha, "size_bytes": size, **info},
                indent=2,
                sort_keys=True,
                ensure_ascii=False,
            )
            + "\n"
        ).encode(),
    )
    return Exported(out, sidecar, sha, size, plain, info)


def describe(exp: Exported) -> list[str]:
    """What ``tuneqn export`` prints about an export."""
    f = exp.facts
    lines = [
        f"{exp.path}  sha256={exp.sha256}  size={exp.size_bytes}  candidate={f['candidate']} "
        f"({f['recipe']}, {f.get('label')}; evaluated sha256={f['evaluated_sha256']})",
        f"float layers ({len(f['float_layers'])}): " + (", ".join(f["float_layers"]) or "none"),
    ]
    if f.get("levels"):
        lines.append("precision levels: " + ", ".join(f"{layer} {lv}" for layer, lv in f["levels"].items()))
    for m in f["metrics"]:
        ci = m.get("loss_ci95")
        lines.append(
            f"  {m['device']}: agreement loss {100 * m['accuracy_loss']:.2f} % "
            + (f"(95 % interval {100 * ci[0]:.2f}–{100 * ci[1]:.2f} %, n = {m['n']})" if ci else "")
            + (f", latency {m['latency_ms']:.3g} ms" if m.get("latency_ms") is not None else "")
        )
    if f["session_options"]:
        lines.append(
            f"load it with onnxruntime.InferenceSession(path, disabled_optimizers="
            f"{f['session_options']['disabled_optimizers']}): without that option ONNX Runtime quantizes "
            "its float layers when loading it"
        )
    elif f["float_layers"]:
        lines.append(
            "load it with a plain onnxruntime.InferenceSession(path): its float layers stay float "
            "(no session option needed)"
        )
    lines.append(f"facts: {exp.sidecar} (also in the model's metadata_props['{METADATA_KEY}'])")
    return lines
