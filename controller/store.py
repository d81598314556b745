"""The study store: one SQLite file (WAL) per study, written through sqlite-utils.

It is the checkpoint of everything: models, calibration caches, layer rankings,
candidates, devices, jobs and results. Every write is committed before the work it
records is acknowledged, so a killed controller resumes from it.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

import sqlite_utils

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DB_NAME = "tuneqn.db"

_TABLES: dict[str, tuple[dict[str, type], str | tuple[str, ...]]] = {
    "meta": ({"key": str, "value": str}, "key"),
    "models": (
        {
            "name": str, "source": str, "path": str, "sha256": str, "source_sha256": str, "size_bytes": int,
            "opset_original": int, "opset_used": int, "upgraded": int, "input_name": str, "input_shape": str,
            "notes": str,
        },
        "name",
    ),
    "datasets": ({"split": str, "path": str, "sha256": str, "size": int, "items": str, "labels": str}, "split"),
    "calibrations": ({"key": str, "model": str, "settings": str, "path": str, "created_at": float}, "key"),
    "analyses": (
        {"model": str, "mode": str, "key": str, "fq_sha256": str, "seconds": float, "created_at": float},
        ("model", "mode"),
    ),
    "layers": (
        {
            "model": str, "mode": str, "name": str, "op_type": str, "idx": int, "output": str,
            "fused_activation": str, "qdq_err": float, "xmodel_err": float, "norm_qdq": float,
            "norm_xmodel": float, "score": float, "rank": int,
        },
        ("model", "mode", "name"),
    ),
    "candidates": (
        {
            "id": str, "model": str, "mode": str, "k": int, "kind": str, "label": str, "excluded": str,
            "settings_key": str, "path": str, "size_bytes": int, "sha256": str, "runtime": str, "created_at": float,
        },
        "id",
    ),
    "devices": ({"name": str, "device_class": str, "info": str, "updated_at": float}, "name"),
    "jobs": (
        {
            "id": str, "candidate_id": str, "device": str, "state": str, "agent": str, "attempts": int,
            "lease_until": float, "error": str, "created_at": float, "updated_at": float,
        },
        "id",
    ),
    "results": (
        {
            "job_id": str, "candidate_id": str, "device": str, "agent": str, "agent_id": str, "num_samples": int,
            "top_k": int, "topk": bytes, "agreement": float, "accuracy": float, "accuracy_top5": float,
            "latency_ms": float, "latency": str, "size_bytes": int, "simulated": float, "finished_at": float,
            "info": str,
        },
        "job_id",
    ),
}


def _locked(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def wrapper(self: "Store", *args: Any, **kwargs: Any) -> T:
        with self.lock:
            return fn(self, *args, **kwargs)

    return wrapper


class Store:
    """Typed access to the study's SQLite checkpoint (thread-safe: one lock, one connection)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        conn = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False, isolation_level=None)
        self.db = sqlite_utils.Database(conn)
        #: Serializes use of the one connection by the dispatcher's threads.
        self.lock = threading.RLock()
        self.db.enable_wal()
        self.db.execute("PRAGMA synchronous=NORMAL")
        for name, (columns, pk) in _TABLES.items():
            table = self.db.table(name)
            if not table.exists():
                table.create(columns, pk=pk)
        if self.get_meta("schema_version") is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION))

    @classmethod
    def open(cls, out_dir: Path) -> "Store":
        """The store of the study in ``out_dir``."""
        return cls(out_dir / DB_NAME)

    def close(self) -> None:
        """Close the connection."""
        self.db.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All writes inside commit together (or not at all)."""
        with self.lock, self.db.atomic():
            yield

    # ------------------------------------------------------------------ meta
    @_locked
    def get_meta(self, key: str) -> str | None:
        """A meta value."""
        rows = list(self.db.query("select value from meta where key = ?", [key]))
        return rows[0]["value"] if rows else None

    @_locked
    def set_meta(self, key: str, value: str) -> None:
        """Set a meta value."""
        self.db["meta"].upsert({"key": key, "value": value}, pk="key")

    @_locked
    def reset(self) -> None:
        """Delete every stored row (``--fresh``)."""
        with self.transaction():
            for name in _TABLES:
                self.db.execute(f"delete from [{name}]")  # noqa: S608 - fixed table names
        self.set_meta("schema_version", str(SCHEMA_VERSION))

    # ------------------------------------------------------------------ models / data
    @_locked
    def put_model(self, row: dict[str, Any]) -> None:
        """Insert or replace a prepared model."""
        row = dict(row)
        row["upgraded"] = int(bool(row["upgraded"]))
        self.db["models"].upsert(row, pk="name")

    @_locked
    def models(self) -> list[dict[str, Any]]:
        """All models."""
        out = []
        for r in self.db["models"].rows:
            r = dict(r)
            r["input_shape"] = json.loads(r["input_shape"])
            r["notes"] = json.loads(r["notes"] or "[]")
            r["upgraded"] = bool(r["upgraded"])
            out.append(r)
        return out

    @_locked
    def put_dataset(self, split: str, path: Path, sha256: str, items: list[str], labels: list[int] | None) -> None:
        """Record a preprocessed split."""
        self.db["datasets"].upsert(
            {
                "split": split, "path": str(path), "sha256": sha256, "size": len(items),
                "items": json.dumps(items), "labels": json.dumps(labels),
            },
            pk="split",
        )

    @_locked
    def dataset(self, split: str) -> dict[str, Any] | None:
        """A split's row (items and labels decoded)."""
        rows = list(self.db.query("select * from datasets where split = ?", [split]))
        if not rows:
            return None
        r = dict(rows[0])
        r["items"] = json.loads(r["items"])
        r["labels"] = json.loads(r["labels"]) if r["labels"] else None
        return r

    # ------------------------------------------------------------------ calibration / analysis
    @_locked
    def put_calibration(self, key: str, model: str, settings: dict[str, Any], path: Path) -> None:
        """Record a calibration cache file."""
        self.db["calibrations"].upsert(
            {"key": key, "model": model, "settings": json.dumps(settings, sort_keys=True, default=list),
             "path": str(path), "created_at": time.time()},
            pk="key",
        )

    @_locked
    def calibration(self, key: str) -> dict[str, Any] | None:
        """A calibration row."""
        rows = list(self.db.query("select * from calibrations where key = ?", [key]))
        return dict(rows[0]) if rows else None

    @_locked
    def put_analysis(self, model: str, mode: str, key: str, fq_sha256: str, seconds: float,
                     layers: list[dict[str, Any]]) -> None:
        """Replace the ranking of (model, mode) atomically."""
        with self.transaction():
            self.db.execute("delete from layers where model = ? and mode = ?", [model, mode])
            rows = []
            for layer in layers:
                row = {k: layer[k] for k in _TABLES["layers"][0] if k in layer}
                row.update({"model": model, "mode": mode, "idx": layer["index"]})
                rows.append(row)
            if rows:
                self.db["layers"].insert_all(rows, pk=("model", "mode", "name"))
            self.db["analyses"].upsert(
                {"model": model, "mode": mode, "key": key, "fq_sha256": fq_sha256, "seconds": seconds,
                 "created_at": time.time()},
                pk=("model", "mode"),
            )

    @_locked
    def analysis(self, model: str, mode: str) -> dict[str, Any] | None:
        """The analysis row of (model, mode)."""
        rows = list(self.db.query("select * from analyses where model = ? and mode = ?", [model, mode]))
        return dict(rows[0]) if rows else None

    @_locked
    def layers(self, model: str | None = None, mode: str | None = None) -> list[dict[str, Any]]:
        """Ranked layers, rank order within each (model, mode)."""
        where, args = [], []
        if model is not None:
            where.append("model = ?")
            args.append(model)
        if mode is not None:
            where.append("mode = ?")
            args.append(mode)
        sql = "select * from layers" + (" where " + " and ".join(where) if where else "") + " order by model, mode, rank"
        return [dict(r) for r in self.db.query(sql, args)]

    # ------------------------------------------------------------------ candidates
    @_locked
    def put_candidate(self, row: dict[str, Any]) -> None:
        """Insert or replace a candidate."""
        row = dict(row)
        row["excluded"] = json.dumps(row["excluded"])
        row["runtime"] = json.dumps(row.get("runtime") or {})
        row.setdefault("created_at", time.time())
        self.db["candidates"].upsert(row, pk="id")

    def _decode_candidate(self, r: dict[str, Any]) -> dict[str, Any]:
        r = dict(r)
        r["excluded"] = json.loads(r["excluded"])
        r["runtime"] = json.loads(r["runtime"] or "{}")
        return r

    @_locked
    def candidate(self, cid: str) -> dict[str, Any] | None:
        """One candidate by id."""
        rows = list(self.db.query("select * from candidates where id = ?", [cid]))
        return self._decode_candidate(rows[0]) if rows else None

    @_locked
    def candidates(self, model: str | None = None, mode: str | None = None) -> list[dict[str, Any]]:
        """Candidates, ordered by model, mode, kind, k."""
        where, args = [], []
        if model is not None:
            where.append("model = ?")
            args.append(model)
        if mode is not None:
            where.append("mode = ?")
            args.append(mode)
        sql = ("select * from candidates" + (" where " + " and ".join(where) if where else "")
               + " order by model, mode, kind desc, k, label")
        return [self._decode_candidate(r) for r in self.db.query(sql, args)]
