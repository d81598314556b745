"""Derived parts of the study report: objectives, feasibility, Pareto fronts, summary.

Pure: a base report (a dict) in, a finalized report (a new dict) out; no store, no files.
The *base report* comes from :func:`tuneqn.controller.report.base.build_base`; this
module never changes what is in it, it only adds keys.  Base shape::

    {"tuneqn_version": str, "generated_at": str, "partial": bool,
     "study": {"name": str, "out_dir": str, "settings": {...}},
     "objectives": [{"name": a name of tuneqn.controller.objectives.OBJECTIVES,
                     "direction": "min"|"max", "max": float|None, "min": float|None,
                     "unit": str, "label": str}],
     "devices": [{"name": str, "device_class": str, "info": {...}}],
     "models": [{"name", "source", "size_bytes", "sha256", "opset_original", "opset_used",
                 "upgraded": bool, ...}],
     "skipped_inputs": [{"file": str, "reason": str}],   # unreadable inputs left out
     "layers": [{"model", "mode", "name", "op_type", "index", "qdq_err", "xmodel_err",
                 "score", "rank"}],
     "baselines": [{"model", "device", "status", "accuracy": float|None,
                    "accuracy_top5": float|None, "latency_ms": float|None,
                    "latency_p10_ms": float|None, "latency_p90_ms": float|None,
                    "size_bytes": int, "error": str|None}],   # FP32 model on that device
     "candidates": [{"id": str, "model", "mode", "k": int|None, "kind": "ranked"|"explicit",
                     "label": str, "excluded": [layer names], "size_bytes": int, "sha256": str,
                     "results": [{"device", "status": "done"|"failed"|"unreachable"|"pending"|"running",
                                  "agreement": float|None, "accuracy": float|None,
                                  "accuracy_top5": float|None, "latency_ms": float|None,
                                  "latency_p10_ms": float|None, "latency_p90_ms": float|None,
                                  "error": str|None}]}]}

Objective values of a (candidate, device) result come from the one objectives table
(:data:`tuneqn.controller.objectives.OBJECTIVES`): ``accuracy_loss = 1 - agreement``
(top-1 agreement with the FP32 model on that device, the paper's metric),
``accuracy`` = top-1 vs labels, ``accuracy_top5``, ``size = size_bytes`` and
``latency = latency_ms`` (the median).  Non-finite values count as missing.

Latency within the measured noise is a tie.  Within one front computation (one
(model, mode, device), or one cross-device (model, mode)), the sorted results are taken
in order of median latency; a result whose median lies inside the [p10, p90] interval
of the fastest member of the current group joins that group, otherwise it starts a new
group; every member of a group gets the group's lowest median as its latency for
dominance (:func:`tuneqn.controller.report.pareto.latency_ties`).  ``objectives.latency``
stays the measured median.

:func:`finalize_report` returns a deep copy of the base with these additions:

* ``candidates[].results[]`` gain ``objectives`` ({objective name: value or None},
  for the study's objectives), ``feasible`` (True/False, or None when not evaluated),
  ``reason`` (why infeasible or not evaluated, else None), ``front``
  (1, 2, 3, or None: the result's front among its (model, mode, device) group) and
  ``latency_tied_ms`` (the latency the fronts used, see above; None when latency is no
  objective or the result was not sorted).
* ``fronts``: ``[{"model", "mode", "device", "fronts": [[candidate ids], ...]}]`` - up
  to three fronts per (model, mode, device), over results that are done and feasible.
* ``cross_device``: ``[{"model", "mode", "devices": [names], "fronts": [[ids], ...],
  "selected": id|None, "candidates": [{"id", "k", "label", "worst": {objective: value},
  "latency_tied_ms", "front": int|None}], "excluded": [{"candidate", "reason"}]}]`` - per
  (model, mode), over candidates done and feasible on every device that has any result
  for the model; each objective is the worst value over those devices (max for "min"
  objectives, min for "max" objectives).
* ``infeasible``: ``[{"candidate", "device", "reason"}]`` - every result that was not
  sorted into fronts (bounds violated, metric missing, failed, unreachable, not
  evaluated yet, or no result at all).  Feasible results beyond front 3 are not listed.
* ``summary``: per (model, mode, device), the paper's Tables I/II::

      {"model", "mode", "device", "selected": id|None, "selected_k": int|None,
       "selected_label": str|None, "fq_candidate": id|None,
       "accuracy_loss", "fq_accuracy_loss", "accuracy_loss_decrease_pct",
       "size_bytes", "fq_size_bytes", "original_size_bytes", "size_decrease_pct",
       "latency_ms", "fq_latency_ms", "original_latency_ms", "latency_decrease_pct",
       "accuracy", "fq_accuracy", "original_accuracy"}

  ``selected`` is the compromise member of front 1 (see
  :func:`tuneqn.controller.report.pareto.select_compromise`: closest to the ideal
  point after min-max normalizing each objective over front 1, ties to the lowest
  k).  The fully-quantized (FQ) candidate is the ranked candidate with ``k == 0``;
  "original" values are the FP32 model's (``models[].size_bytes`` and the FP32
  baseline on that device).  ``*_decrease_pct = 100 * (reference - selected) /
  reference`` with the FQ model as reference for accuracy loss and the original
  model for size and latency; None when a value is missing or the reference is 0.
  Accuracy losses are fractions (0.25 = 25 %), sizes bytes, latencies milliseconds.

Within a group, rows are ordered ranked candidates by ``k`` first, then explicit
candidates in report order; front member lists follow that order.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tuneqn.controller.objectives import Objective, finite, objective

from .pareto import latency_ties, select_compromise, to_minimization, top_fronts

logger = logging.getLogger(__name__)

#: How many fronts the report keeps (paper: the top three).
N_FRONTS = 3

#: Result statuses; "failed" and "unreachable" are final without a result.
STATUSES = ("done", "failed", "unreachable", "pending", "running")

_NO_RESULT_REASON = {"failed": "evaluation failed (no error message)", "unreachable": "device unreachable"}


@dataclass(frozen=True)
class _Objective:
    """An objective as the study uses it: the table entry, direction and feasibility bounds."""

    spec: Objective
    direction: str
    max: float | None
    min: float | None

    @property
    def name(self) -> str:
        return self.spec.name


def _fmt(value: float) -> str:
    """Short number for reasons: integers plainly, others with 6 significant digits."""
    v = float(value)
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.6g}"


def _parse_objectives(raw: Any) -> list[_Objective]:
    if not isinstance(raw, list) or not raw:
        raise ValueError("report 'objectives' must be a non-empty list")
    out: list[_Objective] = []
    seen: set[str] = set()
    for item in raw:
        if not isinstance(item, dict) or "name" not in item:
            raise ValueError(f"objective entry must be a dict with a 'name': {item!r}")
        name = item["name"]
        spec = objective(name)
        if name in seen:
            raise ValueError(f"objective {name!r} listed twice")
        seen.add(name)
        direction = item.get("direction") or spec.direction
        if direction not in ("min", "max"):
            raise ValueError(f"objective {name!r}: direction must be 'min' or 'max', got {direction!r}")
        if direction != spec.direction:
            logger.warning("objective %s is %s-imized against its natural direction", name, direction)
        bounds: dict[str, float | None] = {}
        for key in ("max", "min"):
            val = item.get(key)
            if val is not None and finite(val) is None:
                raise ValueError(f"objective {name!r}: bound {key!r} must be a finite number, got {val!r}")
            bounds[key] = finite(val)
        out.append(_Objective(spec, direction, bounds["max"], bounds["min"]))
    return out


def objective_value(name: str, candidate: dict[str, Any], result: dict[str, Any]) -> float | None:
    """Value of objective ``name`` for one (candidate, device) result, or None if missing."""
    return objective(name).value(candidate, result)


def _assess(objectives: list[_Objective], candidate: dict[str, Any], result: dict[str, Any]) -> None:
    """Fill ``objectives``, ``feasible``, ``reason`` and reset ``front`` of one result in place."""
    status = result.get("status")
    if status not in STATUSES:
        raise ValueError(f"candidate {candidate['id']!r} on {result.get('device')!r}: unknown status {status!r}")
    values = {o.name: o.spec.value(candidate, result) for o in objectives}
    result["objectives"] = values
    result["front"] = None
    result["latency_tied_ms"] = None
    if status == "done":
        reasons: list[str] = []
        for o in objectives:
            v = values[o.name]
            if v is None:
                reasons.append(o.spec.missing)
                continue
            if o.max is not None and v > o.max:
                reasons.append(f"{o.name} {_fmt(v)} > max {_fmt(o.max)}")
            if o.min is not None and v < o.min:
                reasons.append(f"{o.name} {_fmt(v)} < min {_fmt(o.min)}")
        if reasons and any(values[o.name] is None for o in objectives) and result.get("error"):
            reasons.append(str(result["error"]))  # why a metric is missing (e.g. the FP32 baseline failed)
        result["feasible"] = not reasons
        result["reason"] = "; ".join(reasons) if reasons else None
    elif status in _NO_RESULT_REASON:
        result["feasible"] = False
        result["reason"] = result.get("error") or _NO_RESULT_REASON[status]
    else:
        result["feasible"] = None
        result["reason"] = f"not evaluated ({status})"


def _ordered(cands: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ranked candidates by k, then explicit ones in their given order."""
    cands = list(cands)
    ranked = [c for c in cands if c.get("kind") == "ranked" and c.get("k") is not None]
    others = [c for c in cands if not (c.get("kind") == "ranked" and c.get("k") is not None)]
    return sorted(ranked, key=lambda c: int(c["k"])) + others


def _results_by_device(candidate: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in candidate.get("results") or []:
        dev = r.get("device")
        if dev in out:
            raise ValueError(f"candidate {candidate['id']!r} has two results for device {dev!r}")
        out[dev] = r
    return out


def _device_order(report: dict[str, Any], seen: Iterable[str]) -> list[str]:
    """Devices in the report's order, then any unknown ones in order of appearance."""
    seen_list = list(dict.fromkeys(seen))
    known = [d.get("name") for d in report.get("devices") or []]
    ordered = [d for d in known if d in seen_list]
    ordered += [d for d in seen_list if d not in ordered]
    return ordered


def _sort_fronts(
    vectors: list[dict[str, float]], noise: list[tuple[float | None, float | None]], objectives: list[_Objective]
) -> tuple[list[list[int]], np.ndarray, list[float] | None]:
    """Fronts (as row positions), the minimization table and the tied latencies of ``vectors``.

    ``noise`` is the (p10, p90) latency of each row; latencies within the noise of a faster
    row are ties (:func:`latency_ties`).  The tied latencies are None without a latency objective.
    """
    if not vectors:
        return [], np.zeros((0, len(objectives))), None
    values = {o.name: np.array([v[o.name] for v in vectors], dtype=float) for o in objectives}
    tied: list[float] | None = None
    if "latency" in values:
        tied = latency_ties(list(values["latency"]), [n[0] for n in noise], [n[1] for n in noise])
        values["latency"] = np.array(tied, dtype=float)
    F = to_minimization(values, {o.name: o.direction for o in objectives})
    return top_fronts(F, N_FRONTS), F, tied


def _noise(result: dict[str, Any]) -> tuple[float | None, float | None]:
    return finite(result.get("latency_p10_ms")), finite(result.get("latency_p90_ms"))


def _pct_decrease(reference: float | None, value: float | None) -> float | None:
    if reference is None or value is None or reference == 0:
        return None
    return 100.0 * (reference - value) / reference


def finalize_report(base: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of the base report with objectives, feasibility, fronts and summary added.

    See the module docstring for the exact keys.  Raises ``ValueError`` on a base
    report that is malformed (unknown objective, duplicate ids, unknown status...).
    """
    if not isinstance(base, dict):
        raise ValueError("base report must be a dict")
    report = copy.deepcopy(base)
    objectives = _parse_objectives(report.get("objectives"))
    candidates = report.get("candidates")
    if not isinstance(candidates, list):
        raise ValueError("report 'candidates' must be a list")

    ids: set[str] = set()
    for c in candidates:
        for key in ("id", "model", "mode"):
            if key not in c:
                raise ValueError(f"candidate without {key!r}: {c!r}")
        if c["id"] in ids:
            raise ValueError(f"duplicate candidate id {c['id']!r}")
        ids.add(c["id"])
        for r in c.get("results") or []:
            _assess(objectives, c, r)

    # Groups (model, mode) in order of first appearance.
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in candidates:
        groups.setdefault((c["model"], c["mode"]), []).append(c)
    model_devices: dict[str, list[str]] = {}
    for c in candidates:
        model_devices.setdefault(c["model"], []).extend(r.get("device") for r in c.get("results") or [])

    models_by_name = {m.get("name"): m for m in report.get("models") or []}
    baselines = {(b.get("model"), b.get("device")): b for b in report.get("baselines") or []}

    fronts_out: list[dict[str, Any]] = []
    infeasible: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    cross: list[dict[str, Any]] = []

    for (model, mode), members in groups.items():
        ordered = _ordered(members)
        by_dev = {c["id"]: _results_by_device(c) for c in ordered}
        group_devices = _device_order(report, (d for c in ordered for d in by_dev[c["id"]]))
        fq_list = [c for c in ordered if c.get("kind") == "ranked" and c.get("k") == 0]
        if len(fq_list) > 1:
            logger.warning("%s/%s: %d candidates with k == 0; using %s", model, mode, len(fq_list), fq_list[0]["id"])
        fq = fq_list[0] if fq_list else None

        for device in group_devices:
            rows: list[dict[str, Any]] = []
            vectors: list[dict[str, float]] = []
            noise: list[tuple[float | None, float | None]] = []
            for c in ordered:
                r = by_dev[c["id"]].get(device)
                if r is None:
                    infeasible.append({"candidate": c["id"], "device": device, "reason": "not evaluated (no result)"})
                elif r["status"] == "done" and r["feasible"]:
                    rows.append(c)
                    vectors.append(r["objectives"])
                    noise.append(_noise(r))
                else:
                    infeasible.append({"candidate": c["id"], "device": device, "reason": r["reason"]})
            fronts, F, tied = _sort_fronts(vectors, noise, objectives)
            if tied is not None:
                for i, c in enumerate(rows):
                    by_dev[c["id"]][device]["latency_tied_ms"] = tied[i]
            for n, front in enumerate(fronts, start=1):
                for i in front:
                    by_dev[rows[i]["id"]][device]["front"] = n
            fronts_out.append(
                {
                    "model": model,
                    "mode": mode,
                    "device": device,
                    "fronts": [[rows[i]["id"] for i in front] for front in fronts],
                }
            )
            selected = rows[select_compromise(F, fronts[0])] if fronts else None
            summary.append(
                _summary_entry(
                    model, mode, device, selected, fq, by_dev, models_by_name, baselines.get((model, device))
                )
            )

        cross.append(
            _cross_device(model, mode, ordered, by_dev, _device_order(report, model_devices[model]), objectives)
        )

    report["fronts"] = fronts_out
    report["cross_device"] = cross
    report["infeasible"] = infeasible
    report["summary"] = summary
    logger.info(
        "finalized report: %d candidates, %d groups, %d results outside fronts",
        len(candidates),
        len(fronts_out),
        len(infeasible),
    )
    return report


def _summary_entry(
    model: str,
    mode: str,
    device: str,
    selected: dict[str, Any] | None,
    fq: dict[str, Any] | None,
    by_dev: dict[str, dict[str, dict[str, Any]]],
    models_by_name: dict[str, dict[str, Any]],
    baseline: dict[str, Any] | None,
) -> dict[str, Any]:
    def metric(cand: dict[str, Any] | None, key: str) -> float | None:
        if cand is None:
            return None
        r = by_dev[cand["id"]].get(device)
        if r is None or r["status"] != "done":
            return None
        if key == "accuracy_loss":
            return objective_value("accuracy_loss", cand, r)
        return finite(r.get(key))

    def size(cand: dict[str, Any] | None) -> int | None:
        v = None if cand is None else finite(cand.get("size_bytes"))
        return None if v is None else int(v)

    model_info = models_by_name.get(model)
    if model_info is None:
        logger.warning("model %s is not in the report's models; original size unknown", model)
    original_size = size(model_info)
    original_latency = None if baseline is None else finite(baseline.get("latency_ms"))
    original_accuracy = None if baseline is None else finite(baseline.get("accuracy"))

    sel_loss, fq_loss = metric(selected, "accuracy_loss"), metric(fq, "accuracy_loss")
    sel_size = size(selected)
    sel_latency = metric(selected, "latency_ms")
    return {
        "model": model,
        "mode": mode,
        "device": device,
        "selected": None if selected is None else selected["id"],
        "selected_k": None if selected is None else selected.get("k"),
        "selected_label": None if selected is None else selected.get("label"),
        "fq_candidate": None if fq is None else fq["id"],
        "accuracy_loss": sel_loss,
        "fq_accuracy_loss": fq_loss,
        "accuracy_loss_decrease_pct": _pct_decrease(fq_loss, sel_loss),
        "size_bytes": sel_size,
        "fq_size_bytes": size(fq),
        "original_size_bytes": original_size,
        "size_decrease_pct": _pct_decrease(
            None if original_size is None else float(original_size), None if sel_size is None else float(sel_size)
        ),
        "latency_ms": sel_latency,
        "fq_latency_ms": metric(fq, "latency_ms"),
        "original_latency_ms": original_latency,
        "latency_decrease_pct": _pct_decrease(original_latency, sel_latency),
        "accuracy": metric(selected, "accuracy"),
        "fq_accuracy": metric(fq, "accuracy"),
        "original_accuracy": original_accuracy,
    }


def _cross_device(
    model: str,
    mode: str,
    ordered: list[dict[str, Any]],
    by_dev: dict[str, dict[str, dict[str, Any]]],
    devices: list[str],
    objectives: list[_Objective],
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    worst: list[dict[str, float]] = []
    noise: list[tuple[float | None, float | None]] = []
    excluded: list[dict[str, Any]] = []
    for c in ordered:
        reasons: list[str] = []
        for device in devices:
            r = by_dev[c["id"]].get(device)
            if r is None:
                reasons.append(f"{device}: not evaluated (no result)")
            elif not (r["status"] == "done" and r["feasible"]):
                reasons.append(f"{device}: {r['reason']}")
        if reasons or not devices:
            excluded.append({"candidate": c["id"], "reason": "; ".join(reasons) or "no device results"})
            continue
        vec: dict[str, float] = {}
        row_noise: tuple[float | None, float | None] = (None, None)
        for o in objectives:
            vals = [by_dev[c["id"]][d]["objectives"][o.name] for d in devices]
            pick = max if o.direction == "min" else min
            at = pick(range(len(devices)), key=lambda i: vals[i])
            vec[o.name] = vals[at]
            if o.name == "latency":  # the noise of the device that gave the worst latency
                row_noise = _noise(by_dev[c["id"]][devices[at]])
        rows.append(c)
        worst.append(vec)
        noise.append(row_noise)
    fronts, F, tied = _sort_fronts(worst, noise, objectives)
    front_of = {i: n for n, front in enumerate(fronts, start=1) for i in front}
    return {
        "model": model,
        "mode": mode,
        "devices": devices,
        "fronts": [[rows[i]["id"] for i in front] for front in fronts],
        "selected": rows[select_compromise(F, fronts[0])]["id"] if fronts else None,
        "candidates": [
            {"id": c["id"], "k": c.get("k"), "label": c.get("label"), "worst": worst[i],
             "latency_tied_ms": None if tied is None else tied[i], "front": front_of.get(i)}
            for i, c in enumerate(rows)
        ],
        "excluded": excluded,
    }
