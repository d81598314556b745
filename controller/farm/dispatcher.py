"""The controller's dispatcher: jobs for every (candidate, device) over gRPC agents.

Life-cycle of a job (controller side, every change committed to SQLite first)::

    pending ──take──▶ submitted(agent, lease) ──result──▶ done
       ▲                   │  agent vanished: lease kept; the same agent re-collects the
       │                   │  job by id when it returns (agents keep finished results)
       └── lease expired / agent reported failure (attempts < max) ──┘     └──▶ failed

Agents of one ``device_class`` are interchangeable workers of one device; every other
device gets every job. One job at a time per agent keeps latency undisturbed. The
job id is derived from the candidate's and the dataset's content and the device, so
resubmitting it anywhere is idempotent and a result is stored at most once.

Agent liveness states: CONNECTING → READY ⇄ BUSY; any RPC failure → UNREACHABLE
(reconnect with backoff) → READY; a contract mismatch → INCOMPATIBLE (never used).
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from tuneqn.controller.farm.client import AgentClient, ContractMismatch, decode_topk
from tuneqn.controller.store import Store
from tuneqn.v1 import agent_pb2 as pb

log = logging.getLogger(__name__)


class AgentLost(Exception):
    """The agent's stream ended without a final event (connection lost or agent stopping)."""


class AgentState(enum.Enum):
    """Explicit liveness of an agent as seen by the controller."""

    CONNECTING = "connecting"
    READY = "ready"
    BUSY = "busy"
    UNREACHABLE = "unreachable"
    INCOMPATIBLE = "incompatible"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Endpoint:
    """How to reach an agent."""

    address: str
    token: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def client(self, timeout: float = 30.0) -> AgentClient:
        """A new client of this agent."""
        return AgentClient(self.address, token=self.token, tls_ca=self.tls_ca, tls_cert=self.tls_cert,
                           tls_key=self.tls_key, timeout=timeout)


@dataclass(frozen=True)
class JobPlan:
    """One evaluation: a candidate (or the FP32 model) on one device class."""

    id: str
    candidate_id: str
    device: str
    model_path: Path
    model_sha256: str
    dataset_path: Path
    dataset_sha256: str
    input_name: str
    disabled_optimizers: tuple[str, ...] = ()


@dataclass
class EvalSettings:
    """Per-job evaluation settings and dispatcher timing."""

    top_k: int = 5
    chunk_size: int = 32
    latency_warmup: int = 3
    latency_repeats: int = 20
    intra_op_threads: int = 0
    lease_timeout_s: float = 600.0
    max_attempts: int = 3
    rpc_timeout_s: float = 30.0


def job_id(candidate_sha256: str, dataset_sha256: str, device: str, settings: EvalSettings) -> str:
    """Content-derived job id: the same work on the same device always has the same id."""
    key = json.dumps([candidate_sha256, dataset_sha256, device, settings.top_k, settings.latency_warmup,
                      settings.latency_repeats], sort_keys=True)
    return f"tq-{hashlib.sha256(key.encode()).hexdigest()[:32]}"


@dataclass
class _Live:
    jobs: dict[str, JobPlan] = field(default_factory=dict)
    pending: dict[str, list[str]] = field(default_factory=dict)  # device class -> job ids (FIFO)
    closed: bool = False


class JobBoard:
    """Shared job table of the dispatcher; every transition is committed to the store first."""

    def __init__(self, store: Store, settings: EvalSettings,
                 on_change: Callable[[str, str], None] | None = None) -> None:
        self.store = store
        self.settings = settings
        self.on_change = on_change
        self.cond = threading.Condition()
        self.live = _Live()

    # -------------------------------------------------------------- bookkeeping
    def _row(self, jid: str) -> dict[str, Any] | None:
        rows = list(self.store.db.query("select * from jobs where id = ?", [jid]))
        return dict(rows[0]) if rows else None

    def add(self, plan: JobPlan) -> str:
        """Register a job (idempotent); returns its stored state."""
        with self.cond, self.store.lock:
            self.live.jobs[plan.id] = plan
            row = self._row(plan.id)
            now = time.time()
            if row is None:
                self.store.db["jobs"].insert(
                    {"id": plan.id, "candidate_id": plan.candidate_id, "device": plan.device, "state": "pending",
                     "agent": None, "attempts": 0, "lease_until": 0.0, "error": None, "created_at": now,
                     "updated_at": now},
                    pk="id",
                )
                state = "pending"
            else:
                state = row["state"]
                if state == "failed":  # a new run retries what failed before
                    self.store.db["jobs"].update(plan.id, {"state": "pending", "attempts": 0, "error": None,
                                                           "updated_at": now})
                    state = "pending"
            if state == "pending":
                self.live.pending.setdefault(plan.device, []).append(plan.id)
            self.cond.notify_all()
            return state

    def close(self) -> None:
        """No more jobs will be added."""
        with self.cond:
            self.live.closed = True
            self.cond.notify_all()

    def counts(self) -> dict[str, int]:
        """Jobs of this run per state."""
        with self.store.lock:
            ids = list(self.live.jobs)
            out: dict[str, int] = {}
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                q = f"select state, count(*) c from jobs where id in ({','.join('?' * len(chunk))}) group by state"  # noqa: S608
                for r in self.store.db.query(q, chunk):
                    out[r["state"]] = out.get(r["state"], 0) + r["c"]
            return out

    def _unfinished(self) -> int:
        c = self.counts()
        return c.get("pending", 0) + c.get("submitted", 0)

    def finished(self) -> bool:
        """All registered jobs are done or failed and no more will come."""
        with self.cond:
            return self.live.closed and self._unfinished() == 0

    # -------------------------------------------------------------- transitions
    def in_flight_for(self, agent: str) -> list[JobPlan]:
        """Jobs this agent holds (submitted to it and not finished): re-collect them first."""
        with self.store.lock:
            rows = list(self.store.db.query("select id from jobs where state = 'submitted' and agent = ?", [agent]))
        return [self.live.jobs[r["id"]] for r in rows if r["id"] in self.live.jobs]

    def take(self, device: str, agent: str, timeout: float) -> JobPlan | None:
        """The next job for ``device``, leased to ``agent``; None when nothing came in ``timeout``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                self._expire_leases()
                queue = self.live.pending.get(device, [])
                while queue:
                    jid = queue.pop(0)
                    with self.store.lock:
                        row = self._row(jid)
                        if row is None or row["state"] != "pending":
                            continue
                        self.store.db["jobs"].update(jid, {
                            "state": "submitted", "agent": agent, "attempts": row["attempts"] + 1,
                            "lease_until": time.time() + self.settings.lease_timeout_s, "updated_at": time.time(),
                        })
                    self._changed(jid, "submitted")
                    return self.live.jobs[jid]
                if self.live.closed and self._unfinished() == 0:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.cond.wait(min(remaining, 1.0))

    def renew(self, jid: str, agent: str) -> None:
        """The agent is alive and working on the job: extend its lease."""
        with self.store.lock:
            self.store.db.execute(
                "update jobs set lease_until = ?, updated_at = ? where id = ? and agent = ? and state = 'submitted'",
                [time.time() + self.settings.lease_timeout_s, time.time(), jid, agent],
            )

    def _expire_leases(self) -> None:
        now = time.time()
        with self.store.lock:
            rows = list(self.store.db.query(
                "select id, device, agent, attempts from jobs where state = 'submitted' and lease_until < ?", [now]))
            for r in rows:
                if r["id"] not in self.live.jobs:
                    continue
                log.warning("job %s: lease of %s expired; re-running it elsewhere", r["id"], r["agent"])
                self.store.db["jobs"].update(r["id"], {"state": "pending", "updated_at": now,
                                                       "error": f"lease of {r['agent']} expired"})
                self.live.pending.setdefault(r["device"], []).insert(0, r["id"])
        if rows:
            self.cond.notify_all()

    def complete(self, plan: JobPlan, agent: str, result: pb.JobResult) -> bool:
        """Store a result and mark the job done (once: a second result for it is dropped)."""
        topk = decode_topk(result)
        lat = result.latency
        with self.cond, self.store.lock:
            row = self._row(plan.id)
            if row is None or row["state"] == "done":
                return False
            with self.store.db.atomic():
                self.store.db["results"].insert(
                    {
                        "job_id": plan.id, "candidate_id": plan.candidate_id, "device": plan.device, "agent": agent,
                        "agent_id": result.agent_id, "num_samples": int(result.num_samples),
                        "top_k": int(result.top_k), "topk": topk.astype("<i4").tobytes(), "agreement": None,
                        "accuracy": None, "accuracy_top5": None,
                        "latency_ms": lat.median_ms if lat.count else None,
                        "latency": json.dumps({
                            "median_ms": lat.median_ms, "p90_ms": lat.p90_ms, "p10_ms": lat.p10_ms,
                            "mean_ms": lat.mean_ms, "std_ms": lat.std_ms, "min_ms": lat.min_ms, "max_ms": lat.max_ms,
                            "count": lat.count,
                        }),
                        "size_bytes": int(result.model_size_bytes),
                        "simulated": float(result.simulated_latency_ms_per_sample),
                        "finished_at": float(result.finished_at) or time.time(),
                        "info": json.dumps({"device_name": result.device, "device_class": result.device_class,
                                            "inference_seconds": result.inference_seconds,
                                            "runtime_versions": dict(result.runtime_versions)}),
                    },
                    pk="job_id", ignore=True,
                )
                self.store.db["jobs"].update(plan.id, {"state": "done", "agent": agent, "error": None,
                                                       "updated_at": time.time()})
            self.cond.notify_all()
        self._changed(plan.id, "done")
        return True

    def fail(self, plan: JobPlan, agent: str, error: str) -> None:
        """The agent reported a failure: retry (with another attempt) or give up."""
        with self.cond, self.store.lock:
            row = self._row(plan.id)
            if row is None or row["state"] == "done":
                return
            state = "failed" if row["attempts"] >= self.settings.max_attempts else "pending"
            self.store.db["jobs"].update(plan.id, {"state": state, "error": error[:2000], "updated_at": time.time()})
            if state == "pending":
                self.live.pending.setdefault(plan.device, []).append(plan.id)
            self.cond.notify_all()
        self._changed(plan.id, state)

    def _changed(self, jid: str, state: str) -> None:
        if self.on_change is not None:
            self.on_change(jid, state)


#: Errors that no retry can fix.
_FATAL = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED)


class Worker(threading.Thread):
    """Drives one agent: uploads blobs by hash, submits, watches, re-collects."""

    def __init__(self, endpoint: Endpoint, board: JobBoard, stop: threading.Event) -> None:
        super().__init__(name=f"agent-{endpoint.address}", daemon=True)
        self.endpoint = endpoint
        self.board = board
        self.stop_event = stop
        self.state = AgentState.CONNECTING
        self.info: pb.AgentInfo | None = None
        self.client: AgentClient | None = None
        self.error: str | None = None
        self.executed = 0

    @property
    def device(self) -> str:
        """The study's name for this agent's device (its class)."""
        return self.info.devices[0].device_class if self.info and self.info.devices else self.endpoint.address

    def connect(self) -> bool:
        """Handshake; False (state UNREACHABLE/INCOMPATIBLE) when it fails."""
        if self.client is None:
            self.client = self.endpoint.client(self.board.settings.rpc_timeout_s)
        try:
            self.info = self.client.info()
        except ContractMismatch as exc:
            self.state, self.error = AgentState.INCOMPATIBLE, str(exc)
            return False
        except grpc.RpcError as exc:
            fatal = exc.code() in _FATAL
            self.state = AgentState.INCOMPATIBLE if fatal else AgentState.UNREACHABLE
            self.error = f"{exc.code().name}: {exc.details()}"
            return False
        if not self.info.devices:
            self.state, self.error = AgentState.INCOMPATIBLE, "agent reports no device"
            return False
        self.state, self.error = AgentState.READY, None
        return True

    def run(self) -> None:
        backoff = 0.2
        while not self.stop_event.is_set():
            if self.state in (AgentState.INCOMPATIBLE, AgentState.STOPPED):
                return
            if self.state != AgentState.READY and not self.connect():
                if self.state == AgentState.INCOMPATIBLE or self.board.finished():
                    return
                self.stop_event.wait(backoff)  # reconnect backoff
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.2
            try:
                held = self.board.in_flight_for(self.endpoint.address)
                plan = held[0] if held else self.board.take(self.device, self.endpoint.address, timeout=1.0)
                if plan is None:
                    if self.board.finished():
                        break
                    continue
                self._run(plan)
            except grpc.RpcError as exc:
                if exc.code() in _FATAL:
                    self.state, self.error = AgentState.INCOMPATIBLE, f"{exc.code().name}: {exc.details()}"
                    return
                log.warning("agent %s: %s (%s); reconnecting", self.endpoint.address, exc.code().name, exc.details())
                self.state, self.error = AgentState.UNREACHABLE, f"{exc.code().name}: {exc.details()}"
            except AgentLost as exc:
                self.state, self.error = AgentState.UNREACHABLE, str(exc)
        self.state = AgentState.STOPPED
        if self.client is not None:
            self.client.close()

    def _ensure_blobs(self, plan: JobPlan) -> None:
        client = self.client
        if client is None:
            raise RuntimeError("not connected")
        have = client.has_blobs([plan.model_sha256, plan.dataset_sha256])
        for present, path in zip(have, (plan.model_path, plan.dataset_path), strict=True):
            if not present:
                client.upload_file(path)

    def _run(self, plan: JobPlan) -> None:
        client = self.client
        if client is None:
            raise RuntimeError("not connected")
        self.state = AgentState.BUSY
        s = self.board.settings
        spec = pb.JobSpec(
            job_id=plan.id, device=self.info.devices[0].name if self.info else "", model_sha256=plan.model_sha256,
            dataset_sha256=plan.dataset_sha256, input_name=plan.input_name, top_k=s.top_k, chunk_size=s.chunk_size,
            latency_warmup=s.latency_warmup, latency_repeats=s.latency_repeats,
            ort_disabled_optimizers=list(plan.disabled_optimizers), intra_op_threads=s.intra_op_threads,
        )
        try:
            events = client.watch(plan.id)
            result = self._follow(plan, events)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            result = None
        if result is None:  # unknown to the agent: upload what it lacks and submit
            self._ensure_blobs(plan)
            client.submit(spec)
            self.executed += 1
            result = self._follow(plan, client.watch(plan.id))
        if result is None:
            raise AgentLost(f"{self.endpoint.address}: job {plan.id} stream ended without a result")
        if result.state == pb.SUCCEEDED:
            self.board.complete(plan, self.endpoint.address, result)
        else:
            self.board.fail(plan, self.endpoint.address, result.error or pb.JobState.Name(result.state))
        self.state = AgentState.READY

    def _follow(self, plan: JobPlan, events: Any) -> pb.JobResult | None:
        for event in events:
            self.board.renew(plan.id, self.endpoint.address)
            if event.final:
                return event.result
            if self.stop_event.is_set():
                return None
        return None
