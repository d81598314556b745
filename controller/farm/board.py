"""The job board: every (candidate, device class) job of a run, its queues and its state in the store.

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

The agents that run them: :mod:`tuneqn.controller.farm.links`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from tuneqn.controller.farm.jobs import FarmSettings, JobPlan, result_row, twin_key
from tuneqn.controller.store import Store
from tuneqn.v1 import agent_pb2 as pb

log = logging.getLogger(__name__)


class JobBoard:
    """The dispatcher's job table: in-memory queues over the store's ``jobs`` rows."""

    def __init__(
        self,
        store: Store,
        settings: FarmSettings,
        on_result: Callable[[str], None] | None = None,
        on_final: Callable[[str], None] | None = None,
    ) -> None:
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
                    self.store.update_job(
                        plan.id,
                        lease_until=max(float(row["lease_until"] or 0.0), time.time() + self.settings.lease_timeout_s),
                    )
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
        copy = {
            **row,
            "job_id": plan.id,
            "candidate_id": plan.candidate_id,
            "split": plan.split,
            "info": json.dumps(info),
        }
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
            return [
                r["id"]
                for r in self.store.jobs()
                if r["id"] in self.plans
                and r["state"] in ("pending", "submitted")
                and (device is None or r["device"] == device)
            ]

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
            return [
                (self.plans[r["id"]], r["attempts"])
                for r in self.store.jobs(state="submitted", agent=holder)
                if r["id"] in self.plans
            ]

    def _lease_next(self, device: str, holder: str) -> tuple[JobPlan, int] | None:
        """Lease the first pending job of ``device`` to ``holder`` (stale queue entries are dropped)."""
        queue = self._pending.get(device, deque())
        while queue:
            jid = queue.popleft()
            row = self.store.job(jid)
            if row is None or row["state"] != "pending":
                continue
            attempt = row["attempts"] + 1
            self.store.update_job(
                jid,
                state="submitted",
                agent=holder,
                attempts=attempt,
                lease_until=time.time() + self.settings.lease_timeout_s,
            )
            return self.plans[jid], attempt
        return None

    def take(
        self, device: str, holder: str, timeout: float, ready: Callable[[], bool] | None = None
    ) -> tuple[JobPlan, int] | None:
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
                    self.store.update_job(
                        r["id"],
                        state="failed",
                        error=f"{r['agent']} went silent (lease expired) on attempt "
                        f"{self.attempts_used(r)} of {self.settings.max_attempts}",
                    )
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
            log.warning(
                "job %s on %s: attempt %d failed (%s)%s",
                plan.id,
                holder,
                row["attempts"],
                error[:200],
                "" if final else "; will retry",
            )
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
