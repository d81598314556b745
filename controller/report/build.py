"""Assemble the report from the SQLite checkpoint and write it (JSON, plots, HTML).

Agreement is top-1 agreement with the FP32 model *on the same device* (the paper's
accuracy-loss metric is 1 − agreement); accuracy and top-5 accuracy are against the
dataset's labels where it has them. Everything is recomputed from stored predictions,
so ``tuneqn report`` gives the same numbers as the live run.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from tuneqn import __version__
from tuneqn.controller.config import StudyConfig
from tuneqn.controller.report.finalize import finalize_report, write_report
from tuneqn.controller.store import Store

log = logging.getLogger(__name__)


def _topk(row: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(row["topk"], dtype="<i4").reshape(row["num_samples"], row["top_k"])


def _accuracy(topk: np.ndarray, labels: list[int] | None, k: int) -> float | None:
    if not labels:
        return None
    lab = np.asarray(labels)
    mask = lab >= 0
    if not mask.any() or len(lab) != len(topk):
        return None
    hit = (topk[mask, :k] == lab[mask, None]).any(axis=1)
    return float(hit.mean())


def build_base(store: Store, partial: bool) -> dict[str, Any]:
    """The base report (see ``finalize.py``) from the store."""
    cfg = StudyConfig.model_validate_json(store.get_meta("config") or "{}")
    models = store.models()
    labels = {m["name"]: (store.dataset(f"{m['name']}/eval") or {}).get("labels") for m in models}
    results = [dict(r) for r in store.db.query("select * from results")]
    jobs = {r["id"]: dict(r) for r in store.db.query("select * from jobs")}
    by_cand: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        by_cand.setdefault(r["candidate_id"], {})[r["device"]] = r
    devices = [dict(d) for d in store.db.query("select * from devices order by name")]
    dev_names = [d["name"] for d in devices]
    baselines = []
    fp32_top1: dict[tuple[str, str], np.ndarray] = {}
    for m in models:
        for dev in dev_names:
            r = by_cand.get(f"{m['name']}:fp32", {}).get(dev)
            if r is not None:
                t = _topk(r)
                fp32_top1[(m["name"], dev)] = t[:, 0]
            baselines.append({
                "model": m["name"], "device": dev, "status": "done" if r else "pending",
                "accuracy": _accuracy(_topk(r), labels[m["name"]], 1) if r else None,
                "accuracy_top5": _accuracy(_topk(r), labels[m["name"]], 5) if r else None,
                "latency_ms": r["latency_ms"] if r else None, "size_bytes": m["size_bytes"],
            })
    cand_out = []
    for c in store.candidates():
        if c["kind"] == "fp32":
            continue
        res = []
        job_by_dev = {j["device"]: j for j in jobs.values() if j["candidate_id"] == c["id"]}
        for dev in dev_names:
            r = by_cand.get(c["id"], {}).get(dev)
            job = job_by_dev.get(dev)
            entry: dict[str, Any] = {"device": dev, "agreement": None, "accuracy": None, "accuracy_top5": None,
                                     "latency_ms": None, "error": None}
            if r is not None:
                t = _topk(r)
                base = fp32_top1.get((c["model"], dev))
                entry.update({
                    "status": "done",
                    "agreement": float((t[:, 0] == base).mean()) if base is not None and len(base) == len(t) else None,
                    "accuracy": _accuracy(t, labels[c["model"]], 1),
                    "accuracy_top5": _accuracy(t, labels[c["model"]], 5),
                    "latency_ms": r["latency_ms"],
                    "latency": json.loads(r["latency"] or "{}"),
                    "simulated_latency_ms_per_sample": r["simulated"] or 0.0,
                })
                if base is None:
                    entry["status"] = "pending"
                    entry["error"] = "FP32 baseline on this device not measured yet"
            elif job is not None and job["state"] == "failed":
                entry.update({"status": "failed", "error": job["error"]})
            elif job is not None and job["state"] == "submitted":
                entry["status"] = "running"
            else:
                entry["status"] = "pending"
            res.append(entry)
        cand_out.append({
            "id": c["id"], "model": c["model"], "mode": c["mode"], "k": c["k"], "kind": c["kind"],
            "label": c["label"], "excluded": c["excluded"], "size_bytes": c["size_bytes"], "sha256": c["sha256"],
            "runtime": c["runtime"], "results": res,
        })
    return {
        "tuneqn_version": __version__,
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "partial": partial,
        "study": {"name": store.get_meta("name") or cfg.name or "study", "out_dir": str(store.path.parent),
                  "settings": json.loads(cfg.model_dump_json())},
        "objectives": [{"name": o.name, "direction": o.resolved_direction, "max": o.max, "min": o.min}
                       for o in cfg.objectives],
        "devices": [{"name": d["name"], "device_class": d["device_class"], "info": json.loads(d["info"] or "{}")}
                    for d in devices],
        "models": [{k: m[k] for k in ("name", "source", "size_bytes", "sha256", "opset_original", "opset_used",
                                      "upgraded", "input_name", "input_shape", "notes")} for m in models],
        "layers": [{"model": r["model"], "mode": r["mode"], "name": r["name"], "op_type": r["op_type"],
                    "index": r["idx"], "qdq_err": r["qdq_err"], "xmodel_err": r["xmodel_err"],
                    "norm_qdq": r["norm_qdq"], "norm_xmodel": r["norm_xmodel"], "score": r["score"],
                    "rank": r["rank"]} for r in store.layers()],
        "baselines": baselines,
        "candidates": cand_out,
    }


def is_partial(store: Store) -> bool:
    """True while some job is not finished (or no job exists yet)."""
    rows = list(store.db.query("select state, count(*) c from jobs group by state"))
    counts = {r["state"]: r["c"] for r in rows}
    return not counts or counts.get("pending", 0) + counts.get("submitted", 0) > 0


def write_json_only(store: Store, out_dir: Path) -> Path:
    """Rewrite ``report.json`` (a checkpoint view; cheap, done after each finished job)."""
    from tuneqn.controller.report.finalize import _json_safe, atomic_write_bytes

    report = finalize_report(build_base(store, partial=is_partial(store)))
    path = out_dir / "report.json"
    atomic_write_bytes(path, (json.dumps(_json_safe(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
                       .encode("utf-8"))
    return path


def write_full_report(store: Store, out_dir: Path) -> dict[str, Path]:
    """Write report.json, the plots and report.html."""
    report = finalize_report(build_base(store, partial=is_partial(store)))
    return write_report(report, out_dir)
