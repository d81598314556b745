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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from tuneqn.controller.common.errors import UserError

T = TypeVar("T")

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
DB_NAME = "tuneqn.db"
#: Job states after which nothing more happens to a job (``infeasible``: the device cannot run the model).
FINAL_JOB_STATES = frozenset({"done", "failed", "unreachable", "infeasible"})

#: A ranked layer's fields as ``layers.json`` and the report name them (``index`` is the store's ``idx`` column).
LAYER_KEYS = (
    "model",
    "mode",
    "name",
    "op_type",
    "index",
    "output",
    "fused_activation",
    "qdq_err",
    "xmodel_err",
    "norm_qdq",
    "norm_xmodel",
    "score",
    "rank",
)


def is_fully_quantized(cand: Mapping[str, Any]) -> bool:
    """A candidate (row or report entry) is its recipe's fully quantized model: no layer in float, none at another
    precision level."""
    return cand.get("k") == 0 and not cand.get("levels")


def layer_entry(row: dict[str, Any], keys: Sequence[str] = LAYER_KEYS) -> dict[str, Any]:
    """A stored layer row (:meth:`Store.layers`) with the ``keys`` of :data:`LAYER_KEYS` it shows."""
    return {k: row["idx" if k == "index" else k] for k in keys}


_TABLES: dict[str, tuple[dict[str, type], str | tuple[str, ...]]] = {
    "meta": ({"key": str, "value": str}, "key"),
    "models": (
        {
            "name": str,
            "source": str,
            "path": str,
            "sha256": str,
            "source_sha256": str,
            "size_bytes": int,
            "opset_original": int,
            "opset_used": int,
            "upgraded": int,
            "input_name": str,
            "input_shape": str,
            "notes": str,
        },
        "name",
    ),
    "datasets": (
        {"split": str, "path": str, "sha256": str, "size": int, "items": str, "labels": str, "skipped": str},
        "split",
    ),
    "calibrations": ({"key": str, "model": str, "settings": str, "path": str, "created_at": float}, "key"),
    "analyses": (
        {"model": str, "mode": str, "key": str, "fq_sha256": str, "seconds": float, "created_at": float},
        ("model", "mode"),
    ),
    "layers": (
        {
            "model": str,
            "mode": str,
            "name": str,
            "op_type": str,
            "idx": int,
            "output": str,
            "fused_activation": str,
            "qdq_err": float,
            "xmodel_err": float,
            "norm_qdq": float,
            "norm_xmodel": float,
            "score": float,
            "rank": int,
        },
        ("model", "mode", "name"),
    ),
    "candidates": (
        {
            "id": str,
            "model": str,
            "mode": str,
            "k": int,
            "kind": str,
            "label": str,
            "excluded": str,
            "levels": str,
            "settings_key": str,
            "build_key": str,
            "path": str,
            "size_bytes": int,
            "sha256": str,
            "runtime": str,
            "created_at": float,
        },
        "id",
    ),
    "devices": ({"name": str, "device_class": str, "info": str, "updated_at": float}, "name"),
    "jobs": (
        {
            "id": str,
            "candidate_id": str,
            "device": str,
            "state": str,
            "agent": str,
            "attempts": int,
            "lease_until": float,
            "error": str,
            "created_at": float,
            "updated_at": float,
            "level": str,
            # An ``infeasible`` job: the op types the device cannot run (JSON list), as the agent said.
            "unsupported_ops": str,
        },
        "id",
    ),
    "results": (
        {
            "job_id": str,
            "candidate_id": str,
            "device": str,
            "agent": str,
            "agent_id": str,
            "num_samples": int,
            "top_k": int,
            "topk": bytes,
            "agreement": float,
            "accuracy": float,
            "accuracy_top5": float,
            "latency_ms": float,
            "latency": str,
            "size_bytes": int,
            "simulated": float,
            "finished_at": float,
            "info": str,
            "attempt": int,
            "level": str,
            "split": str,
            # What the result is compared with: the prepared model its candidate was built from and
            # the evaluation sample (sha256s; a screen's is the sample it is a subset of), and the FP32
            # result (job id) its agreement was last computed against (see controller/accuracy.py).
            "model_sha256": str,
            "sample_sha256": str,
            "baseline_job": str,
        },
        "job_id",
    ),
    # What each search asked for: (search, candidate, level) with the label it gave the candidate.
    "proposals": (
        {
            "search": str,
            "candidate_id": str,
            "level": str,
            "model": str,
            "mode": str,
            "label": str,
            "seq": int,
            "created_at": float,
        },
        ("search", "candidate_id", "level"),
    ),
    "searches": ({"name": str, "params": str, "started_at": float, "finished_at": float}, "name"),
    # Feasibility planning (``[evaluation] feasibility = "adapt"``): per (model, recipe, device class)
    # the recipe planned there instead (itself, a variant, or itself after giving up), decided from
    # the op types of fully quantized candidates and the class's supported op types (``ops_digest``).
    "feasibility": (
        {
            "model": str,
            "recipe": str,
            "device_class": str,
            "planned": str,
            "status": str,
            "unsupported": str,
            "tried": str,
            "ops_digest": str,
            "created_at": float,
        },
        ("model", "recipe", "device_class"),
    ),
    # Rankings computed from evaluations (``measured``): per layer its gain and bytes, rank order.
    "rankings": (
        {"model": str, "mode": str, "name": str, "key": str, "layers": str, "created_at": float},
        ("model", "mode", "name"),
    ),
    # The search width in force when a search took decision ``step`` on (model, recipe): a resumed
    # search replays its decisions with these, the live width serves only steps not yet taken.
    "search_widths": (
        {"search": str, "model": str, "mode": str, "step": int, "width": int, "created_at": float},
        ("search", "model", "mode", "step"),
    ),
    # The screening sample of (model, recipe), kept once chosen: positions in the evaluation sample
    # (whose sha256 it was chosen from) and the device classes whose results chose it.
    "screens": (
        {"model": str, "mode": str, "eval_sha256": str, "positions": str, "classes": str, "created_at": float},
        ("model", "mode"),
    ),
}


def _locked(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def wrapper(self: Store, *args: Any, **kwargs: Any) -> T:
        with self.lock:
            return fn(self, *args, **kwargs)

    return wrapper


@contextmanager
def _not_a_store(path: Path) -> Iterator[None]:
    """A corrupt or foreign ``tuneqn.db`` (SQLite cannot read it) as one line naming the file (exit 2)."""
    try:
        yield
    except sqlite3.OperationalError:  # locked, unwritable, …: not the file's content
        raise
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{path}: not a readable tuneqn study store ({exc})") from None


class Store:
    """Typed access to the study's SQLite checkpoint (thread-safe: one lock, one connection)."""

    def __init__(self, path: Path, conn: sqlite3.Connection | None = None) -> None:
        self.path = path
        #: Serializes use of the one connection by the dispatcher's threads.
        self.lock = threading.RLock()
        if conn is not None:  # a read-only view (:meth:`open_readonly`): the schema is the file's
            self.db = sqlite_utils.Database(conn)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False, isolation_level=None)
        self.db = sqlite_utils.Database(conn)
        self.db.enable_wal()
        self.db.execute("PRAGMA synchronous=NORMAL")
        for name, (columns, pk) in _TABLES.items():
            table = self.db.table(name)
            if not table.exists():
                table.create(columns, pk=pk)
            else:  # a store of an older schema: add what is new (nothing is ever dropped)
                have = table.columns_dict
                for col, typ in columns.items():
                    if col not in have:
                        table.add_column(col, typ)
        if self.get_meta("schema_version") is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION))

    def _select(self, table: str, order: str, **filters: Any) -> list[dict[str, Any]]:
        """Rows of ``table`` whose columns equal the given (non-None) filters, in ``order``."""
        used = {k: v for k, v in filters.items() if v is not None}
        where = " where " + " and ".join(f"[{k}] = ?" for k in used) if used else ""
        sql = f"select * from [{table}]{where} order by {order}"  # noqa: S608 - fixed names from this module
        return [dict(r) for r in self.db.query(sql, list(used.values()))]

    @classmethod
    def open(cls, out_dir: Path) -> Store:
        """The store of the study in ``out_dir`` (:class:`UserError` when the file is not an SQLite store)."""
        path = out_dir / DB_NAME
        with _not_a_store(path):
            return cls(path)

    @classmethod
    def open_readonly(cls, out_dir: Path) -> Store:
        """A read-only view of the study in ``out_dir`` that writes nothing there: no lock, no schema upgrade.

        A store closed cleanly has no ``-wal`` file and is read as an immutable file (SQLite then creates no
        ``-wal``/``-shm`` beside it, so a read-only or copied folder works); while a writer has it open
        (a ``-wal`` file exists) it is read through SQLite's read-only mode, which sees the writer's commits.
        """
        path = Path(out_dir) / DB_NAME
        uri = path.resolve().as_uri()
        live = path.with_name(path.name + "-wal").exists()
        with _not_a_store(path):
            try:
                conn = sqlite3.connect(
                    f"{uri}?{'mode=ro' if live else 'immutable=1'}",
                    uri=True,
                    timeout=30.0,
                    check_same_thread=False,
                    isolation_level=None,
                )
                conn.execute("select count(*) from sqlite_master").fetchone()
            except sqlite3.OperationalError:
                if not live:
                    raise
                # no -shm and a folder we cannot write: read the file as it is (the writer's last checkpoint)
                conn = sqlite3.connect(f"{uri}?immutable=1", uri=True, check_same_thread=False, isolation_level=None)
                conn.execute("select count(*) from sqlite_master").fetchone()
        return cls(path, conn)

    def close(self) -> None:
        """Close the connection (after any query in flight on another thread)."""
        with self.lock:
            self.db.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All writes inside commit together (or not at all)."""
        with self.lock, self.db.atomic():
            yield

    def _one(self, sql: str, params: list[Any]) -> dict[str, Any] | None:
        """The first row of a query (the caller holds the lock), or None."""
        return next((dict(r) for r in self.db.query(sql, params)), None)

    # ------------------------------------------------------------------ meta
    @_locked
    def get_meta(self, key: str) -> str | None:
        """A meta value."""
        rows = list(self.db.query("select value from meta where key = ?", [key]))
        return rows[0]["value"] if rows else None

    @_locked
    def set_meta(self, key: str, value: str) -> None:
        """Set a meta value."""
        self.db.table("meta").upsert({"key": key, "value": value}, pk="key")

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
        self.db.table("models").upsert(row, pk="name")

    @_locked
    def models(self) -> list[dict[str, Any]]:
        """All models."""
        out = []
        for r in self.db.table("models").rows:
            r = dict(r)
            r["input_shape"] = json.loads(r["input_shape"])
            r["notes"] = json.loads(r["notes"] or "[]")
            r["upgraded"] = bool(r["upgraded"])
            out.append(r)
        return out

    @_locked
    def put_dataset(
        self,
        split: str,
        path: Path,
        sha256: str,
        items: list[str],
        labels: list[int] | None,
        skipped: list[dict[str, str]] | None = None,
    ) -> None:
        """Record a preprocessed split (``skipped``: unreadable inputs left out, ``{"file", "reason"}``)."""
        self.db.table("datasets").upsert(
            {
                "split": split,
                "path": str(path),
                "sha256": sha256,
                "size": len(items),
                "items": json.dumps(items),
                "labels": json.dumps(labels),
                "skipped": json.dumps(skipped or []),
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
        r["skipped"] = json.loads(r.get("skipped") or "[]")
        return r

    # ------------------------------------------------------------------ calibration / analysis
    @_locked
    def put_calibration(self, key: str, model: str, settings: dict[str, Any], path: Path) -> None:
        """Record a calibration cache file."""
        self.db.table("calibrations").upsert(
            {
                "key": key,
                "model": model,
                "settings": json.dumps(settings, sort_keys=True, default=list),
                "path": str(path),
                "created_at": time.time(),
            },
            pk="key",
        )

    @_locked
    def calibration(self, key: str) -> dict[str, Any] | None:
        """A calibration row."""
        return self._one("select * from calibrations where key = ?", [key])

    @_locked
    def put_analysis(
        self, model: str, mode: str, key: str, fq_sha256: str, seconds: float, layers: list[dict[str, Any]]
    ) -> None:
        """Replace the ranking of (model, mode) atomically."""
        with self.transaction():
            self.db.execute("delete from layers where model = ? and mode = ?", [model, mode])
            rows = []
            for layer in layers:
                row = {k: layer[k] for k in _TABLES["layers"][0] if k in layer}
                row.update({"model": model, "mode": mode, "idx": layer["index"]})
                rows.append(row)
            if rows:
                self.db.table("layers").insert_all(rows, pk=("model", "mode", "name"))
            self.db.table("analyses").upsert(
                {
                    "model": model,
                    "mode": mode,
                    "key": key,
                    "fq_sha256": fq_sha256,
                    "seconds": seconds,
                    "created_at": time.time(),
                },
                pk=("model", "mode"),
            )

    @_locked
    def analysis(self, model: str, mode: str) -> dict[str, Any] | None:
        """The analysis row of (model, mode)."""
        return self._one("select * from analyses where model = ? and mode = ?", [model, mode])

    @_locked
    def layers(self, model: str | None = None, mode: str | None = None) -> list[dict[str, Any]]:
        """Ranked layers, rank order within each (model, mode)."""
        return self._select("layers", "model, mode, rank", model=model, mode=mode)

    # ------------------------------------------------------------------ candidates
    @_locked
    def put_candidate(self, row: dict[str, Any]) -> None:
        """Insert or replace a candidate."""
        row = dict(row)
        row["excluded"] = json.dumps(row["excluded"])
        row["levels"] = json.dumps(row.get("levels") or {}, sort_keys=True)
        row["runtime"] = json.dumps(row.get("runtime") or {})
        row.setdefault("created_at", time.time())
        self.db.table("candidates").upsert(row, pk="id")

    def _decode_candidate(self, r: dict[str, Any]) -> dict[str, Any]:
        r = dict(r)
        r["excluded"] = json.loads(r["excluded"])
        r["levels"] = json.loads(r.get("levels") or "{}")  # a store of before the precision levels has none
        r["runtime"] = json.loads(r["runtime"] or "{}")
        return r

    @_locked
    def candidate(self, cid: str) -> dict[str, Any] | None:
        """One candidate by id."""
        rows = list(self.db.query("select * from candidates where id = ?", [cid]))
        return self._decode_candidate(rows[0]) if rows else None

    @_locked
    def delete_candidate(self, cid: str) -> None:
        """Forget a candidate (its jobs and results stay: nothing measured is deleted)."""
        self.db.execute("delete from candidates where id = ?", [cid])

    @_locked
    def candidates(self, model: str | None = None, mode: str | None = None) -> list[dict[str, Any]]:
        """Candidates, ordered by model, mode, kind, k."""
        rows = self._select("candidates", "model, mode, kind desc, k, label", model=model, mode=mode)
        return [self._decode_candidate(r) for r in rows]

    # ------------------------------------------------------------------ devices
    @_locked
    def put_device(self, name: str, device_class: str, info: dict[str, Any]) -> None:
        """Insert or replace a device (a device class as the study schedules it)."""
        self.db.table("devices").upsert(
            {
                "name": name,
                "device_class": device_class,
                "info": json.dumps(info, sort_keys=True),
                "updated_at": time.time(),
            },
            pk="name",
        )

    @_locked
    def devices(self) -> list[dict[str, Any]]:
        """All devices by name (``info`` decoded)."""
        out = []
        for r in self.db.query("select * from devices order by name"):
            r = dict(r)
            r["info"] = json.loads(r["info"] or "{}")
            out.append(r)
        return out

    # ------------------------------------------------------------------ jobs
    @_locked
    def job(self, job_id: str) -> dict[str, Any] | None:
        """One job row."""
        return self._one("select * from jobs where id = ?", [job_id])

    @_locked
    def jobs(
        self,
        state: str | None = None,
        agent: str | None = None,
        level: str | None = None,
        candidate_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Job rows, optionally of one state, agent, level and/or candidate (older rows count as full)."""
        rows = self._select("jobs", "created_at, id", state=state, agent=agent, candidate_id=candidate_id)
        for r in rows:
            r["level"] = r.get("level") or "full"
        return [r for r in rows if level is None or r["level"] == level]

    @_locked
    def add_job(self, job_id: str, candidate_id: str, device: str, level: str = "full") -> dict[str, Any]:
        """Register a job as pending unless it is known; returns its row (``level``: full or screen)."""
        row = self.job(job_id)
        if row is None:
            now = time.time()
            self.db.table("jobs").insert(
                {
                    "id": job_id,
                    "candidate_id": candidate_id,
                    "device": device,
                    "state": "pending",
                    "agent": None,
                    "attempts": 0,
                    "lease_until": 0.0,
                    "error": None,
                    "created_at": now,
                    "updated_at": now,
                    "level": level,
                },
                pk="id",
            )
            row = self.job(job_id)
        if row is None:  # pragma: no cover - just inserted under the lock
            raise RuntimeError(f"job {job_id} vanished")
        return row

    @_locked
    def update_job(self, job_id: str, **fields: Any) -> None:
        """Change a job's fields (``updated_at`` is set)."""
        fields["updated_at"] = time.time()
        self.db.table("jobs").update(job_id, fields)

    @_locked
    def renew_lease(self, job_id: str, agent: str, until: float) -> None:
        """Extend the lease of a job that ``agent`` holds."""
        self.db.execute(
            "update jobs set lease_until = ?, updated_at = ? where id = ? and agent = ? and state = 'submitted'",
            [until, time.time(), job_id, agent],
        )

    @_locked
    def expired_leases(self, now: float) -> list[dict[str, Any]]:
        """Submitted jobs whose lease ended before ``now``."""
        return [
            dict(r) for r in self.db.query("select * from jobs where state = 'submitted' and lease_until < ?", [now])
        ]

    @_locked
    def job_counts(self, ids: list[str] | None = None) -> dict[str, int]:
        """Jobs per state (of ``ids`` only, when given)."""
        out: dict[str, int] = {}
        if ids is None:
            rows = self.db.query("select state, count(*) c from jobs group by state")
            return {r["state"]: r["c"] for r in rows}
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            q = f"select state, count(*) c from jobs where id in ({','.join('?' * len(chunk))}) group by state"  # noqa: S608
            for r in self.db.query(q, chunk):
                out[r["state"]] = out.get(r["state"], 0) + r["c"]
        return out

    @_locked
    def set_infeasible(self, job_id: str, error: str, unsupported_ops: list[str]) -> None:
        """End a job as ``infeasible``: its device cannot run the model (never retried)."""
        self.update_job(job_id, state="infeasible", error=error, unsupported_ops=json.dumps(sorted(unsupported_ops)))

    # ------------------------------------------------------------------ results
    @_locked
    def put_result(self, row: dict[str, Any]) -> bool:
        """Store a job's result and mark the job done, atomically; False when it already had one."""
        with self.transaction():
            if list(self.db.query("select 1 from results where job_id = ?", [row["job_id"]])):
                return False
            self.db.table("results").insert(row, pk="job_id")
            self.db.table("jobs").update(
                row["job_id"], {"state": "done", "agent": row.get("agent"), "error": None, "updated_at": time.time()}
            )
        return True

    @_locked
    def result(self, job_id: str) -> dict[str, Any] | None:
        """One result row."""
        return self._one("select * from results where job_id = ?", [job_id])

    @_locked
    def results(
        self, candidate_id: str | None = None, device: str | None = None, level: str | None = None
    ) -> list[dict[str, Any]]:
        """Result rows, optionally of one candidate, device and/or level (older rows count as full)."""
        rows = self._select("results", "finished_at", candidate_id=candidate_id, device=device)
        for r in rows:
            r["level"] = r.get("level") or "full"
        return [r for r in rows if level is None or r["level"] == level]

    # ------------------------------------------------------------------ searches
    @_locked
    def put_search(self, name: str, params: dict[str, Any]) -> None:
        """Record a search of the study (its start time is kept across runs)."""
        rows = list(self.db.query("select started_at from searches where name = ?", [name]))
        started = rows[0]["started_at"] if rows else time.time()
        self.db.table("searches").upsert(
            {"name": name, "params": json.dumps(params, sort_keys=True), "started_at": started, "finished_at": None},
            pk="name",
        )

    @_locked
    def finish_search(self, name: str) -> None:
        """Mark a search as done proposing."""
        self.db.execute(
            "update searches set finished_at = ? where name = ? and finished_at is null", [time.time(), name]
        )

    @_locked
    def searches(self) -> list[dict[str, Any]]:
        """Searches in the order they were first started (``params`` decoded)."""
        out = self._select("searches", "started_at, name")
        for r in out:
            r["params"] = json.loads(r["params"] or "{}")
        return out

    @_locked
    def put_proposal(self, search: str, candidate_id: str, level: str, model: str, mode: str, label: str) -> bool:
        """Record that ``search`` asked for a candidate at a level; False when it had before."""
        if list(
            self.db.query(
                "select 1 from proposals where search = ? and candidate_id = ? and level = ?",
                [search, candidate_id, level],
            )
        ):
            return False
        seq = next(iter(self.db.query("select count(*) c from proposals where search = ?", [search])))["c"]
        self.db.table("proposals").insert(
            {
                "search": search,
                "candidate_id": candidate_id,
                "level": level,
                "model": model,
                "mode": mode,
                "label": label,
                "seq": seq,
                "created_at": time.time(),
            },
            pk=("search", "candidate_id", "level"),
        )
        return True

    @_locked
    def proposals(
        self, search: str | None = None, model: str | None = None, mode: str | None = None
    ) -> list[dict[str, Any]]:
        """What the searches asked for, in order."""
        return self._select("proposals", "search, seq", search=search, model=model, mode=mode)

    @_locked
    def put_feasibility(
        self,
        model: str,
        recipe: str,
        device_class: str,
        planned: str,
        status: str,
        unsupported: list[str],
        tried: list[dict[str, Any]],
        ops_digest: str,
    ) -> None:
        """Record what runs of (model, recipe) on a device class: ``planned`` (the recipe or a variant),
        ``status`` (``feasible``, ``adapted``, ``gave-up``), the base recipe's unsupported op types and
        the recipes tried on the way (``[{"recipe", "unsupported"}]``)."""
        self.db.table("feasibility").upsert(
            {
                "model": model,
                "recipe": recipe,
                "device_class": device_class,
                "planned": planned,
                "status": status,
                "unsupported": json.dumps(sorted(unsupported)),
                "tried": json.dumps(tried),
                "ops_digest": ops_digest,
                "created_at": time.time(),
            },
            pk=("model", "recipe", "device_class"),
        )

    @_locked
    def feasibility(
        self, model: str | None = None, recipe: str | None = None, device_class: str | None = None
    ) -> list[dict[str, Any]]:
        """Feasibility decisions (``unsupported`` and ``tried`` decoded)."""
        out = self._select(
            "feasibility", "model, recipe, device_class", model=model, recipe=recipe, device_class=device_class
        )
        for r in out:
            r["unsupported"] = json.loads(r["unsupported"] or "[]")
            r["tried"] = json.loads(r["tried"] or "[]")
        return out

    @_locked
    def put_ranking(self, model: str, mode: str, name: str, key: str, layers: list[dict[str, Any]]) -> None:
        """Store a ranking computed from evaluations (layers in rank order)."""
        self.db.table("rankings").upsert(
            {
                "model": model,
                "mode": mode,
                "name": name,
                "key": key,
                "layers": json.dumps(layers),
                "created_at": time.time(),
            },
            pk=("model", "mode", "name"),
        )

    @_locked
    def rankings(self, model: str | None = None, mode: str | None = None) -> list[dict[str, Any]]:
        """Stored computed rankings (``layers`` decoded)."""
        out = self._select("rankings", "model, mode, name", model=model, mode=mode)
        for r in out:
            r["layers"] = json.loads(r["layers"] or "[]")
        return out

    @_locked
    def put_search_width(self, search: str, model: str, mode: str, step: int, width: int) -> bool:
        """Record the width ``search`` took decision ``step`` of (model, recipe) with; False (and the first
        record kept) when that step was recorded before."""
        if list(
            self.db.query(
                "select 1 from search_widths where search = ? and model = ? and mode = ? and step = ?",
                [search, model, mode, step],
            )
        ):
            return False
        self.db.table("search_widths").insert(
            {"search": search, "model": model, "mode": mode, "step": step, "width": width, "created_at": time.time()},
            pk=("search", "model", "mode", "step"),
        )
        return True

    @_locked
    def search_widths(
        self, search: str | None = None, model: str | None = None, mode: str | None = None
    ) -> list[dict[str, Any]]:
        """Recorded search widths, by search, model, recipe and step."""
        return self._select("search_widths", "search, model, mode, step", search=search, model=model, mode=mode)

    @_locked
    def put_screen(self, model: str, mode: str, eval_sha256: str, positions: list[int], classes: list[str]) -> None:
        """Keep the screening sample chosen for (model, recipe): ``positions`` in the evaluation sample
        whose sha256 is ``eval_sha256``, chosen from the results of ``classes``."""
        self.db.table("screens").upsert(
            {
                "model": model,
                "mode": mode,
                "eval_sha256": eval_sha256,
                "positions": json.dumps([int(i) for i in positions]),
                "classes": json.dumps(sorted(classes)),
                "created_at": time.time(),
            },
            pk=("model", "mode"),
        )

    @_locked
    def screen(self, model: str, mode: str) -> dict[str, Any] | None:
        """The kept screening sample of (model, recipe) (``positions`` and ``classes`` decoded), or None."""
        rows = self._select("screens", "model", model=model, mode=mode)
        if not rows:
            return None
        r = rows[0]
        r["positions"] = json.loads(r["positions"] or "[]")
        r["classes"] = json.loads(r["classes"] or "[]")
        return r

    @_locked
    def set_result_metrics(
        self, job_id: str, metrics: dict[str, float | None], baseline_job: str | None = None
    ) -> None:
        """Store the metrics computed from a result (agreement, accuracy, accuracy_top5) and the FP32 result
        (job id) its agreement was computed against (None: none)."""
        row: dict[str, Any] = {k: metrics.get(k) for k in ("agreement", "accuracy", "accuracy_top5")}
        row["baseline_job"] = baseline_job
        self.db.table("results").update(job_id, row)

    # --- report reads
    @_locked
    def datasets(self) -> list[dict[str, Any]]:
        """Every split's row by split name (decoded as :meth:`dataset` does)."""
        names = [r["split"] for r in self.db.query("select split from datasets order by split")]
        return [d for d in (self.dataset(n) for n in names) if d is not None]
