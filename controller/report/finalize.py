"""Derived parts of the study report: objectives, feasibility, Pareto fronts, summary, ablation.

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
     "dataset": {"eval_samples", "labelled_eval_samples", "calibration_samples", "analysis_samples",
                 "screen_samples", "preprocess": {...}, "preprocess_description": str|None},
     "layers": [{"model", "mode", "recipe", "name", "op_type", "index", "qdq_err", "xmodel_err",
                 "score", "rank"}],                      # the error analysis (paper ranking)
     "rankings": [{"model", "mode", "recipe", "name": "measured", "created_at",
                   "layers": [{"name", "gain", "overlap_gain", "bytes", "rank"}]}],
     "searches": [{"name": "sweep/paper"|"greedy/measured"|"budget30/measured"|"target1%/measured"|...,
                   "strategy", "ranking", "budget", "max_loss", "params": {...},
                   "started_at": float|None, "finished_at": float|None,   # unix seconds
                   "proposals": [{"candidate_id", "level": "build"|"screen"|"full", "model",
                                  "mode", "recipe", "label", "seq", "created_at"}]}],
     "baselines": [{"model", "device", "status", "accuracy": float|None,
                    "accuracy_top5": float|None, "latency_ms": float|None,
                    "latency_p10_ms": float|None, "latency_p90_ms": float|None,
                    "size_bytes": int, "error": str|None}],   # FP32 model on that device
     "candidates": [{"id": "model:recipe:fq" | "model:recipe:x<10 hex>", "model",
                     "mode": recipe name (kept for older readers), "recipe": the same,
                     "k": int (layers kept in float), "kind": "set"|"explicit",
                     "label": str, "excluded": [layer names], "size_bytes": int, "sha256": str,
                     "level": "full"|"screen"|"build",   # how far it got (see below)
                     "proposed_by": [{"search", "label", "level"}],
                     "results": [{"device", "status": "done"|"failed"|"unreachable"|"infeasible"|"pending"|"running",
                                  "agreement": float|None, "accuracy": float|None,
                                  "accuracy_top5": float|None, "latency_ms": float|None,
                                  "latency_p10_ms": float|None, "latency_p90_ms": float|None,
                                  "seconds": float|None, "finished_at": float|None,
                                  "num_samples": int|None, "error": str|None,
                                  "unsupported_ops": [op types] (infeasible: what the device cannot run),
                                  "backend": str|None, "compile_seconds": float|None,
                                  "tuning_seconds": float|None, "device_seconds": float|None,
                                  "tuned": bool|None, "untuned": bool (a TVM build without tuning),
                                  "compile_cache_hit": bool|None, "executed_on": str|None}],
                     "screening": [{"device", "status", "agreement", "accuracy", "num_samples",
                                    "seconds", "finished_at", "error"}]}],
     "feasibility": [{"model", "recipe", "device", "planned": recipe run there instead (or itself),
                      "status": "feasible"|"adapted"|"gave-up", "unsupported": [op types of the
                      recipe's fully quantized model the device lacks], "tried": [{"recipe",
                      "unsupported"}], "text": one line}],   # feasibility planning per device class
     "infeasible_by_device": [{"device", "candidates": [{"candidate", "model", "recipe", "label",
                               "unsupported_ops", "error"}]}],   # what a device could not run
     "recipe_selection": [{"model", "rule": str, "recipes": [{"recipe", "status": "searched"|"stopped"|"pending",
                           "reason": str, "fq_candidate": id, "devices": [{"device", "accuracy_loss",
                           "size_bytes", "n", "candidate", "error"}]}]}]}   # the recipe gate (recipes = "auto");
                                                                            # [] with explicit recipes

A candidate has ``results`` only on the devices its recipe is planned on (feasibility planning
runs a variant recipe instead on devices that cannot run it); without planning, on every device.
An ``infeasible`` result (the device cannot run the model, e.g. op types it cannot import) is
final, never retried and never on a front.

Levels: a *full* result is an evaluation on the whole evaluation sample with latency; a
*screening* result uses only its recipe's screening sample (``search.screen_samples`` samples
where the fully quantized model is weakest) and no latency (its agreement is against the FP32
full result's predictions on those samples, same device).  ``results``
hold full results only, ``screening`` the screening results.  A candidate's ``level`` is
``full`` when it has a full job or result or a search asked for it in full (then it has a
``results`` entry for every device), ``screen`` when it was only screened and ``build``
when it was only built (both with empty ``results``).  Only ``full`` candidates take part
in fronts, the summary, ``cross_device``, ``recipe_fronts`` and ``infeasible``: screening
results are never on a front.  A base without ``level`` counts as full.

Objective values of a (candidate, device) result come from the one objectives table
(:data:`tuneqn.controller.objectives.OBJECTIVES`): ``accuracy_loss = 1 - agreement``
(top-1 agreement with the FP32 model on that device, the paper's metric),
``accuracy`` = top-1 vs labels, ``accuracy_top5``, ``size = size_bytes`` and
``latency = latency_ms`` (the median).  Non-finite values count as missing.

Latency within the measured noise is a tie (:mod:`tuneqn.controller.search.ties`): two results' latencies
tie when their [p10, p90] intervals overlap, and one is better in latency only when its p90 is below
the other's p10.  Dominance is pairwise with that comparison (every other objective compares
exactly), so whether one result dominates another never depends on a third result or on the
order of the rows.  ``objectives.latency`` stays the measured median.

:func:`finalize_report` returns a deep copy of the base with these additions:

* ``candidates[].results[]`` gain ``objectives`` ({objective name: value or None},
  for the study's objectives), ``feasible`` (True/False, or None when not evaluated),
  ``reason`` (why infeasible or not evaluated, else None), ``front``
  (1, 2, 3, or None: the result's front among its (model, recipe, device) group) and
  ``recipe_front`` (the same among every recipe's results of (model, device)).
* ``fronts``: ``[{"model", "mode", "recipe", "device", "fronts": [[candidate ids], ...]}]``
  - up to three fronts per (model, recipe, device), over full results that are done and
  feasible.
* ``recipe_fronts``: ``[{"model", "device", "recipes": [names], "fronts": [[ids], ...],
  "selected": id|None}]`` - the same over every recipe of the model at once, so the
  recipe and the exclusion set that win on each device show side by side.
* ``cross_device``: ``[{"model", "mode", "recipe", "devices": [names], "fronts": [[ids], ...],
  "selected": id|None, "candidates": [{"id", "k", "label", "worst": {objective: value},
  "front": int|None}], "excluded": [{"candidate", "reason"}]}]`` - per
  (model, recipe), over candidates done and feasible on every device that has a result entry
  for the recipe (every device, unless feasibility planning runs another recipe on some); each
  objective is the worst value over those devices (max for "min"
  objectives, min for "max" objectives; the latency's p10–p90 is the one of the device with the
  worst median).
* ``infeasible``: ``[{"candidate", "device", "reason"}]`` - every full-level result that
  was not sorted into fronts (bounds violated, metric missing, failed, unreachable, not
  evaluated yet, or no result at all).  Feasible results beyond front 3 are not listed.
* ``summary``: per (model, recipe, device), the paper's Tables I/II::

      {"model", "mode", "recipe", "device", "selected": id|None, "selected_k": int|None,
       "selected_label": str|None, "fq_candidate": id|None,
       "accuracy_loss", "fq_accuracy_loss", "accuracy_loss_decrease_pct",
       "size_bytes", "fq_size_bytes", "original_size_bytes", "size_decrease_pct",
       "latency_ms", "fq_latency_ms", "original_latency_ms", "latency_decrease_pct",
       "accuracy", "fq_accuracy", "original_accuracy"}

  ``selected`` is the compromise member of front 1 (see
  :func:`tuneqn.controller.report.pareto.select_compromise`: closest to the ideal
  point after min-max normalizing each objective over front 1, ties to the lowest
  k).  The fully-quantized (FQ) candidate is the candidate with ``k == 0`` of that
  (model, recipe); "original" values are the FP32 model's (``models[].size_bytes`` and
  the FP32 baseline on that device).  ``*_decrease_pct = 100 * (reference - selected) /
  reference`` with the FQ model as reference for accuracy loss and the original
  model for size and latency; None when a value is missing or the reference is 0.
  Accuracy losses are fractions (0.25 = 25 %), sizes bytes, latencies milliseconds.
* ``answer``: which file to ship per (model, device) and across devices, under the study's
  constraint (``[answer]``): see :mod:`tuneqn.controller.report.answer`.
* ``ablation``: the ranking/strategy ablation, one row per (search, model, recipe, device)
  where the search asked for anything (the devices the recipe has results entries on), then one
  total row per search (``model``,
  ``recipe``, ``mode``, ``device`` and ``front`` None)::

      {"search", "model", "recipe", "mode", "device", "front": [ids]|None,
       "hypervolume": float, "hv_vs_sweep": float|None,
       "evaluations": int, "screenings": int, "builds": int, "seconds": float,
       "found_after_s": float|None, "front_done_after_s": float|None}

  ``front`` is the search's own top front: the non-dominated set of the done and feasible
  full results, on that device, of the candidates the search asked for in full (measured
  values, no latency ties: the hypervolume needs one point per result).  ``hypervolume``
  is that front's hypervolume (pymoo ``HV``) after min-max normalizing every objective
  (as minimized: "max" objectives negated) over ALL done full results of that (model,
  device) - every recipe, every search, feasible or not - so that numbers compare across
  searches and recipes; a constant objective normalizes to 0; the reference point is
  :data:`HV_REFERENCE` (1.1) in every normalized dimension, so an empty front has 0 and
  the best possible value is 1.1 ** (number of objectives).  ``hv_vs_sweep`` is the
  hypervolume divided by the one of :data:`SWEEP_SEARCH` (``sweep/paper``) on the same
  (model, recipe, device) (None without that search or when its hypervolume is 0).
  ``evaluations``/``screenings`` count the distinct candidates the search asked for in
  full / for screening in that (model, recipe) (a full evaluation runs on every device);
  ``builds`` the distinct candidates it asked for at any level (each one is built).
  ``seconds`` is the agent time it cost: the sum of the results' ``seconds`` (job wall
  time on the agent) of its full and screening requests on that device; a candidate
  several searches asked for counts for each of them (what the search would cost alone).
  ``found_after_s`` is when the last member of ``front`` got its full result and
  ``front_done_after_s`` when the last result (full or screening) of anything the search
  asked for arrived, both in seconds since the search's ``started_at`` (agents' clocks;
  a resumed study keeps its first start, so its pause counts).  A total row sums
  ``hypervolume`` and ``seconds`` over the search's rows, counts distinct candidates over
  all of them, takes the latest times, and its ``hv_vs_sweep`` is the ratio of the sums
  over the (model, recipe, device) the sweep also has.
* ``searches``: the base's searches, each with the totals of its ablation row
  (``hypervolume``, ``hv_vs_sweep``, ``evaluations``, ``screenings``, ``builds``,
  ``seconds``, ``found_after_s``, ``front_done_after_s``), ``recipes`` (those it asked for
  candidates of), ``recipe`` (the one of them when there is exactly one, else None) and,
  for ``target`` searches (None for others), ``targets``: per model ``{"model", "id",
  "recipe", "label", "size_bytes", "worst_agreement", "found_after_s", "parts", "devices"}`` -
  the smallest candidate the search evaluated in full whose accuracy loss ``1 - agreement`` is
  at most ``max_loss`` (within :data:`LOSS_TOLERANCE`) on every device of the model (ties: higher
  worst agreement), ``id`` None when there is none; ``found_after_s`` is when its last
  device's full result arrived.  A recipe that feasibility planning splits across the devices
  (its variant on some, :func:`tuneqn.controller.report.answer.split_parts`) has no candidate
  with results everywhere: there the target is one candidate per part (``parts``: ``[{"devices",
  "id", "recipe", "label", "size_bytes", "worst_agreement", "found_after_s"}]``, each the smallest
  of the part's recipe meeting ``max_loss`` on the part's devices), ``size_bytes`` the largest
  and ``worst_agreement`` the lowest over the parts, ``id``, ``recipe`` and ``label`` the part's
  with the largest file.
  ``devices``: per device ``{"device", "id", "recipe", "label", "size_bytes", "worst_agreement",
  "found_after_s"}``, the smallest candidate meeting ``max_loss``
  on that device alone.  ``target`` is that entry when the search has one model
  and found one, else None.  A target search's ``found_after_s`` is its latest target's
  (None while a model has none); other searches' is the latest of their rows'.

Within a group, rows are ordered search-proposed candidates by ``k`` first, then explicit
candidates in report order; front member lists follow that order.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from pymoo.indicators.hv import HV

from tuneqn.controller.objectives import Objective, finite, objective
from tuneqn.controller.search.ties import Latency
from tuneqn.controller.store import is_fully_quantized

from .answer import Constraint, build_answer, split_parts
from .pareto import select_compromise, to_minimization, top_fronts

logger = logging.getLogger(__name__)

#: How many fronts the report keeps (paper: the top three).
N_FRONTS = 3

#: Result statuses; "failed", "unreachable" and "infeasible" are final without a result.
STATUSES = ("done", "failed", "unreachable", "infeasible", "pending", "running")

_NO_RESULT_REASON = {
    "failed": "evaluation failed (no error message)",
    "unreachable": "device unreachable",
    "infeasible": "infeasible on this device",
}


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
    result["recipe_front"] = None
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
        if status == "infeasible" and result.get("unsupported_ops"):
            result["reason"] = f"infeasible on this device: unsupported {', '.join(result['unsupported_ops'])}"
    else:
        result["feasible"] = None
        result["reason"] = f"not evaluated ({status})"


def _is_set(c: dict[str, Any]) -> bool:
    """A candidate with a k: proposed by a search (``set``; ``ranked`` in reports before searches)."""
    return c.get("kind") in ("set", "ranked") and c.get("k") is not None


def _ordered(cands: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Search-proposed candidates by k (ties keep report order), then explicit ones in their given order."""
    cands = list(cands)
    sets = [c for c in cands if _is_set(c)]
    others = [c for c in cands if not _is_set(c)]
    return sorted(sets, key=lambda c: int(c["k"])) + others


def _evaluated(c: dict[str, Any]) -> bool:
    """True for a candidate evaluated (or to be evaluated) in full; screened-only ones are never on fronts."""
    level: str = c.get("level", "full")
    return level == "full"


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
    vectors: list[dict[str, float]], noise: list[Latency | None], objectives: list[_Objective]
) -> tuple[list[list[int]], np.ndarray]:
    """Fronts (as row positions) and the minimization table of ``vectors``.

    ``noise`` is each row's latency measurement (median and p10–p90); with a latency objective the
    fronts compare latencies by the tie rule of :mod:`tuneqn.controller.search.ties`.
    """
    if not vectors:
        return [], np.zeros((0, len(objectives)))
    values = {o.name: np.array([v[o.name] for v in vectors], dtype=float) for o in objectives}
    F = to_minimization(values, {o.name: o.direction for o in objectives})
    names = [o.name for o in objectives]
    latency = (names.index("latency"), noise) if "latency" in names else None
    return top_fronts(F, N_FRONTS, latency), F


def _device_fronts(
    ordered: list[dict[str, Any]],
    by_dev: dict[str, dict[str, dict[str, Any]]],
    device: str,
    objectives: list[_Objective],
    rank_key: str,
) -> tuple[list[dict[str, Any]], list[list[int]], np.ndarray]:
    """The top fronts on ``device`` over the candidates of ``ordered`` with a done and feasible result there.

    Returns those candidates, the fronts (as positions among them) and the minimization table; writes each
    front member's front number (1, 2, 3) into its result under ``rank_key``.
    """
    rows: list[dict[str, Any]] = []
    vectors: list[dict[str, float]] = []
    noise: list[Latency | None] = []
    for c in ordered:
        r = by_dev[c["id"]].get(device)
        if r is not None and r["status"] == "done" and r["feasible"]:
            rows.append(c)
            vectors.append(r["objectives"])
            noise.append(_noise(r))
    fronts, F = _sort_fronts(vectors, noise, objectives)
    for n, front in enumerate(fronts, start=1):
        for i in front:
            by_dev[rows[i]["id"]][device][rank_key] = n
    return rows, fronts, F


def _noise(result: dict[str, Any]) -> Latency | None:
    return Latency.of_result(result)


def _pct_decrease(reference: float | None, value: float | None) -> float | None:
    if reference is None or value is None or reference == 0:
        return None
    return 100.0 * (reference - value) / reference


def finalize_report(base: dict[str, Any], answer_constraint: Constraint | None = None) -> dict[str, Any]:
    """Return a copy of the base report with objectives, feasibility, fronts, summary and answer added.

    See the module docstring for the exact keys; ``answer_constraint`` replaces the study's constraint
    of the ``answer`` (:func:`tuneqn.controller.report.answer.build_answer`).  Raises ``ValueError`` on a base
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

    # Groups (model, recipe) in order of first appearance; screened-only candidates stay out of them.
    evaluated = [c for c in candidates if _evaluated(c)]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in evaluated:
        groups.setdefault((c["model"], c["mode"]), []).append(c)
    all_of_group: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in candidates:
        all_of_group.setdefault((c["model"], c["mode"]), []).append(c)
    model_devices: dict[str, list[str]] = {}
    for c in evaluated:
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
        fq_list = _ordered(c for c in all_of_group[(model, mode)] if is_fully_quantized(c))
        if len(fq_list) > 1:
            n, first = len(fq_list), fq_list[0]["id"]
            logger.warning("%s/%s: %d fully quantized candidates; using %s", model, mode, n, first)
        fq = fq_list[0] if fq_list else None
        if fq is not None and fq["id"] not in by_dev:
            by_dev[fq["id"]] = _results_by_device(fq)

        for device in group_devices:
            for c in ordered:
                r = by_dev[c["id"]].get(device)
                if r is None:
                    infeasible.append({"candidate": c["id"], "device": device, "reason": "not evaluated (no result)"})
                elif not (r["status"] == "done" and r["feasible"]):
                    infeasible.append({"candidate": c["id"], "device": device, "reason": r["reason"]})
            rows, fronts, F = _device_fronts(ordered, by_dev, device, objectives, "front")
            fronts_out.append(
                {
                    "model": model,
                    "mode": mode,
                    "recipe": mode,
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

        # Across the devices the recipe runs on (a variant recipe planned for some devices: across those).
        cross.append(_cross_device(model, mode, ordered, by_dev, group_devices, objectives))

    report["fronts"] = fronts_out
    report["cross_device"] = cross
    report["recipe_fronts"] = _recipe_fronts(report, evaluated, model_devices, objectives)
    report["infeasible"] = infeasible
    report["summary"] = summary
    ablation, searches = _ablation(report, candidates, model_devices, objectives)
    report["ablation"] = ablation
    report["searches"] = searches
    report["answer"] = build_answer(report, answer_constraint)
    logger.info(
        "finalized report: %d candidates, %d groups, %d results outside fronts, %d searches",
        len(candidates),
        len(fronts_out),
        len(infeasible),
        len(searches),
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
        "recipe": mode,
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
    noise: list[Latency | None] = []
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
        row_noise: Latency | None = None
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
    fronts, F = _sort_fronts(worst, noise, objectives)
    front_of = {i: n for n, front in enumerate(fronts, start=1) for i in front}
    return {
        "model": model,
        "mode": mode,
        "recipe": mode,
        "devices": devices,
        "fronts": [[rows[i]["id"] for i in front] for front in fronts],
        "selected": rows[select_compromise(F, fronts[0])]["id"] if fronts else None,
        "candidates": [
            {"id": c["id"], "k": c.get("k"), "label": c.get("label"), "worst": worst[i], "front": front_of.get(i)}
            for i, c in enumerate(rows)
        ],
        "excluded": excluded,
    }


def _recipe_fronts(
    report: dict[str, Any],
    evaluated: list[dict[str, Any]],
    model_devices: dict[str, list[str]],
    objectives: list[_Objective],
) -> list[dict[str, Any]]:
    """Per (model, device), the top fronts over every recipe's done and feasible full results.

    Sets ``results[].recipe_front`` of the members (1, 2, 3).
    """
    out: list[dict[str, Any]] = []
    by_model: dict[str, list[dict[str, Any]]] = {}
    for c in evaluated:
        by_model.setdefault(c["model"], []).append(c)
    for model, members in by_model.items():
        recipes = list(dict.fromkeys(c["mode"] for c in members))
        ordered = [c for recipe in recipes for c in _ordered(m for m in members if m["mode"] == recipe)]
        by_dev = {c["id"]: _results_by_device(c) for c in ordered}
        for device in _device_order(report, model_devices.get(model, [])):
            rows, fronts, F = _device_fronts(ordered, by_dev, device, objectives, "recipe_front")
            out.append(
                {
                    "model": model,
                    "device": device,
                    "recipes": recipes,
                    "fronts": [[rows[i]["id"] for i in front] for front in fronts],
                    "selected": rows[select_compromise(F, fronts[0])]["id"] if fronts else None,
                }
            )
    return out


# --------------------------------------------------------------------------- ranking ablation

#: The search other searches' hypervolumes are compared with (the paper's method).
SWEEP_SEARCH = "sweep/paper"

#: Reference point of the hypervolume in every normalized objective (1 = the worst value seen).
HV_REFERENCE = 1.1

#: Tolerance of ``accuracy_loss <= max_loss`` (1 - 0.99 is 0.010000000000000009 in floating point).
LOSS_TOLERANCE = 1e-9


def _minimized(objectives: list[_Objective], values: dict[str, float | None]) -> list[float] | None:
    """A result's objective values as one row to minimize (None if any is missing)."""
    row = []
    for o in objectives:
        v = values.get(o.name)
        if v is None:
            return None
        row.append(-float(v) if o.direction == "max" else float(v))
    return row


def _normalizers(
    candidates: list[dict[str, Any]], objectives: list[_Objective]
) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """(lowest value, span) per objective over every done full result of each (model, device), all recipes."""
    rows: dict[tuple[str, str], list[list[float]]] = {}
    for c in candidates:
        if not _evaluated(c):
            continue
        for r in c.get("results") or []:
            if r.get("status") != "done":
                continue
            row = _minimized(objectives, r.get("objectives") or {})
            if row is not None:
                rows.setdefault((c["model"], r.get("device")), []).append(row)
    out = {}
    for key, vals in rows.items():
        arr = np.array(vals, dtype=float)
        lo = arr.min(axis=0)
        out[key] = (lo, arr.max(axis=0) - lo)
    return out


def hypervolume(points: np.ndarray, lo: np.ndarray, span: np.ndarray) -> float:
    """Hypervolume of minimization ``points`` after normalizing each objective to (v - lo) / span
    (0 where the span is 0), with reference point :data:`HV_REFERENCE` in every dimension."""
    pts = np.asarray(points, dtype=float)
    if pts.size == 0:
        return 0.0
    norm = np.where(span > 0, (pts - lo) / np.where(span > 0, span, 1.0), 0.0)
    return float(HV(ref_point=np.full(pts.shape[1], HV_REFERENCE))(norm))


def _since(t: float | None, start: float | None) -> float | None:
    """Seconds from ``start`` to ``t`` (never negative; None if either is unknown)."""
    if t is None or start is None:
        return None
    return max(0.0, float(t) - float(start))


def _latest(values: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return max(vals) if vals else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


class _SearchWork:
    """What one search asked for, per (model, recipe) and level, with the results it got."""

    def __init__(self, search: dict[str, Any], cands: dict[str, dict[str, Any]]) -> None:
        self.search = search
        # (model, recipe) -> level -> candidate ids (a dict as an ordered set)
        self.groups: dict[tuple[str, str], dict[str, dict[str, None]]] = {}
        for p in search.get("proposals") or []:
            c = cands.get(p.get("candidate_id"))
            # a proposal always names its model and recipe (NOT NULL columns of the store's proposals)
            model = cast(str, p.get("model") or (c or {}).get("model"))
            recipe = cast(str, p.get("recipe") or p.get("mode") or (c or {}).get("mode"))
            ids = self.groups.setdefault((model, recipe), {"build": {}, "screen": {}, "full": {}})
            if p.get("level") in ids:
                ids[p["level"]][p.get("candidate_id")] = None
        self.cands = cands

    def ids(self, level: str, key: tuple[str, str] | None = None) -> list[str]:
        """Distinct candidates asked for at ``level`` (in one (model, recipe), or in all)."""
        groups = [self.groups[key]] if key is not None else list(self.groups.values())
        return list(dict.fromkeys(cid for g in groups for cid in g[level]))

    def all_ids(self, key: tuple[str, str] | None = None) -> list[str]:
        """Distinct candidates asked for at any level (each one is built)."""
        return list(dict.fromkeys(cid for level in ("build", "screen", "full") for cid in self.ids(level, key)))

    def runs(self, device: str | None, key: tuple[str, str] | None = None) -> list[dict[str, Any]]:
        """Results (full and screening) of what it asked for (on one device, or on all)."""
        out = []
        for level, field in (("full", "results"), ("screen", "screening")):
            for cid in self.ids(level, key):
                for r in (self.cands.get(cid) or {}).get(field) or []:
                    if (device is None or r.get("device") == device) and r.get("status") == "done":
                        out.append(r)
        return out


def _ablation(
    report: dict[str, Any],
    candidates: list[dict[str, Any]],
    model_devices: dict[str, list[str]],
    objectives: list[_Objective],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ranking ablation rows and the searches with their totals (see the module docstring)."""
    cands = {c["id"]: c for c in candidates}
    norms = _normalizers(candidates, objectives)
    # A recipe's rows cover the devices it has full results entries on (feasibility planning may run a
    # variant instead on some); a recipe without any yet, every device of the model.
    recipe_devices: dict[tuple[str, str], list[str]] = {}
    for c in candidates:
        if _evaluated(c):
            on = (r.get("device") for r in c.get("results") or [])
            recipe_devices.setdefault((c["model"], c["mode"]), []).extend(on)
    rows: list[dict[str, Any]] = []
    searches: list[dict[str, Any]] = []
    hv_of: dict[tuple[str, str, str, str], float] = {}
    works = [(s, _SearchWork(s, cands)) for s in report.get("searches") or []]
    for s, work in works:
        started = finite(s.get("started_at"))
        for model, recipe in work.groups:
            full_ids = work.ids("full", (model, recipe))
            for device in _device_order(report, recipe_devices.get((model, recipe)) or model_devices.get(model, [])):
                ids: list[str] = []
                points: list[list[float]] = []
                for cid in full_ids:
                    r = next(
                        (x for x in (cands.get(cid) or {}).get("results") or [] if x.get("device") == device), None
                    )
                    if r is None or r.get("status") != "done" or not r.get("feasible"):
                        continue
                    row = _minimized(objectives, r.get("objectives") or {})
                    if row is not None:
                        ids.append(cid)
                        points.append(row)
                front = top_fronts(np.array(points, dtype=float).reshape(len(points), len(objectives)), 1)
                members = [ids[i] for i in front[0]] if front else []
                lo, span = norms.get((model, device), (np.zeros(len(objectives)), np.zeros(len(objectives))))
                hv = hypervolume(np.array([points[i] for i in front[0]]) if front else np.zeros((0, 0)), lo, span)
                hv_of[(s["name"], model, recipe, device)] = hv
                runs = work.runs(device, (model, recipe))
                found = _latest(
                    next((x.get("finished_at") for x in cands[cid]["results"] if x.get("device") == device), None)
                    for cid in members
                )
                rows.append(
                    {
                        "search": s["name"],
                        "model": model,
                        "recipe": recipe,
                        "mode": recipe,
                        "device": device,
                        "front": members,
                        "hypervolume": hv,
                        "hv_vs_sweep": None,
                        "evaluations": len(full_ids),
                        "screenings": len(work.ids("screen", (model, recipe))),
                        "builds": len(work.all_ids((model, recipe))),
                        "seconds": float(sum(finite(r.get("seconds")) or 0.0 for r in runs)),
                        "found_after_s": _since(found, started),
                        "front_done_after_s": _since(_latest(r.get("finished_at") for r in runs), started),
                    }
                )
    for summary in rows:
        ref = hv_of.get((SWEEP_SEARCH, summary["model"], summary["recipe"], summary["device"]))
        summary["hv_vs_sweep"] = _ratio(summary["hypervolume"], ref)

    totals: list[dict[str, Any]] = []
    for s, work in works:
        started = finite(s.get("started_at"))
        mine = [r for r in rows if r["search"] == s["name"]]
        shared = [r for r in mine if (SWEEP_SEARCH, r["model"], r["recipe"], r["device"]) in hv_of]
        runs = work.runs(None)
        recipes = list(dict.fromkeys(recipe for _, recipe in work.groups))
        target = _targets(s, work, cands, model_devices, report) if _is_target(s) else None
        total = {
            "search": s["name"],
            "model": None,
            "recipe": None,
            "mode": None,
            "device": None,
            "front": None,
            "hypervolume": float(sum(r["hypervolume"] for r in mine)),
            "hv_vs_sweep": _ratio(
                sum(r["hypervolume"] for r in shared),
                sum(hv_of[(SWEEP_SEARCH, r["model"], r["recipe"], r["device"])] for r in shared),
            )
            if shared
            else None,
            "evaluations": len(work.ids("full")),
            "screenings": len(work.ids("screen")),
            "builds": len(work.all_ids()),
            "seconds": float(sum(finite(r.get("seconds")) or 0.0 for r in runs)),
            "found_after_s": _latest(r["found_after_s"] for r in mine),
            "front_done_after_s": _since(_latest(r.get("finished_at") for r in runs), started),
        }
        if target is not None:
            reached = [t for t in target if t["id"] is not None]
            total["found_after_s"] = (
                _latest(t["found_after_s"] for t in reached) if len(reached) == len(target) else None
            )
        totals.append(total)
        entry = dict(s)
        entry.update(
            {
                "recipe": recipes[0] if len(recipes) == 1 else None,
                "recipes": recipes,
                **{
                    k: total[k]
                    for k in (
                        "hypervolume",
                        "hv_vs_sweep",
                        "evaluations",
                        "screenings",
                        "builds",
                        "seconds",
                        "found_after_s",
                        "front_done_after_s",
                    )
                },
                "targets": target,
                "target": target[0]
                if target is not None and len(target) == 1 and target[0]["id"] is not None
                else None,
            }
        )
        searches.append(entry)
    return rows + totals, searches


def _is_target(search: dict[str, Any]) -> bool:
    return search.get("strategy") == "target" or str(search.get("name", "")).startswith("target")


def _targets(
    search: dict[str, Any],
    work: _SearchWork,
    cands: dict[str, dict[str, Any]],
    model_devices: dict[str, list[str]],
    report: dict[str, Any],
) -> list[dict[str, Any]]:
    """Per model of a ``target`` search: per device the smallest candidate it evaluated in full whose accuracy
    loss (1 - agreement) is at most ``max_loss`` there (``devices``), and across devices the smallest that
    meets it on every device: one candidate, or for a recipe that feasibility planning splits across the
    devices, one per part (``parts``; ``id`` None if none)."""
    max_loss = finite(search.get("max_loss"))
    if max_loss is None:
        max_loss = finite((search.get("params") or {}).get("max_loss"))
    started = finite(search.get("started_at"))
    out: list[dict[str, Any]] = []
    for model in dict.fromkeys(m for m, _ in work.groups):
        devices = list(dict.fromkeys(model_devices.get(model, [])))
        ids = list(dict.fromkeys(c for (m, r) in work.groups if m == model for c in work.ids("full", (m, r))))

        def best(devs: list[str], recipe: str | None = None) -> dict[str, Any] | None:
            """The smallest of ``ids`` (of ``recipe``) meeting max_loss on every one of ``devs``."""
            found: tuple[tuple[float, float, str], dict[str, Any]] | None = None
            for cid in ids:  # noqa: B023 - best() is called within this iteration
                c = cands.get(cid)
                if c is None or max_loss is None or not devs or c.get("size_bytes") is None:
                    continue
                if recipe is not None and c.get("mode") != recipe:
                    continue
                by_dev = {r.get("device"): r for r in c.get("results") or []}
                agreements = [
                    finite((by_dev.get(d) or {}).get("agreement"))
                    if (by_dev.get(d) or {}).get("status") == "done"
                    else None
                    for d in devs
                ]
                if any(a is None or 1.0 - a > max_loss + LOSS_TOLERANCE for a in agreements):
                    continue
                worst = min(a for a in agreements if a is not None)
                key = (float(c["size_bytes"]), -worst, cid)
                if found is None or key < found[0]:
                    done = _latest(by_dev[d].get("finished_at") for d in devs)
                    found = (
                        key,
                        {
                            "id": cid,
                            "recipe": c.get("mode"),
                            "label": c.get("label"),
                            "size_bytes": c["size_bytes"],
                            "worst_agreement": worst,
                            "found_after_s": _since(done, started),
                            "_done": done,
                        },
                    )
            return None if found is None else found[1]

        options = [o for o in [best(devices)] if o is not None]
        for parts in split_parts(report, model, devices):
            picked = [(devs, best(devs, recipe)) for recipe, devs in parts]
            if all(o is not None for _, o in picked):
                largest = max((o for _, o in picked if o is not None), key=lambda o: float(o["size_bytes"]))
                done = _latest(o["_done"] for _, o in picked if o is not None)
                options.append(
                    {
                        **largest,
                        "size_bytes": max(o["size_bytes"] for _, o in picked if o is not None),
                        "worst_agreement": min(o["worst_agreement"] for _, o in picked if o is not None),
                        "found_after_s": _since(done, started),
                        "_done": done,
                        "parts": [{"devices": devs, **_public(o)} for devs, o in picked if o is not None],
                    }
                )
        per_device = []
        for d in devices:
            o = best([d])
            per_device.append({"device": d, **(_public(o) if o is not None else dict.fromkeys(_TARGET_KEYS))})
        chosen = min(options, key=lambda o: (float(o["size_bytes"]), -o["worst_agreement"], o["id"]), default=None)
        entry = {
            "model": model,
            **(_public(chosen) if chosen is not None else dict.fromkeys(_TARGET_KEYS)),
            "parts": (chosen or {}).get("parts") or [],
            "devices": per_device,
        }
        out.append(entry)
    return out


_TARGET_KEYS = ("id", "recipe", "label", "size_bytes", "worst_agreement", "found_after_s")


def _public(o: dict[str, Any]) -> dict[str, Any]:
    return {k: o[k] for k in _TARGET_KEYS}
