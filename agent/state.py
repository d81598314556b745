"""The agent's own small SQLite database (``<state dir>/agent.db``, WAL mode).

Tables:

* ``meta(key, value)`` — the agent instance id.
* ``jobs(job_id pk, spec, device, state, result, error, created, updated, attempt,
  remeasure_token, series_start, device_class)`` — ``spec`` (the latest submitted spec) and ``result``
  are serialized ``tuneqn.v1.JobSpec`` / ``tuneqn.v1.JobResult`` bytes, ``state`` the
  JobState name (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED). ``attempt`` and
  ``remeasure_token`` are those of the submission that queued the current (or last)
  execution series; ``series_start`` is the number of executions the job had before that
  series, so the series' own executions bound the restart re-queue. ``device_class`` is the
  class of ``device`` when it was recorded: a device may be gone after a restart (a TVM lane
  whose RPC server left), and a resubmission of the job for another device of that class is
  still the same job.
* ``executions(id pk, job_id, started, finished, outcome, attempt)`` — one row per time a
  job actually started executing; ``outcome`` is the final state name, or
  ``interrupted`` when the agent stopped or died during the run.

Databases of older agents get the missing columns added (defaults 0 / empty).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX hosts run without the lock
    fcntl = None  # type: ignore[assignment]

DB_NAME = "agent.db"
LOCK_NAME = "agent.lock"
UNFINISHED = ("QUEUED", "RUNNING")
FINISHED = ("SUCCEEDED", "FAILED", "CANCELLED")


class StateDirInUse(RuntimeError):
    """Another agent process holds the state directory."""


class StateDirLock:
    """Exclusive lock on a state dir so that two agents never share one (released on exit)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LOCK_NAME
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if fcntl is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise StateDirInUse(f"state dir {state_dir} is in use by another agent") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class JobRow:
    """One row of the ``jobs`` table."""

    job_id: str
    spec: bytes
    device: str
    state: str
    result: bytes | None
    error: str | None
    created: float
    updated: float
    attempt: int = 0
    remeasure_token: str = ""
    series_start: int = 0
    device_class: str = ""


class AgentState:
    """Thread-safe access to the agent database."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / DB_NAME
        self._lock = threading.Lock()
        conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
        self.db = sqlite_utils.Database(conn, execute_plugins=False)
        self.db.enable_wal()
        with self._lock:
            self.db.table("meta").create({"key": str, "value": str}, pk="key", if_not_exists=True)
            jobs = {"job_id": str, "spec": bytes, "device": str, "state": str, "result": bytes, "error": str}
            self.db.table("jobs").create({**jobs, "created": float, "updated": float}, pk="job_id", if_not_exists=True)
            executions = {"id": int, "job_id": str, "started": float, "finished": float, "outcome": str, "attempt": int}
            self.db.table("executions").create(executions, pk="id", if_not_exists=True)
            self._add_missing_columns()
            self.db.table("executions").create_index(["job_id"], if_not_exists=True)
            self.db.table("jobs").create_index(["state"], if_not_exists=True)

    def _add_missing_columns(self) -> None:
        """Columns added after the first release (older state dirs lack them)."""
        wanted: dict[str, dict[str, tuple[type, int | str]]] = {
            "jobs": {
                "attempt": (int, 0),
                "remeasure_token": (str, ""),
                "series_start": (int, 0),
                "device_class": (str, ""),
            },
            "executions": {"attempt": (int, 0)},
        }
        for table, columns in wanted.items():
            present = self.db.table(table).columns_dict
            for name, (kind, default) in columns.items():
                if name not in present:
                    self.db.table(table).add_column(name, kind, not_null_default=default)

    def agent_id(self) -> str:
        """The instance id, created on first use and stable for this state dir."""
        with self._lock:
            rows = list(self.db.table("meta").rows_where("key = ?", ["agent_id"]))
            if rows:
                return str(rows[0]["value"])
            value = uuid.uuid4().hex
            self.db.table("meta").insert({"key": "agent_id", "value": value}, pk="key")
            return value

    def insert_job(
        self,
        job_id: str,
        spec: bytes,
        device: str,
        attempt: int = 0,
        remeasure_token: str = "",
        state: str = "QUEUED",
        device_class: str = "",
    ) -> None:
        """Record a newly submitted job."""
        now = time.time()
        with self._lock:
            self.db.table("jobs").insert(
                {
                    "job_id": job_id,
                    "spec": spec,
                    "device": device,
                    "state": state,
                    "result": None,
                    "error": None,
                    "created": now,
                    "updated": now,
                    "attempt": attempt,
                    "remeasure_token": remeasure_token,
                    "series_start": 0,
                    "device_class": device_class,
                },
                pk="job_id",
            )

    def requeue_job(self, job_id: str, spec: bytes, attempt: int, remeasure_token: str) -> None:
        """Queue a finished job for a new execution series (its old result is dropped)."""
        with self._lock, self.db.conn:
            count = self.db.table("executions").count_where("job_id = ?", [job_id])
            self.db.table("jobs").update(
                job_id,
                {
                    "spec": spec,
                    "state": "QUEUED",
                    "result": None,
                    "error": None,
                    "updated": time.time(),
                    "attempt": attempt,
                    "remeasure_token": remeasure_token,
                    "series_start": count,
                },
            )

    def update_spec(
        self,
        job_id: str,
        spec: bytes,
        attempt: int | None = None,
        remeasure_token: str | None = None,
        device: str | None = None,
        device_class: str | None = None,
    ) -> None:
        """Store the latest spec of a known job (and the series' attempt/token, its device and the
        device's class, when given)."""
        updates: dict[str, object] = {"spec": spec}
        if device is not None:
            updates["device"] = device
        if device_class is not None:
            updates["device_class"] = device_class
        if attempt is not None:
            updates["attempt"] = attempt
        if remeasure_token is not None:
            updates["remeasure_token"] = remeasure_token
        with self._lock, self.db.conn:
            self.db.table("jobs").update(job_id, updates)

    def get_job(self, job_id: str) -> JobRow | None:
        """The job's row, or None if unknown."""
        with self._lock:
            rows = list(self.db.table("jobs").rows_where("job_id = ?", [job_id]))
        return _row(rows[0]) if rows else None

    def set_state(self, job_id: str, state: str, result: bytes | None = None, error: str | None = None) -> None:
        """Update a job's state (and, when finished, its result and error)."""
        updates: dict[str, object] = {"state": state, "updated": time.time()}
        if result is not None:
            updates["result"] = result
        if error is not None:
            updates["error"] = error
        with self._lock, self.db.conn:
            self.db.table("jobs").update(job_id, updates)

    def unfinished_jobs(self) -> list[JobRow]:
        """Jobs left queued or running, in submission order."""
        with self._lock:
            rows = list(
                self.db.table("jobs").rows_where("state in (?, ?)", list(UNFINISHED), order_by="created, rowid")
            )
        return [_row(r) for r in rows]

    def job_counts(self) -> dict[str, int]:
        """How many jobs the database holds in each state."""
        with self._lock:
            rows = self.db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        return {str(state): int(n) for state, n in rows}

    def recent_failures(self, limit: int = 20) -> list[JobRow]:
        """The latest FAILED jobs, newest first."""
        with self._lock:
            rows = list(
                self.db.table("jobs").rows_where("state = 'FAILED'", order_by="updated desc, rowid desc", limit=limit)
            )
        return [_row(r) for r in rows]

    def start_execution(self, job_id: str, attempt: int = 0) -> int:
        """Record that the job starts executing now; returns the execution id."""
        with self._lock:
            table = self.db.table("executions").insert(
                {
                    "job_id": job_id,
                    "started": time.time(),
                    "finished": None,
                    "outcome": None,
                    "attempt": attempt,
                },
                pk="id",
            )
            if table.last_pk is None:  # sqlite-utils sets it on every insert
                raise RuntimeError("sqlite-utils gave no id for the inserted execution")
            return int(table.last_pk)

    def finish_execution(self, execution_id: int, outcome: str) -> None:
        """Record how an execution ended."""
        with self._lock, self.db.conn:
            self.db.table("executions").update(execution_id, {"finished": time.time(), "outcome": outcome})

    def close_dangling_executions(self) -> int:
        """Mark executions left open by a crash as ``interrupted``; returns how many."""
        with self._lock, self.db.conn:
            cur = self.db.execute(
                "UPDATE executions SET finished = ?, outcome = 'interrupted' WHERE finished IS NULL",
                [time.time()],
            )
            return cur.rowcount

    def count_executions(self, job_id: str) -> int:
        """How many times the job started executing."""
        with self._lock:
            return self.db.table("executions").count_where("job_id = ?", [job_id])

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self.db.close()


def _row(r: dict[str, Any]) -> JobRow:
    return JobRow(
        job_id=str(r["job_id"]),
        spec=bytes(r["spec"]),
        device=str(r["device"]),
        state=str(r["state"]),
        result=bytes(r["result"]) if r["result"] is not None else None,
        error=str(r["error"]) if r["error"] is not None else None,
        created=float(r["created"]),
        updated=float(r["updated"]),
        attempt=int(r.get("attempt") or 0),
        remeasure_token=str(r.get("remeasure_token") or ""),
        series_start=int(r.get("series_start") or 0),
        device_class=str(r.get("device_class") or ""),
    )
