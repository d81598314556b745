"""The base report: what the store holds, as one JSON-ready dict (no fronts yet).

Only store read methods are used (no SQL here). Metrics are the ones stored with each
result by :mod:`tuneqn.controller.accuracy`; nothing is recomputed. The shape is
documented in :mod:`tuneqn.controller.report.finalize`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

from tuneqn import __version__
from tuneqn.controller.accuracy import baseline_id
from tuneqn.controller.config import StudyConfig
from tuneqn.controller.objectives import OBJECTIVES, finite
from tuneqn.controller.search.ties import result_latency
from tuneqn.controller.store import FINAL_JOB_STATES, LAYER_KEYS, Store, layer_entry

log = logging.getLogger(__name__)

#: The fields of a ranked layer in the report (layers.json has the fused activation and output tensor too).
_REPORT_LAYER_KEYS = tuple(k for k in LAYER_KEYS if k not in ("output", "fused_activation"))

#: Result status shown for a job state without a result (unknown live states show as running).
_STATUS_OF_JOB_STATE = {
    "pending": "pending",
    "failed": "failed",
    "unreachable": "unreachable",
    "done": "pending",
    "infeasible": "infeasible",
}


def _job_status(job: dict[str, Any] | None) -> tuple[str, str | None]:
    """(result status, error) of a (candidate, device) without a usable result."""
    if job is None:
        return "pending", None
    state = str(job["state"])
    status = _STATUS_OF_JOB_STATE.get(state, "running")
    error = job.get("error") if status in ("failed", "unreachable", "infeasible") else None
    if status == "unreachable" and not error:
        error = "device unreachable"
    if status == "infeasible" and not error:
        error = "infeasible on this device"
    return status, error


def _unsupported_ops(job: dict[str, Any] | None) -> list[str]:
    """The op types an ``infeasible`` job's device could not run."""
    try:
        ops = json.loads((job or {}).get("unsupported_ops") or "[]")
    except ValueError:
        return []
    return [str(o) for o in ops] if isinstance(ops, list) else []


class _Index:
    """The newest job and the result of each (candidate, device) at one level (``full`` or ``screen``)."""

    def __init__(self, store: Store, level: str = "full") -> None:
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        for j in store.jobs(level=level):  # ordered by created_at: the newest wins
            self.jobs[(j["candidate_id"], j["device"])] = j
        self.results: dict[tuple[str, str], dict[str, Any]] = {}
        self.by_job: dict[str, dict[str, Any]] = {}
        for r in store.results(level=level):  # ordered by finished_at: the newest wins
            self.results[(r["candidate_id"], r["device"])] = r
            self.by_job[r["job_id"]] = r
        self.candidates = {cid for cid, _ in (*self.jobs, *self.results)}

    def current(self, cid: str, device: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(result, job) of a (candidate, device): the result of its newest job, if that one has one.

        Without any job the newest result counts (a store from before jobs were kept).
        """
        job = self.jobs.get((cid, device))
        if job is None:
            return self.results.get((cid, device)), None
        result = self.by_job.get(job["id"])
        if result is None and job["state"] == "done":
            result = self.results.get((cid, device))
        return result, job

    def devices(self) -> set[str]:
        """Devices with a job or a result at this level."""
        return {dev for _, dev in (*self.jobs, *self.results)}


def _info(row: dict[str, Any] | None) -> dict[str, Any]:
    """A result row's decoded ``info`` (empty when missing or malformed)."""
    try:
        info = json.loads((row or {}).get("info") or "{}")
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _timing(row: dict[str, Any] | None) -> dict[str, Any]:
    """``seconds`` (job wall time on the agent), ``finished_at`` and ``num_samples`` of a result row."""
    if row is None:
        return {"seconds": None, "finished_at": None, "num_samples": None}
    return {
        "seconds": finite(_info(row).get("seconds")),
        "finished_at": finite(row.get("finished_at")),
        "num_samples": row.get("num_samples"),
    }


def _details(row: dict[str, Any] | None) -> dict[str, Any]:
    """How a result was produced: backend, compile and tuning seconds (separate from the device's
    ``device_seconds``), whether its latency comes from a tuned build (``untuned``: a TVM build without
    tuning, whose latency says little), a compile-cache hit and the remote server that ran it."""
    info = _info(row)
    backend = str(info.get("backend") or "")
    compile_s, tuning_s = finite(info.get("compile_seconds")), finite(info.get("tuning_seconds"))
    seconds = finite(info.get("seconds"))
    device_s = None if seconds is None else max(0.0, seconds - (compile_s or 0.0) - (tuning_s or 0.0))
    tuned = info.get("tuned")
    return {
        "backend": backend or None,
        "compile_seconds": compile_s,
        "tuning_seconds": tuning_s,
        "device_seconds": device_s,
        "tuned": bool(tuned) if tuned is not None else None,
        "untuned": backend == "tvm" and not tuned,
        "compile_cache_hit": info.get("compile_cache_hit"),
        "executed_on": info.get("executed_on") or None,
    }


def _screening(index: _Index, cid: str, dev_names: list[str]) -> list[dict[str, Any]]:
    """A candidate's screening results (its recipe's screening sample, no latency), per device."""
    out = []
    for dev in dev_names:
        if (cid, dev) not in index.jobs and (cid, dev) not in index.results:
            continue
        r, job = index.current(cid, dev)
        status, error = ("done", None) if r is not None else _job_status(job)
        if status == "infeasible":
            error = f"{error} ({', '.join(_unsupported_ops(job))})" if _unsupported_ops(job) else error
        out.append(
            {
                "device": dev,
                "status": status,
                "agreement": finite(r["agreement"]) if r else None,
                "accuracy": finite(r["accuracy"]) if r else None,
                **_timing(r),
                "error": error,
            }
        )
    return out


def _level(cid: str, full: _Index, screen: _Index, proposed: dict[str, set[str]], any_proposals: bool) -> str:
    """How far a candidate got: ``full`` (a full job, result or request), ``screen`` (screened only) or
    ``build`` (only built). A study without any search records (before searches existed) evaluated
    every candidate in full."""
    levels = proposed.get(cid, set())
    if cid in full.candidates or "full" in levels or not any_proposals:
        return "full"
    if cid in screen.candidates or "screen" in levels:
        return "screen"
    return "build"


def _study_order(cands: list[dict[str, Any]], models: list[str], recipes: list[str]) -> list[dict[str, Any]]:
    """Candidates by model and recipe in the study's order (a variant recipe ``<recipe>.…`` right after its
    recipe; unknown ones after, by name), else as given."""

    def recipe_rank(name: str) -> int:
        while name not in recipes and "." in name:
            name = name.rpartition(".")[0]
        return recipes.index(name) if name in recipes else len(recipes)

    def key(c: dict[str, Any]) -> tuple[int, str, int, str]:
        m = models.index(c["model"]) if c["model"] in models else len(models)
        return (m, c["model"], recipe_rank(c["mode"]), c["mode"])

    return sorted(cands, key=key)


class _Planning:
    """Where each recipe runs, from the store's feasibility decisions (no decision: everywhere)."""

    def __init__(self, store: Store) -> None:
        self.rows = store.feasibility()
        self.away: dict[tuple[str, str], set[str]] = {}  # (model, recipe) -> classes running another recipe
        self.only: dict[tuple[str, str], set[str]] = {}  # (model, variant) -> classes it is planned on
        for r in self.rows:
            if r["planned"] != r["recipe"]:
                self.away.setdefault((r["model"], r["recipe"]), set()).add(r["device_class"])
                self.only.setdefault((r["model"], r["planned"]), set()).add(r["device_class"])

    def devices(self, model: str, recipe: str, dev_names: list[str], classes: dict[str, str | None]) -> list[str]:
        """The devices a (model, recipe)'s candidates are planned on, in report order."""
        only = self.only.get((model, recipe))
        if only is not None:
            return [d for d in dev_names if (classes.get(d) or d) in only]
        away = self.away.get((model, recipe), set())
        return [d for d in dev_names if (classes.get(d) or d) not in away]

    def entries(self) -> list[dict[str, Any]]:
        """The report's ``feasibility`` section."""
        from tuneqn.controller.quantize.feasibility import describe  # noqa: PLC0415 - onnx only when writing reports

        return [
            {
                "model": r["model"],
                "recipe": r["recipe"],
                "device": r["device_class"],
                "planned": r["planned"],
                "status": r["status"],
                "unsupported": r["unsupported"],
                "tried": r["tried"],
                "text": describe(
                    r["device_class"], r["recipe"], r["planned"], r["status"], r["unsupported"], r["tried"]
                ),
            }
            for r in self.rows
        ]


def _searches(store: Store) -> list[dict[str, Any]]:
    """The study's searches with their parameters and what they asked for, in order."""
    by_search: dict[str, list[dict[str, Any]]] = {}
    for p in store.proposals():
        by_search.setdefault(p["search"], []).append(
            {
                "candidate_id": p["candidate_id"],
                "level": p["level"],
                "model": p["model"],
                "mode": p["mode"],
                "recipe": p["mode"],
                "label": p["label"],
                "seq": p["seq"],
                "created_at": p["created_at"],
            }
        )
    out = []
    for s in store.searches():
        params = s.get("params") or {}
        out.append(
            {
                "name": s["name"],
                "strategy": params.get("strategy"),
                "ranking": params.get("ranking"),
                "budget": params.get("budget"),
                "max_loss": params.get("max_loss"),
                "params": params,
                "started_at": s.get("started_at"),
                "finished_at": s.get("finished_at"),
                "proposals": by_search.pop(s["name"], []),
            }
        )
    for name, props in by_search.items():  # proposals of a search without its row (should not happen)
        log.warning("proposals of search %s, which is not recorded", name)
        out.append(
            {
                "name": name,
                "strategy": None,
                "ranking": None,
                "budget": None,
                "max_loss": None,
                "params": {},
                "started_at": None,
                "finished_at": None,
                "proposals": props,
            }
        )
    return out


def _recipe_order(store: Store, cfg: StudyConfig) -> list[str]:
    """The study's recipes in order (with auto recipes: those chosen for any model)."""
    from tuneqn.controller.search.gate import auto_models  # noqa: PLC0415 - keeps report imports light

    chosen = {r for rs in auto_models(store).values() for r in rs}
    names = cfg.quantization.recipe_names()
    return [r for r in names if r in chosen] if chosen else names


def _recipe_selection(store: Store) -> list[dict[str, Any]]:
    """``recipe_selection``: the recipe gate's decision per model and auto recipe (empty with explicit recipes)."""
    from tuneqn.controller.search.gate import selection  # noqa: PLC0415 - keeps report imports light

    return selection(store)


def _skipped_inputs(store: Store) -> list[dict[str, str]]:
    """Unreadable inputs left out of any split, each (file, reason) once, in order of appearance."""
    seen: dict[tuple[str, str], dict[str, str]] = {}
    for split in store.datasets():
        for item in split.get("skipped") or []:
            entry = {"file": str(item.get("file")), "reason": str(item.get("reason"))}
            seen.setdefault((entry["file"], entry["reason"]), entry)
    return list(seen.values())


def _dataset(store: Store, cfg: StudyConfig, models: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's ``dataset``: sample sizes (of the first model's splits; every model uses the same images)
    and the preprocessing. ``labelled_eval_samples`` counts the evaluation samples with a label (the n of
    every accuracy: :func:`tuneqn.controller.accuracy.accuracy` leaves out negative labels)."""

    def split(name: str) -> dict[str, Any] | None:
        return store.dataset(f"{models[0]['name']}/{name}") if models else None

    def size(name: str) -> int | None:
        row = split(name)
        return None if row is None else len(row["items"])

    from tuneqn.controller.prepare.dataset import describe_preprocess, model_hw, preprocess_settings  # noqa: PLC0415 - Pillow

    pp = cfg.dataset.preprocess
    hw = model_hw(models[0]["input_shape"], pp) if models and models[0].get("input_shape") else None
    ev = split("eval")
    labels = (ev or {}).get("labels") or []
    eval_n = None if ev is None else len(ev["items"])
    screen = cfg.search.screen_samples if eval_n is None else min(cfg.search.screen_samples, eval_n)
    return {
        "eval_samples": eval_n,
        "labelled_eval_samples": sum(1 for label in labels if label is not None and label >= 0),
        "calibration_samples": size("calibration"),
        "analysis_samples": size("analysis"),
        "screen_samples": screen,
        "preprocess": preprocess_settings(pp, hw),
        "preprocess_description": describe_preprocess(pp, hw),
    }


def build_base(store: Store, *, partial: bool) -> dict[str, Any]:
    """The base report of the study in ``store`` (see :mod:`tuneqn.controller.report.finalize`).

    Fronts, summary and candidates' ``results`` use full-level jobs and results only; screening
    results (a subset of the evaluation sample, no latency) go to ``candidates[].screening``.
    """
    cfg = StudyConfig.model_validate_json(store.get_meta("config") or "{}")
    models = store.models()
    index = _Index(store, "full")
    screen = _Index(store, "screen")
    devices = store.devices()
    known = {d["name"] for d in devices}
    for name in sorted((index.devices() | screen.devices()) - known):
        devices.append({"name": name, "device_class": None, "info": {}})  # a job's device not (yet) registered
    dev_names = [d["name"] for d in devices]
    searches = _searches(store)
    proposed: dict[str, set[str]] = {}
    proposed_by: dict[str, list[dict[str, Any]]] = {}
    for s in searches:
        for p in s["proposals"]:
            proposed.setdefault(p["candidate_id"], set()).add(p["level"])
            proposed_by.setdefault(p["candidate_id"], []).append(
                {"search": s["name"], "label": p["label"], "level": p["level"]}
            )
    any_proposals = bool(proposed)

    baselines: list[dict[str, Any]] = []
    baseline_state: dict[tuple[str, str], tuple[str, str | None]] = {}
    infeasible: dict[str, list[dict[str, Any]]] = {}  # device -> what it could not run
    for m in models:
        for dev in dev_names:
            r, job = index.current(baseline_id(m["name"]), dev)
            status, error = ("done", None) if r is not None else _job_status(job)
            baseline_state[(m["name"], dev)] = (status, error)
            baselines.append(
                {
                    "model": m["name"],
                    "device": dev,
                    "status": status,
                    "accuracy": finite(r["accuracy"]) if r else None,
                    "accuracy_top5": finite(r["accuracy_top5"]) if r else None,
                    **result_latency(r),
                    "size_bytes": m["size_bytes"],
                    "error": error,
                    "unsupported_ops": _unsupported_ops(job) if status == "infeasible" else [],
                    **_details(r),
                }
            )
            if status == "infeasible":
                infeasible.setdefault(dev, []).append(
                    {
                        "candidate": baseline_id(m["name"]),
                        "model": m["name"],
                        "recipe": "fp32",
                        "label": "fp32",
                        "unsupported_ops": _unsupported_ops(job),
                        "error": error,
                    }
                )

    planning = _Planning(store)
    classes = {d["name"]: d.get("device_class") for d in devices}
    cand_out = []
    recipe_names = _recipe_order(store, cfg)
    for c in _study_order(store.candidates(), [m["name"] for m in models], recipe_names):
        if c["kind"] == "fp32":
            continue
        level = _level(c["id"], index, screen, proposed, any_proposals)
        res = []
        planned = planning.devices(c["model"], c["mode"], dev_names, classes)
        for dev in dev_names if level == "full" else []:
            r, job = index.current(c["id"], dev)
            if dev not in planned and r is None and job is None:
                continue  # another recipe runs on that device (feasibility planning)
            entry: dict[str, Any] = {
                "device": dev,
                "agreement": None,
                "accuracy": None,
                "accuracy_top5": None,
                **result_latency(None),
                **_timing(None),
                **_details(None),
                "error": None,
                "unsupported_ops": [],
            }
            if r is None:
                entry["status"], entry["error"] = _job_status(job)
                if entry["status"] == "infeasible":
                    entry["unsupported_ops"] = _unsupported_ops(job)
                    infeasible.setdefault(dev, []).append(
                        {
                            "candidate": c["id"],
                            "model": c["model"],
                            "recipe": c["mode"],
                            "label": c["label"],
                            "unsupported_ops": entry["unsupported_ops"],
                            "error": entry["error"],
                        }
                    )
            else:
                entry.update(
                    {
                        "status": "done",
                        "agreement": finite(r["agreement"]),
                        "accuracy": finite(r["accuracy"]),
                        "accuracy_top5": finite(r["accuracy_top5"]),
                        **result_latency(r),
                        **_timing(r),
                        **_details(r),
                        "latency": json.loads(r["latency"] or "{}"),
                        "simulated_latency_ms_per_sample": r["simulated"] or 0.0,
                    }
                )
                if entry["agreement"] is None:
                    base_status, base_error = baseline_state.get((c["model"], dev), ("pending", None))
                    if base_status in ("pending", "running"):
                        entry["status"] = "pending"
                        entry["error"] = "FP32 baseline on this device not measured yet"
                    elif base_status != "done":
                        entry["error"] = f"FP32 baseline on this device {base_status}: {base_error}"
            res.append(entry)
        cand_out.append(
            {
                "id": c["id"],
                "model": c["model"],
                "mode": c["mode"],
                "recipe": c["mode"],
                "k": c["k"],
                "kind": c["kind"],
                "label": c["label"],
                "excluded": c["excluded"],
                "levels": c.get("levels") or {},
                "size_bytes": c["size_bytes"],
                "sha256": c["sha256"],
                "runtime": c["runtime"],
                "level": level,
                "results": res,
                "screening": _screening(screen, c["id"], dev_names),
                "proposed_by": proposed_by.get(c["id"], []),
            }
        )
    return {
        "tuneqn_version": __version__,
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "partial": partial,
        "study": {
            "name": store.get_meta("name") or cfg.name or "study",
            "out_dir": str(store.path.parent),
            "settings": json.loads(cfg.model_dump_json()),
        },
        "objectives": [
            {
                "name": o.name,
                "direction": o.resolved_direction,
                "max": o.max,
                "min": o.min,
                "unit": OBJECTIVES[o.name].unit,
                "label": OBJECTIVES[o.name].label,
            }
            for o in cfg.objectives
        ],
        "devices": [{"name": d["name"], "device_class": d["device_class"], "info": d["info"]} for d in devices],
        "models": [
            {
                k: m[k]
                for k in (
                    "name",
                    "source",
                    "size_bytes",
                    "sha256",
                    "opset_original",
                    "opset_used",
                    "upgraded",
                    "input_name",
                    "input_shape",
                    "notes",
                )
            }
            for m in models
        ],
        "skipped_inputs": _skipped_inputs(store),
        "dataset": _dataset(store, cfg, models),
        "layers": [{**layer_entry(r, _REPORT_LAYER_KEYS), "recipe": r["mode"]} for r in store.layers()],
        "rankings": [
            {
                "model": r["model"],
                "mode": r["mode"],
                "recipe": r["mode"],
                "name": r["name"],
                "layers": r["layers"],
                "created_at": r["created_at"],
            }
            for r in store.rankings()
        ],
        "searches": searches,
        "baselines": baselines,
        "candidates": cand_out,
        "feasibility": planning.entries(),
        "recipe_selection": _recipe_selection(store),
        "infeasible_by_device": [
            {"device": dev, "candidates": infeasible[dev]} for dev in dev_names if dev in infeasible
        ],
    }


def is_partial(store: Store) -> bool:
    """True while some job is not finished (or no job exists yet)."""
    counts = store.job_counts()
    return not counts or any(n > 0 for state, n in counts.items() if state not in FINAL_JOB_STATES)
