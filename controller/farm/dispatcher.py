"""The controller's dispatcher: jobs for every (candidate, device class) over gRPC agents.

Life-cycle of a job (controller side; every change is committed to the store first)::

    pending ──take──▶ submitted(holder, lease) ──SUCCEEDED──▶ done
       ▲                  │ agent unreachable: the lease shrinks to the grace; the same agent
       │                  │ re-collects the job by id if it returns first (agents keep results)
       └─ lease over / FAILED (attempts < max_attempts) ─┘   └──▶ failed | unreachable

A *holder* is one device of one agent (``address#device``): an agent may serve several
devices and runs one job per device at a time. Agents whose devices share a
``device_class`` are interchangeable workers of that class; every class gets every job.
Job ids are derived from the whole job spec and the class, so the same work always has
the same id: submitting it again anywhere is idempotent and a result is stored once.
Every submission carries its attempt number, so a retry really executes again.

Agent liveness (:class:`AgentState`): CONNECTING → READY ⇄ BUSY; an RPC failure, a closed
stream or silence (no event, heartbeat or keepalive answer for ``silent_after_s``) →
UNREACHABLE (reconnect with backoff) → READY; a contract mismatch or a rejected token →
INCOMPATIBLE (never used again); STOPPED at the end.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from tuneqn.controller.config import AgentSpec, EvaluationSpec
from tuneqn.controller.farm.client import AgentClient, AgentSilent, ContractMismatch, decode_topk
from tuneqn.controller.store import Store
from tuneqn.v1 import agent_pb2 as pb

log = logging.getLogger(__name__)

#: Errors that no retry can fix: the agent is unusable for this controller.
_FATAL = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED)
#: Submission errors that say the job itself is wrong (retrying elsewhere gives the same answer).
_JOB_REJECTED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS)


def _gone_device(details: str | None) -> bool:
    """Whether an INVALID_ARGUMENT answer says the job names a device the agent does not list (any agent
    revision words it ``unknown device '<name>'``)."""
    return (details or "").startswith("unknown device ")


class AgentLost(Exception):
    """The agent's job stream ended without a final event."""


class AgentState(enum.Enum):
    """Explicit liveness of an agent as seen by the controller."""

    CONNECTING = "connecting"
    READY = "ready"
    BUSY = "busy"
    UNREACHABLE = "unreachable"
    INCOMPATIBLE = "incompatible"
    STOPPED = "stopped"


LIVE_STATES = (AgentState.READY, AgentState.BUSY)


class Endpoint(AgentSpec):
    """An agent of the lab (:class:`~tuneqn.controller.config.AgentSpec`) with its token read: how to reach it."""

    #: The bearer token (read from ``token_file``, a lab file or ``--token-file``); None: no token.
    token: str | None = None

    def client(self, timeout: float = 30.0) -> AgentClient:
        """A new client of this agent."""
        return AgentClient(self.address, token=self.token, tls_ca=self.tls_ca, tls_cert=self.tls_cert,
                           tls_key=self.tls_key, timeout=timeout)


class FarmSettings(EvaluationSpec):
    """A study's ``[evaluation]`` (every field of :class:`~tuneqn.controller.config.EvaluationSpec`) and what
    only a run decides."""

    #: Deadline of one unary call to an agent.
    rpc_timeout_s: float = 10.0
    #: Non-empty after ``--fresh``: agents re-measure instead of answering with stored results.
    remeasure_token: str = ""
    #: While an agent is live its ``GetInfo`` is asked again this often: devices that appear get slots
    #: (phones joining a tracker), unhealthy ones take no job, vanished ones stop taking jobs.
    info_poll_s: float = 2.0

    @classmethod
    def from_config(cls, evaluation: EvaluationSpec, **overrides: Any) -> FarmSettings:
        """Settings from a study's ``[evaluation]`` section (``overrides`` that are not None win)."""
        values = evaluation.model_dump()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass(frozen=True)
class JobPlan:
    """One evaluation: a candidate (or the FP32 model) on one device class.

    ``spec`` is complete except for what each submission adds (device name, attempt,
    remeasure token, max executions); ``id`` is derived from it and the class.
    """

    id: str
    candidate_id: str
    device: str
    model_path: Path
    dataset_path: Path
    spec: pb.JobSpec = field(compare=False)
    level: str = "full"  # "screen": a subset of the evaluation sample, no latency
    split: str = "eval"  # the split predicted: "eval" or "screen/<recipe>"
    #: What the result is compared with (stored with it): the sha256 of the prepared model the candidate
    #: was built from and of the evaluation sample (a screen's split is a subset of it); "" = unknown.
    source_sha256: str = ""
    sample_sha256: str = ""
    #: Lower goes first among a class's pending jobs (equal: in the order added); not part of the job's identity.
    priority: tuple[int, ...] = field(default=(), compare=False)


def make_job(candidate_id: str, device_class: str, model_path: Path, model_sha256: str, dataset_path: Path,
             dataset_sha256: str, input_name: str, runtime: dict[str, Any], settings: FarmSettings,
             level: str = "full", split: str = "eval", tuning_group: str = "",
             sample_sha256: str | None = None) -> JobPlan:
    """The job of a candidate on a device class; its id covers everything that changes the result
    (and the candidate it is for).

    A ``screen`` job predicts a subset of the evaluation sample (``dataset_path``) and
    measures no latency: the cheap first look a search takes at a candidate. Every backend
    reads its own options: ORT's disabled optimizers and threads, TVM's tuning trials (its
    tuning records are shared per ``tuning_group``, the model's FP32 sha256) and
    ``time_evaluator`` settings. The result is compared with the FP32 result of the same prepared
    model (``tuning_group``) on the same evaluation sample (``sample_sha256``, default
    ``dataset_sha256``); neither is part of the id (the spec's hashes already cover them).
    """
    screen = level == "screen"
    spec = pb.JobSpec(
        model_sha256=model_sha256, dataset_sha256=dataset_sha256, input_name=input_name, top_k=settings.top_k,
        chunk_size=settings.chunk_size, latency_warmup=0 if screen else settings.latency_warmup,
        latency_repeats=0 if screen else settings.latency_repeats,
        backend_options=pb.BackendOptions(
            ort=pb.OrtOptions(disabled_optimizers=list(runtime.get("ort_disabled_optimizers", [])),
                              intra_op_threads=settings.intra_op_threads),
            tvm=pb.TvmOptions(tuning_trials=settings.tvm_tuning_trials, tuning_group=tuning_group,
                              latency_number=settings.tvm_latency_number,
                              latency_min_repeat_ms=settings.tvm_min_repeat_ms,
                              latency_cooldown_ms=settings.tvm_cooldown_ms)),
    )
    # The candidate id is part of the key: two candidates can have identical bytes (every layer
    # excluded under two recipes), and each must get its own job and result row.
    key = device_class.encode() + b"\0" + candidate_id.encode() + b"\0" + spec.SerializeToString(deterministic=True)
    spec.job_id = f"tq-{hashlib.sha256(key).hexdigest()[:32]}"
    return JobPlan(spec.job_id, candidate_id, device_class, Path(model_path), Path(dataset_path), spec, level, split,
                   source_sha256=tuning_group,
                   sample_sha256=dataset_sha256 if sample_sha256 is None else sample_sha256)


def twin_key(plan: JobPlan) -> str:
    """Jobs with the same key measure the same thing: the same file on the same sample with the same options, on one
    device class, compared with the same FP32 result. Two candidates can be such twins (every searched layer in
    float under two recipes that differ only in how weights are quantized): :class:`JobBoard` runs one of them."""
    spec = pb.JobSpec()
    spec.CopyFrom(plan.spec)
    spec.ClearField("job_id")
    parts = (plan.device, plan.level, plan.source_sha256, plan.sample_sha256)
    return hashlib.sha256("\0".join(parts).encode() + b"\0" + spec.SerializeToString(deterministic=True)).hexdigest()


def result_row(plan: JobPlan, holder: str, result: pb.JobResult, backend: str = "") -> dict[str, Any]:
    """The ``results`` row of a successful job (raises ValueError on a malformed result).

    ``info`` keeps what the agent said about how it ran: the device and class, the backend,
    wall times (``seconds`` the whole job, ``inference_seconds`` the prediction pass,
    ``compile_seconds`` and ``tuning_seconds`` before it), whether latency comes from a tuned
    build (``tuned``), a compile-cache hit and the remote server that ran it (``executed_on``).
    """
    topk = decode_topk(result)
    lat = result.latency
    return {
        "job_id": plan.id, "candidate_id": plan.candidate_id, "device": plan.device, "agent": holder,
        "agent_id": result.agent_id, "num_samples": int(result.num_samples), "top_k": int(result.top_k),
        "topk": topk.astype("<i4").tobytes(), "agreement": None, "accuracy": None, "accuracy_top5": None,
        "latency_ms": lat.median_ms if lat.count else None,
        "latency": json.dumps({"median_ms": lat.median_ms, "p90_ms": lat.p90_ms, "p10_ms": lat.p10_ms,
                               "mean_ms": lat.mean_ms, "std_ms": lat.std_ms, "min_ms": lat.min_ms,
                               "max_ms": lat.max_ms, "count": lat.count}),
        "size_bytes": int(result.model_size_bytes), "simulated": float(result.simulated_latency_ms_per_sample),
        "finished_at": float(result.finished_at) or time.time(), "attempt": int(result.attempt),
        "level": plan.level, "split": plan.split,
        "model_sha256": plan.source_sha256 or None, "sample_sha256": plan.sample_sha256 or None, "baseline_job": None,
        "info": json.dumps({"device_name": result.device, "device_class": result.device_class,
                            "inference_seconds": result.inference_seconds,
                            "seconds": max(0.0, float(result.finished_at) - float(result.started_at))
                            if result.started_at else None, "executions": result.executions,
                            "runtime_versions": dict(result.runtime_versions), "backend": backend,
                            "compile_seconds": float(result.compile_seconds),
                            "tuning_seconds": float(result.tuning_seconds), "tuned": bool(result.tuned),
                            "compile_cache_hit": bool(result.compile_cache_hit),
                            "executed_on": result.executed_on}),
    }


class JobBoard:
    """The dispatcher's job table: in-memory queues over the store's ``jobs`` rows."""

    def __init__(self, store: Store, settings: FarmSettings,
                 on_result: Callable[[str], None] | None = None,
                 on_final: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.settings = settings
        self.on_result = on_result
        #: Called (outside the lock) when a job ends without a result: failed for good or infeasible.
        self.on_final = on_final
        self.cond = threading.Condition()
        self.plans: dict[str, JobPlan] = {}
        self._pending: dict[str, deque[str]] = {}
        self._base_attempts: dict[str, int] = {}  # attempts made before this run (they don't count again)
        self._revoked: dict[str, set[str]] = {}  # agent address -> job ids re-leased away from it
        self._waiting: dict[str, int] = {}  # device class -> slots waiting in take() for a job
        self._settling = 0  # results stored whose on_result has not finished
        self._first: dict[str, str] = {}  # twin_key -> the job of this run that measures it
        self._twins: dict[str, list[str]] = {}  # that job -> its twins, waiting for its result
        self.closed = False

    # -------------------------------------------------------------- registration
    def add(self, plan: JobPlan) -> str:
        """Register a job (idempotent); returns its state. A new run retries what failed before."""
        with self.cond:
            row = self.store.add_job(plan.id, plan.candidate_id, plan.device, plan.level)
            if plan.id not in self.plans:
                self._base_attempts[plan.id] = row["attempts"]
                if row["state"] == "submitted":
                    # In flight when an earlier run ended: its lease may have run out while no controller
                    # ran, yet its holder may have the result. The holder gets a fresh lease to be
                    # re-collected (shortened to the grace when its agent is found unreachable), so a
                    # finished job is not run again elsewhere.
                    self.store.update_job(plan.id, lease_until=max(float(row["lease_until"] or 0.0),
                                                                   time.time() + self.settings.lease_timeout_s))
            self.plans[plan.id] = plan
            state: str = row["state"]
            if state in ("failed", "unreachable"):
                self.store.update_job(plan.id, state="pending", error=None)
                state = "pending"
            first, measured = self._first_of(plan, state)
            if first is None and state == "pending" and plan.id not in self._pending.setdefault(plan.device, deque()):
                self._enqueue(plan)
            elif first is not None and not measured:
                self._follow(first, plan)
            self.cond.notify_all()
        if first is not None and measured:
            result = self.store.result(first)
            if result is not None:
                self._copy(result, plan)
        return state

    def _first_of(self, plan: JobPlan, state: str) -> tuple[str | None, bool]:
        """The job of this run whose result ``plan`` (pending) takes as its own, a twin measured or being measured
        (:func:`twin_key`), and whether it is measured; None: ``plan`` runs itself (and is the one its later twins
        wait for)."""
        if state not in ("pending", "submitted", "done"):
            return None, False
        key = twin_key(plan)
        first = self._first.setdefault(key, plan.id)
        if first == plan.id or state != "pending":
            return None, False
        row = self.store.job(first)
        if row is None or row["state"] not in ("pending", "submitted", "done"):
            self._first[key] = plan.id  # the first one failed: this one runs
            return None, False
        return first, row["state"] == "done"

    def _follow(self, first: str, plan: JobPlan) -> None:
        """``plan`` waits for ``first``'s result; ``first`` is queued as early as the earlier of the two would be."""
        twins = self._twins.setdefault(first, [])
        if plan.id in twins:
            return
        twins.append(plan.id)
        lead = self.plans[first]
        queue = self._pending.setdefault(plan.device, deque())
        if plan.priority < lead.priority and first in queue:
            queue.remove(first)
            self.plans[first] = replace(lead, priority=plan.priority)
            self._enqueue(self.plans[first])

    def _copy(self, row: dict[str, Any], plan: JobPlan) -> None:
        """Store a twin's result ``row`` as ``plan``'s too (the same file measured on the same sample and class)."""
        info = json.loads(row.get("info") or "{}")
        info["same_file_as"] = row["job_id"]
        copy = {**row, "job_id": plan.id, "candidate_id": plan.candidate_id, "split": plan.split,
                "info": json.dumps(info)}
        self._store_result(plan.id, copy)

    def _release_twins(self, first: str) -> None:
        """``first`` ended without a result: its first twin runs itself, the others wait for it (lock held)."""
        twins = self._twins.pop(first, [])
        if not twins:
            return
        lead = self.plans[twins[0]]
        self._first[twin_key(lead)] = lead.id
        if twins[1:]:
            self._twins[lead.id] = twins[1:]
        lead_row = self.store.job(lead.id)
        if lead_row is None:
            raise LookupError(f"job {lead.id} is registered but not in the store")
        if lead_row["state"] == "pending":
            self._enqueue(lead)

    def _enqueue(self, plan: JobPlan) -> None:
        """Queue a pending job behind every queued job of its class with the same or a lower priority (a job
        re-queued at the front, its lease expired, stays there)."""
        queue = self._pending.setdefault(plan.device, deque())
        at = len(queue)
        while at > 0:
            ahead = self.plans.get(queue[at - 1])
            if ahead is None or ahead.priority <= plan.priority:
                break
            at -= 1
        queue.insert(at, plan.id)

    def close(self) -> None:
        """No more jobs will be added."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    # -------------------------------------------------------------- queries
    def counts(self) -> dict[str, int]:
        """This run's jobs per state."""
        with self.cond:
            return self.store.job_counts(list(self.plans))

    def unfinished(self, device: str | None = None) -> list[str]:
        """Ids of this run's pending or submitted jobs (of one class, when given)."""
        with self.cond:
            return [r["id"] for r in self.store.jobs()
                    if r["id"] in self.plans and r["state"] in ("pending", "submitted")
                    and (device is None or r["device"] == device)]

    def finished(self) -> bool:
        """Closed, and every registered job is done, failed or unreachable."""
        with self.cond:
            return self.closed and not self.unfinished()

    def is_done(self, jid: str) -> bool:
        """Whether the job already has its result."""
        row = self.store.job(jid)
        return row is not None and row["state"] == "done"

    def attempts_used(self, row: dict[str, Any]) -> int:
        """Attempts of this run (earlier runs' attempts are not counted again)."""
        attempts: int = row["attempts"]
        return attempts - self._base_attempts.get(row["id"], 0)

    # -------------------------------------------------------------- transitions
    def held_by(self, holder: str) -> list[tuple[JobPlan, int]]:
        """Jobs this holder has in flight (re-collect them first), with their attempt numbers."""
        with self.cond:
            return [(self.plans[r["id"]], r["attempts"]) for r in self.store.jobs(state="submitted", agent=holder)
                    if r["id"] in self.plans]

    def _lease_next(self, device: str, holder: str) -> tuple[JobPlan, int] | None:
        """Lease the first pending job of ``device`` to ``holder`` (stale queue entries are dropped)."""
        queue = self._pending.get(device, deque())
        while queue:
            jid = queue.popleft()
            row = self.store.job(jid)
            if row is None or row["state"] != "pending":
                continue
            attempt = row["attempts"] + 1
            self.store.update_job(jid, state="submitted", agent=holder, attempts=attempt,
                                  lease_until=time.time() + self.settings.lease_timeout_s)
            return self.plans[jid], attempt
        return None

    def take(self, device: str, holder: str, timeout: float,
             ready: Callable[[], bool] | None = None) -> tuple[JobPlan, int] | None:
        """The next job of ``device`` leased to ``holder``, with its attempt; None if none came in time
        (or once ``ready()``, checked under the board's lock, says the holder takes no job now)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                self.expire()
                if ready is not None and not ready():
                    return None
                job = self._lease_next(device, holder)
                if job is not None:
                    return job
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.closed and not self.unfinished(device)):
                    return None
                self._waiting[device] = self._waiting.get(device, 0) + 1
                try:
                    self.cond.wait(min(remaining, 1.0))
                finally:
                    self._waiting[device] -= 1

    def pending_count(self, device: str, at_least: int) -> int:
        """Pending jobs queued for ``device``, counted up to ``at_least`` (stale entries are dropped)."""
        with self.cond:
            queue = self._pending.get(device, deque())
            n = 0
            for jid in list(queue):
                row = self.store.job(jid)
                if row is None or row["state"] != "pending":
                    queue.remove(jid)
                    continue
                n += 1
                if n >= at_least:
                    break
            return n

    def waiting(self, device: str) -> int:
        """How many slots of ``device`` wait in :meth:`take` for a job now."""
        with self.cond:
            return self._waiting.get(device, 0)

    def take_ahead(self, device: str, holder: str) -> tuple[JobPlan, int] | None:
        """A second job for a holder that compiles ahead (its current job still runs): leased only when
        ``device`` has more pending jobs than slots waiting for one, so no idle device waits for it."""
        with self.cond:
            self.expire()
            waiting = self._waiting.get(device, 0)
            if self.pending_count(device, waiting + 1) <= waiting:
                return None
            return self._lease_next(device, holder)

    def renew(self, jid: str, holder: str) -> None:
        """The holder is alive and working on the job: extend its lease."""
        self.store.renew_lease(jid, holder, time.time() + self.settings.lease_timeout_s)

    def agent_lost(self, address: str) -> None:
        """An agent became unreachable: its jobs may run elsewhere after the grace."""
        until = time.time() + self.settings.unreachable_grace_s
        with self.cond:
            for row in self.store.jobs(state="submitted"):
                if (row["agent"] or "").rsplit("#", 1)[0] == address and row["lease_until"] > until:
                    self.store.update_job(row["id"], lease_until=until)
            self.cond.notify_all()

    def revoked(self, address: str) -> set[str]:
        """Job ids that were re-leased away from an agent (cancel them there); clears the list."""
        with self.cond:
            return self._revoked.pop(address, set())

    def expire(self) -> None:
        """Leases that ran out: the job runs elsewhere, unless it used up its attempts.

        A job an earlier run of the study had in flight that this run has not asked for (yet) has no
        holder either: it goes back to ``pending`` in the store (queued when this run adds it), so the
        store never keeps a dead lease as ``submitted``."""
        now = time.time()
        with self.cond:
            rows = []
            for r in self.store.expired_leases(now):
                if r["id"] in self.plans:
                    rows.append(r)
                else:
                    log.info("job %s: the lease of %s from an earlier run expired; pending", r["id"], r["agent"])
                    self.store.update_job(r["id"], state="pending", error=f"lease of {r['agent']} expired")
            for r in rows:
                address = (r["agent"] or "").rsplit("#", 1)[0]
                self._revoked.setdefault(address, set()).add(r["id"])
                if self.attempts_used(r) >= self.settings.max_attempts:
                    log.warning("job %s: %s went silent on attempt %d; giving up", r["id"], r["agent"], r["attempts"])
                    self.store.update_job(r["id"], state="failed",
                                          error=f"{r['agent']} went silent (lease expired) on attempt "
                                                f"{self.attempts_used(r)} of {self.settings.max_attempts}")
                    self._release_twins(r["id"])
                else:
                    log.warning("job %s: %s went silent; running it elsewhere", r["id"], r["agent"])
                    self.store.update_job(r["id"], state="pending", error=f"lease of {r['agent']} expired")
                    self._pending.setdefault(r["device"], deque()).appendleft(r["id"])
            if rows:
                self.cond.notify_all()

    def record(self, plan: JobPlan, holder: str, result: pb.JobResult, backend: str = "") -> str:
        """What a device slot does with a job's final result: store a success, end an infeasible job,
        or count a failed attempt. Returns the job's state afterwards."""
        if result.state == pb.SUCCEEDED:
            self.complete(plan, holder, result, backend)
            row = self.store.job(plan.id)
            return row["state"] if row else "unknown"
        if result.state == pb.FAILED and result.infeasible:
            return self.infeasible(plan, holder, result)
        return self.fail(plan, holder, result.error or pb.JobState.Name(result.state))

    def complete(self, plan: JobPlan, holder: str, result: pb.JobResult, backend: str = "") -> bool:
        """Store a result (once: the first result of a job wins, wherever it ran). The job is ``done`` in the
        store before ``on_result`` (its metrics) has run: :meth:`settling` counts it meanwhile."""
        row = result_row(plan, holder, result, backend)
        stored = self._store_result(plan.id, row)
        if stored:
            with self.cond:
                twins = self._twins.pop(plan.id, [])
            for jid in twins:
                self._copy(row, self.plans[jid])
        return stored

    def _store_result(self, jid: str, row: dict[str, Any]) -> bool:
        """Store a job's result row (once) and run ``on_result`` for it; False when the job already had one."""
        with self.cond:
            stored = self.store.put_result(row)
            if stored:
                self._settling += 1
            self.cond.notify_all()
        if stored:
            try:
                if self.on_result is not None:
                    self.on_result(jid)
            finally:
                with self.cond:
                    self._settling -= 1
                    self.cond.notify_all()
        return stored

    def settling(self) -> bool:
        """Some result is stored but ``on_result`` has not finished with it: what waits for it may still go on."""
        with self.cond:
            return self._settling > 0

    def fail(self, plan: JobPlan, holder: str, error: str, retry: bool = True) -> str:
        """A failed attempt: back to pending for another attempt, or failed for good; returns the state."""
        with self.cond:
            row = self.store.job(plan.id)
            if row is None or row["state"] != "submitted" or row["agent"] != holder:
                return row["state"] if row else "unknown"  # done elsewhere, or re-leased meanwhile
            final = not retry or self.attempts_used(row) >= self.settings.max_attempts
            state = "failed" if final else "pending"
            self.store.update_job(plan.id, state=state, error=error[:2000])
            if not final:
                self._enqueue(plan)
            else:
                self._release_twins(plan.id)
            self.cond.notify_all()
            log.warning("job %s on %s: attempt %d failed (%s)%s", plan.id, holder, row["attempts"], error[:200],
                        "" if final else "; will retry")
        if final and self.on_final is not None:
            self.on_final(plan.id)
        return state

    def infeasible(self, plan: JobPlan, holder: str, result: pb.JobResult) -> str:
        """The device cannot run this model at all (e.g. op types it cannot import): the job ends
        ``infeasible`` with the unsupported op types and the agent's error; no retry, here or on a rerun."""
        ops = sorted(set(result.unsupported_ops))
        with self.cond:
            row = self.store.job(plan.id)
            if row is None or row["state"] != "submitted" or row["agent"] != holder:
                return row["state"] if row else "unknown"  # done elsewhere, or re-leased meanwhile
            error = result.error or (f"unsupported op types: {', '.join(ops)}" if ops else "infeasible on this device")
            self.store.set_infeasible(plan.id, error[:2000], ops)
            self._release_twins(plan.id)  # each is found infeasible where it runs, with its own reason
            self.cond.notify_all()
        log.warning("job %s on %s: infeasible (%s)", plan.id, holder, ", ".join(ops) or error[:200])
        if self.on_final is not None:
            self.on_final(plan.id)
        return "infeasible"

    def give_up(self, device: str, reason: str) -> int:
        """End every unfinished job of a device class as ``unreachable``; returns how many."""
        with self.cond:
            ids = self.unfinished(device)
            for jid in ids:
                self.store.update_job(jid, state="unreachable", error=reason)
            q = self._pending.get(device)
            if q is not None:
                q.clear()
            self.cond.notify_all()
            return len(ids)


class AgentLink(threading.Thread):
    """Connection and liveness of one agent; starts a :class:`DeviceSlot` per device it serves."""

    def __init__(self, endpoint: Endpoint, board: JobBoard, stop: threading.Event,
                 on_device: Callable[[AgentLink, pb.Device], None]) -> None:
        super().__init__(name=f"agent-{endpoint.address}", daemon=True)
        self.endpoint = endpoint
        self.board = board
        self.stop_event = stop
        self.on_device = on_device
        self.state = AgentState.CONNECTING
        self.info: pb.AgentInfo | None = None
        self.error: str | None = None
        self.client: AgentClient | None = None
        self.slots: dict[str, DeviceSlot] = {}
        self.ever_connected = False
        self.live = threading.Event()
        #: When the next connection attempt starts (time.monotonic()), while unreachable; shown to the user.
        self.retry_at: float | None = None
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        """The agent's address."""
        return self.endpoint.address

    def device_classes(self, available: bool = False) -> set[str]:
        """Classes of the devices this agent reported (``available``: of those listed and healthy now)."""
        return {s.device.device_class for s in list(self.slots.values()) if not available or s.available()}

    def available_devices(self) -> dict[str, int]:
        """Per device class, how many of this agent's devices take jobs now (none while it is not live)."""
        counts: dict[str, int] = {}
        if self.live.is_set():
            for s in list(self.slots.values()):
                if s.available():
                    counts[s.device.device_class] = counts.get(s.device.device_class, 0) + 1
        return counts

    def connect(self) -> bool:
        """Handshake; on success the devices get slots. False (UNREACHABLE/INCOMPATIBLE) on failure."""
        if self.client is None:
            self.client = self.endpoint.client(self.board.settings.rpc_timeout_s)
        info = self._ask_info()
        if info is None:
            return False
        if not info.devices:
            self._set(AgentState.INCOMPATIBLE, "agent reports no device")
            return False
        for jid in self.board.revoked(self.address):  # re-leased while it was away: don't let it run them
            try:
                self.client.cancel(jid)
            except grpc.RpcError as exc:
                log.debug("cancel %s on %s: %s", jid, self.address, exc.code().name)
        self._set(AgentState.READY, None)
        first = not self.ever_connected
        self.ever_connected = True
        self.sync_devices(info, announce=not first)
        return True

    def _ask_info(self) -> pb.AgentInfo | None:
        """``GetInfo``; None after marking the agent INCOMPATIBLE or (first call) UNREACHABLE."""
        if self.client is None:
            return None
        try:
            return self.client.info()
        except ContractMismatch as exc:
            self._set(AgentState.INCOMPATIBLE, str(exc))
        except grpc.RpcError as exc:
            self._set(AgentState.INCOMPATIBLE if exc.code() in _FATAL else AgentState.UNREACHABLE,
                      f"{exc.code().name}: {exc.details()}")
        return None

    def refresh(self) -> bool:
        """Ask a live agent's ``GetInfo`` again and follow its devices (:meth:`sync_devices`); a failure
        makes it unreachable (its jobs may then run elsewhere after the grace)."""
        if self.client is None:
            return False
        try:
            info = self.client.info()
        except ContractMismatch as exc:
            self.incompatible(str(exc))
            return False
        except grpc.RpcError as exc:
            if exc.code() in _FATAL:
                self.incompatible(f"{exc.code().name}: {exc.details()}")
            else:
                self.lost(f"GetInfo: {exc.code().name}: {exc.details()}")
            return False
        self.sync_devices(info)
        return True

    def sync_devices(self, info: pb.AgentInfo, announce: bool = True) -> None:
        """Follow the agent's devices: a new one gets a slot, a known one's description (health, status,
        queue) is updated, one that is no longer listed stops taking jobs (it resumes if it comes back)."""
        self.info = info
        listed = {d.name for d in info.devices}
        for device in info.devices:
            slot = self.slots.get(device.name)
            if slot is None:
                self.on_device(self, device)
                slot = DeviceSlot(self, device)
                self.slots[device.name] = slot
                slot.start()
                if announce:
                    log.info("agent %s: device %s appeared (class %s)", self.address, device.name, device.device_class)
            else:
                with self.board.cond:  # a slot checks availability under this lock right before it leases
                    slot.update(device, present=True)
        for name, slot in self.slots.items():
            if name not in listed and slot.present:
                log.warning("agent %s: device %s is gone; it takes no more jobs", self.address, name)
                with self.board.cond:
                    slot.update(slot.device, present=False)

    def _incompatible_now(self) -> bool:
        """Whether the agent is INCOMPATIBLE now (a call, so that the checker does not keep an earlier
        narrowing of ``self.state`` across ``connect()``, which may change it)."""
        return self.state == AgentState.INCOMPATIBLE

    def _set(self, state: AgentState, error: str | None) -> None:
        with self._lock:
            self.state, self.error = state, error
            if state in LIVE_STATES:
                self.live.set()
            else:
                self.live.clear()

    def lost(self, error: str) -> None:
        """A call failed or the agent went silent: mark it unreachable (once) and start the grace."""
        with self._lock:
            if self.state not in LIVE_STATES:
                return
        log.warning("agent %s unreachable: %s", self.address, error)
        self._set(AgentState.UNREACHABLE, error)
        self.board.agent_lost(self.address)

    def incompatible(self, error: str) -> None:
        """The agent refuses this controller for good."""
        log.error("agent %s unusable: %s", self.address, error)
        self._set(AgentState.INCOMPATIBLE, error)
        self.board.agent_lost(self.address)

    def busy(self, flag: bool) -> None:
        """Liveness detail for display: READY ⇄ BUSY."""
        with self._lock:
            if self.state in LIVE_STATES:
                busy = flag or any(s.running for s in self.slots.values())
                self.state = AgentState.BUSY if busy else AgentState.READY

    def interrupt(self) -> None:
        """Cancel every call in flight (the run is stopping); the thread then ends."""
        if self.client is not None:
            self.client.close()

    def run(self) -> None:
        backoff = 0.2
        polled = time.monotonic()
        while not self.stop_event.is_set():
            if self.state == AgentState.INCOMPATIBLE:
                break
            if self.state in LIVE_STATES:
                poll = self.board.settings.info_poll_s
                self.stop_event.wait(max(0.05, min(0.5, poll - (time.monotonic() - polled))))
                if not self.stop_event.is_set() and self.state in LIVE_STATES and time.monotonic() - polled >= poll:
                    self.refresh()
                    polled = time.monotonic()
                continue
            if self.connect():
                backoff = 0.2
                polled = time.monotonic()
                continue
            if self._incompatible_now():
                log.error("agent %s unusable: %s", self.address, self.error)
                break
            self.retry_at = time.monotonic() + backoff
            self.stop_event.wait(backoff)  # reconnect backoff
            self.retry_at = None
            backoff = min(backoff * 2, 5.0)
        for slot in list(self.slots.values()):
            slot.join(timeout=10)
        if self.state != AgentState.INCOMPATIBLE:
            self._set(AgentState.STOPPED, self.error)
        if self.client is not None:
            self.client.close()


#: The capabilities of a device whose agent takes its next job while the current one runs: ``compile-ahead``
#: (TVM: it compiles the queued job meanwhile) and ``queue-ahead`` (ONNX Runtime: it starts the queued job the
#: moment the current one ends, instead of after the controller has seen the result, uploaded and submitted).
AHEAD_CAPABILITIES = frozenset({"compile-ahead", "queue-ahead"})


def takes_ahead(device: pb.Device) -> bool:
    """Whether a device's agent takes its next job while the current one runs, so the controller hands it the
    next job early (see :meth:`JobBoard.take_ahead`)."""
    return not AHEAD_CAPABILITIES.isdisjoint(device.capabilities)


def device_available(device: pb.Device) -> bool:
    """Whether a listed device takes jobs now (its agent says it is healthy)."""
    return device.healthy


class DeviceSlot(threading.Thread):
    """Runs the jobs of one device of one agent, one at a time: upload by hash, submit, watch.

    A device that takes jobs ahead (:func:`takes_ahead`) is also handed the next job of its class
    while its current one runs (when more jobs wait than idle devices), so the agent compiles job
    N+1 while N runs or starts it the moment N ends; both leases are renewed, and the next job is then
    watched as usual. A device its agent reports unhealthy, or no longer lists, takes no new job.
    """

    def __init__(self, link: AgentLink, device: pb.Device) -> None:
        super().__init__(name=f"slot-{link.address}#{device.name}", daemon=True)
        self.link = link
        self.device = device
        self.board = link.board
        self.holder = f"{link.address}#{device.name}"
        self.running: str | None = None
        self.executed = 0
        self.present = True
        self.ahead: list[str] = []  # job ids submitted ahead (compile-ahead), in order

    def update(self, device: pb.Device, present: bool) -> None:
        """The agent's latest description of the device (and whether it still lists it)."""
        if device_available(device) != device_available(self.device) and present:
            log.info("device %s: %s", self.holder, "healthy again" if device_available(device)
                     else f"unhealthy ({device.status or 'no reason given'}); it takes no new job")
        self.device = device
        self.present = present

    def available(self) -> bool:
        """Listed by its agent and healthy: it may take a job."""
        return self.present and device_available(self.device)

    def run(self) -> None:
        stop = self.link.stop_event
        while not stop.is_set():
            if self.link.state == AgentState.INCOMPATIBLE:
                return
            if not self.link.live.wait(timeout=0.5):
                continue
            held = self.board.held_by(self.holder)
            if not held and not self.available():
                if self.board.finished():
                    return
                stop.wait(0.5)
                continue
            job = held[0] if held else self.board.take(self.device.device_class, self.holder, timeout=1.0,
                                                       ready=self.available)
            if job is None:
                if self.board.finished():
                    return
                continue
            plan, attempt = job
            self.running = plan.id
            self.link.busy(True)
            try:
                self._run(plan, attempt)
            except ContractMismatch as exc:
                self.link.incompatible(str(exc))
            except grpc.RpcError as exc:
                if exc.code() in _FATAL:
                    self.link.incompatible(f"{exc.code().name}: {exc.details()}")
                elif exc.code() == grpc.StatusCode.INVALID_ARGUMENT and _gone_device(exc.details()):
                    # The agent no longer lists this device (it restarted with fewer TVM lanes): not the
                    # job's fault. The slot takes no job until the agent lists the device again; the job
                    # runs on another device of its class.
                    self.present = False
                    self.board.fail(plan, self.holder, f"device gone: {exc.details()}", retry=True)
                elif exc.code() in _JOB_REJECTED:
                    self.board.fail(plan, self.holder, f"agent rejected the job: {exc.details()}", retry=False)
                else:
                    self.link.lost(f"{exc.code().name}: {exc.details()}")
            except (AgentSilent, AgentLost) as exc:
                self.link.lost(str(exc))
            except Exception as exc:  # noqa: BLE001 - thread boundary: a job that breaks on the controller
                # side (bad result, OSError on upload, SQLite error) fails with its reason; the slot carries on.
                log.exception("job %s on %s failed in the controller", plan.id, self.holder)
                self.board.fail(plan, self.holder, f"controller: {type(exc).__name__}: {exc}")
            finally:
                self.running = None
                self.link.busy(False)

    def _client(self) -> AgentClient:
        client = self.link.client
        if client is None:
            raise AgentLost(f"{self.link.address}: not connected")
        return client

    def _upload_missing(self, plan: JobPlan) -> None:
        client = self._client()
        spec = plan.spec
        have = client.has_blobs([spec.model_sha256, spec.dataset_sha256])
        for present, path in zip(have, (plan.model_path, plan.dataset_path), strict=True):
            if not present:
                client.upload_file(path)

    def _submit(self, plan: JobPlan, attempt: int) -> None:
        """Upload what the agent lacks and submit the job to this device."""
        client = self._client()
        s = self.board.settings
        spec = pb.JobSpec()
        spec.CopyFrom(plan.spec)
        spec.device = self.device.name
        spec.attempt = attempt
        spec.remeasure_token = s.remeasure_token
        spec.max_executions = s.max_attempts
        self._upload_missing(plan)
        try:
            response = client.submit(spec)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            self._upload_missing(plan)  # evicted between the check and the submit
            response = client.submit(spec)
        if not response.already_known:
            self.executed += 1

    def _submit_ahead(self) -> None:
        """Compile- or queue-ahead: lease and submit the next jobs of the class while the current one runs: one, or
        as many as the device runs screens at once (``Device.prediction_slots``), so a screen that ends while
        another runs is followed at once."""
        if not takes_ahead(self.device) or not self.available():
            return
        if self.ahead:  # those still leased here (not re-leased away meanwhile)
            held = {p.id for p, _ in self.board.held_by(self.holder)}
            self.ahead = [jid for jid in self.ahead if jid in held]
        while len(self.ahead) < max(1, self.device.prediction_slots):
            job = self.board.take_ahead(self.device.device_class, self.holder)
            if job is None:
                return
            plan, attempt = job
            self.ahead.append(plan.id)
            try:
                self._submit(plan, attempt)
                log.debug("job %s submitted ahead to %s", plan.id, self.holder)
            except grpc.RpcError as exc:  # it stays leased here: submitted again when its turn comes
                log.warning("submitting job %s ahead to %s: %s", plan.id, self.holder, exc)
                return
            except OSError as exc:  # the controller's side (disk trouble): the attempt fails, as in _run
                log.warning("submitting job %s ahead to %s: %s", plan.id, self.holder, exc)
                self.ahead.remove(plan.id)
                self.board.fail(plan, self.holder, f"controller: {type(exc).__name__}: {exc}")
                return

    def _run(self, plan: JobPlan, attempt: int) -> None:
        client = self._client()
        s = self.board.settings
        if plan.id in self.ahead:
            self.ahead.remove(plan.id)
        self._submit(plan, attempt)
        result: pb.JobResult | None = None
        for event in client.watch(plan.id, heartbeat_ms=int(s.heartbeat_s * 1000), idle_timeout=s.silent_after_s):
            self.board.renew(plan.id, self.holder)
            for jid in self.ahead:
                self.board.renew(jid, self.holder)
            if self.board.is_done(plan.id):  # finished elsewhere meanwhile: don't spend the device on it
                client.cancel(plan.id)
                return
            if event.final:
                result = event.result
                break
            if self.link.stop_event.is_set():
                return
            if event.state == pb.RUNNING:
                self._submit_ahead()
        if result is None:
            raise AgentLost(f"{self.link.address}: job {plan.id} stream ended without a result")
        self.board.record(plan, self.holder, result, self.device.backend)
