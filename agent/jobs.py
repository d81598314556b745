"""Job queue of the agent: one worker thread per device, one job at a time per device.

Life cycle: QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED, or QUEUED -> CANCELLED.
Jobs are persisted in :class:`~tuneqn.agent.state.AgentState`; finished results are
served from the database.

Submitting a known job id (``SubmitJob`` is idempotent) answers its state, except:

* FAILED or CANCELLED and ``spec.attempt`` higher than the attempt it last ran under:
  a retry — the job executes again (a new execution series; its blobs must be present);
* SUCCEEDED, ``spec.remeasure_token`` non-empty and different from the token its success
  was measured under: the job executes again once (the same token then finds the new
  execution or its result).

``attempt``, ``remeasure_token`` and ``max_executions`` never make a spec "different"
(ALREADY_EXISTS). On start, jobs left QUEUED or RUNNING by a previous process are
queued again while the executions of their current series stay below
``spec.max_executions`` (0 = :data:`DEFAULT_MAX_EXECUTIONS`); a job whose executions were
all interrupted that often ends FAILED, so a job that crashes its agent cannot loop.

With a quiet lock (:mod:`tuneqn.agent.quiet`) the latency measurement runs under an
exclusive lock that co-located tuneqn processes respect.

Backends may join while the agent runs (:meth:`JobManager.add_backend`, e.g. a phone
registering at a TVM tracker); each gets its own worker. Per job the manager calls the
backend's hooks: ``prepare_ahead`` when the job is queued (compile-ahead; ``forget_ahead`` when
it is cancelled before it ran), ``release``
when it ends, success or not. A backend raising
:class:`~tuneqn.agent.backends.base.Infeasible` ends the job FAILED with
``JobResult.infeasible`` (final: a retry gives the same answer).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

from tuneqn.agent.backends.base import (
    Backend,
    DeviceDescription,
    Infeasible,
    Interrupted,
    LoadOptions,
    PreparedModel,
)
from tuneqn.agent.blobs import BlobStore, check_sha256
from tuneqn.agent.measure import measure, predicts_only
from tuneqn.agent.quiet import QuietLock
from tuneqn.agent.state import AgentState, JobRow
from tuneqn.v1 import agent_pb2 as pb

log = logging.getLogger(__name__)

MAX_JOB_ID_LENGTH = 256
DEFAULT_MAX_EXECUTIONS = 3
DEFAULT_HEARTBEAT_SECONDS = 5.0
MIN_HEARTBEAT_SECONDS = 0.05
#: JobSpec fields that never make two submissions of one job id "different".
SUBMISSION_FIELDS = ("attempt", "remeasure_token", "max_executions")

TERMINAL_STATES = frozenset({pb.SUCCEEDED, pb.FAILED, pb.CANCELLED})


class JobNotFound(LookupError):
    """No job with this id is known."""


class InvalidJob(ValueError):
    """The job spec is malformed or names something this agent does not have."""


class JobConflict(ValueError):
    """The job id is known with a different spec."""


class MissingBlobs(LookupError):
    """Blobs the job needs are not in the cache."""

    def __init__(self, missing: list[str]) -> None:
        super().__init__("missing blobs: " + ", ".join(missing))
        self.missing = missing


class AgentStopping(RuntimeError):
    """The agent is shutting down and takes no new work."""


def state_name(state: pb.JobState) -> str:
    """The JobState enum name of ``state``."""
    return pb.JobState.Name(state)


def state_value(name: str) -> pb.JobState:
    """The JobState of an enum name such as ``"QUEUED"``."""
    return cast(pb.JobState, pb.JobState.Value(name))


@dataclass
class _Job:
    spec: pb.JobSpec  # the latest submitted spec
    device: str
    attempt: int = 0  # JobSpec.attempt of the submission that queued this execution series
    token: str = ""  # remeasure token of that submission
    state: pb.JobState = pb.QUEUED
    event: pb.JobEvent = field(default_factory=pb.JobEvent)
    version: int = 0
    interrupt: threading.Event = field(default_factory=threading.Event)
    cancel_requested: bool = False
    handle: PreparedModel | None = None  # the running execution's prepared model


@dataclass(frozen=True)
class DeviceStatus:
    """What a device is doing now (the dynamic part of ``tuneqn.v1.Device``)."""

    queue_length: int
    running_job_id: str
    healthy: bool
    status: str


def interrupted_reason(count: int) -> str:
    """Failure reason of a job given up after ``count`` interrupted executions."""
    times = "once" if count == 1 else f"{count} times"
    return f"interrupted {times} (the agent stopped or crashed while running it)"


class JobManager:
    """Accepts, queues, runs, cancels and reports jobs."""

    def __init__(
        self,
        state: AgentState,
        blobs: BlobStore,
        backends: dict[str, Backend],
        agent_id: str,
        quiet_lock: QuietLock | None = None,
        on_finished: Callable[[str, str, float], None] | None = None,
    ) -> None:
        """``on_finished(device, state, seconds)`` is called when an execution ends, before
        its final event is published: ``state`` is SUCCEEDED, FAILED or CANCELLED, or
        INTERRUPTED when a stop interrupted it (the job stays queued)."""
        if not backends:
            raise ValueError("at least one device backend is required")
        self._state = state
        self._blobs = blobs
        self._backends = dict(backends)
        self._descriptions = {name: b.describe() for name, b in backends.items()}
        self._agent_id = agent_id
        self._cond = threading.Condition()
        self._active: dict[str, _Job] = {}  # queued or running
        self._queues: dict[str, deque[str]] = {name: deque() for name in backends}
        self._running: dict[str, list[str]] = {name: [] for name in backends}  # started first, first
        self._status: dict[str, str] = {name: "" for name in backends}
        self._quiet_lock = quiet_lock
        self._threads: list[threading.Thread] = []
        self._started = False
        self._stopping = False  # no new work: submissions refused, idle workers end
        self._interrupting = False  # running jobs are being interrupted (the drain is over)
        self._drain_cut = False  # cut_drain() was called: the drain ends at once
        self._on_finished = on_finished

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Re-queue unfinished jobs of a previous run and start the device workers."""
        dangling = self._state.close_dangling_executions()
        if dangling:
            log.warning("%d execution(s) were interrupted by an unclean stop", dangling)
        for row in self._state.unfinished_jobs():
            spec = pb.JobSpec.FromString(row.spec)
            job = _Job(spec=spec, device=row.device, attempt=row.attempt, token=row.remeasure_token)
            if row.device not in self._backends:
                self._finish_unstarted(job, f"device {row.device!r} is no longer served by this agent")
                continue
            interrupted = self._state.count_executions(row.job_id) - row.series_start
            limit = spec.max_executions or DEFAULT_MAX_EXECUTIONS
            if interrupted >= limit:
                self._finish_unstarted(job, interrupted_reason(interrupted))
                log.warning("job %s given up: %s", row.job_id, interrupted_reason(interrupted))
                continue
            if row.state != "QUEUED":
                self._state.set_state(row.job_id, "QUEUED")
            self._blobs.pin([spec.model_sha256, spec.dataset_sha256])
            with self._cond:
                self._enqueue(job)
            log.info("re-queued job %s left %s by the previous run", row.job_id, row.state)
        with self._cond:
            self._started = True
            devices = list(self._backends)
        for device in devices:
            self._start_worker(device)
        for backend in self.backends():
            backend.start(self.add_backend)

    def _start_worker(self, device: str) -> None:
        """The device's workers: one per job it runs at once (:meth:`Backend.prediction_slots`)."""
        for i in range(max(1, self._backends[device].prediction_slots())):
            t = threading.Thread(target=self._worker, args=(device,), name=f"tuneqn-worker-{device}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def add_backend(self, backend: Backend) -> None:
        """Serve one more device from now on (its own queue and worker).

        Called by backends that discover devices at run time; a name already served is
        ignored. Must not be called with a lock held that the backend's methods take.
        """
        desc = backend.describe()
        with self._cond:
            if desc.name in self._backends or self._stopping:
                return
            self._backends[desc.name] = backend
            self._descriptions[desc.name] = desc
            self._queues[desc.name] = deque()
            self._running[desc.name] = []
            self._status[desc.name] = ""
            started = self._started
        log.info("device %s added", desc.name)
        if started:
            self._start_worker(desc.name)
            backend.start(self.add_backend)

    def _finish_unstarted(self, job: _Job, reason: str) -> None:
        """End a job left unfinished by a previous run as FAILED without running it."""
        result = self._result(job, pb.FAILED, reason)
        result.finished_at = time.time()
        self._state.set_state(job.spec.job_id, "FAILED", result=result.SerializeToString(), error=reason)

    def stop(self, timeout: float | None = 30.0, drain_seconds: float = 0.0) -> None:
        """Take no new work, let running jobs finish, interrupt what still runs, end the workers.

        Submissions are refused from now on and no queued job starts. Running jobs get
        ``drain_seconds`` to finish (their results are stored as usual); those still
        running then are interrupted and stay queued for the next start. ``timeout``
        bounds the wait for each worker thread after that.
        """
        deadline = time.monotonic() + max(drain_seconds, 0.0)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            running = [(d, j) for d, jobs in self._running.items() for j in jobs]
            if running and drain_seconds > 0:
                log.info(
                    "draining: waiting up to %g s for %s",
                    drain_seconds,
                    ", ".join(f"job {j} on {d}" for d, j in running),
                )
            while any(self._running.values()) and not self._drain_cut:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(timeout=remaining)
            self._interrupting = True
            for device, jobs in self._running.items():
                for job_id in jobs:
                    if drain_seconds > 0 and not self._drain_cut:
                        log.warning(
                            "job %s on %s still running after the %g s drain: interrupting it",
                            job_id,
                            device,
                            drain_seconds,
                        )
                    self._active[job_id].interrupt.set()
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    def cut_drain(self) -> None:
        """End a drain of :meth:`stop` now (or the next one at its start): running jobs are
        interrupted at once and stay queued for the next start, as when the drain runs out.

        Call it from a thread, not a signal handler (it takes the manager's lock).
        """
        with self._cond:
            self._drain_cut = True
            self._cond.notify_all()

    # ------------------------------------------------------------------ queries

    def backends(self) -> list[Backend]:
        """The device backends served now, in the order they were added."""
        with self._cond:
            return list(self._backends.values())

    def devices(self) -> list[DeviceDescription]:
        """Fresh descriptions of the devices served now (a backend's description may change)."""
        return [b.describe() for b in self.backends()]

    def queue_lengths(self) -> dict[str, int]:
        """Number of queued jobs per device."""
        with self._cond:
            return {device: len(q) for device, q in self._queues.items()}

    def queue_length(self) -> int:
        """Number of queued jobs over all devices."""
        with self._cond:
            return sum(len(q) for q in self._queues.values())

    def running_job_ids(self) -> list[str]:
        """Ids of the jobs running now."""
        with self._cond:
            return [j for jobs in self._running.values() for j in jobs]

    def device_status(self, device: str) -> DeviceStatus:
        """Queue length, running job, health and status text of one device."""
        with self._cond:
            backend = self._backends[device]
        healthy, why = backend.health()
        with self._cond:
            running = self._running[device][0] if self._running[device] else ""
            status = self._status[device]
            queued = len(self._queues[device])
        return DeviceStatus(
            queue_length=queued,
            running_job_id=running,
            healthy=healthy,
            status=why if not healthy else status or why,
        )

    def execution_count(self, job_id: str) -> int:
        """How many times the job started executing."""
        return self._state.count_executions(job_id)

    # ------------------------------------------------------------------ RPC entry points

    def submit(self, spec: pb.JobSpec) -> pb.SubmitJobResponse:
        """Queue a job, re-execute a retried or re-measured one, or report a known job's state."""
        self._validate(spec)
        with self._cond:
            if self._stopping:
                raise AgentStopping("the agent is shutting down")
            job = self._active.get(spec.job_id)
            if job is not None:
                self._check_same(job.spec, spec)
                if job.state == pb.QUEUED and spec.device and spec.device != job.device:
                    self._move_queued(job, spec.device)
                return self._resubmit_active(job, spec)
            row = self._state.get_job(spec.job_id)
            if row is None:
                return self._queue_new(spec)
            self._check_same(pb.JobSpec.FromString(row.spec), spec, row.device_class)
            reason = self._rerun_reason(row, spec)
            if reason is None:
                self._state.update_spec(spec.job_id, self._stored(spec, row.device).SerializeToString())
                return pb.SubmitJobResponse(job_id=spec.job_id, state=state_value(row.state), already_known=True)
            return self._requeue(row, spec, reason)

    def _class_of(self, device: str) -> str | None:
        desc = self._descriptions.get(device)
        return desc.device_class if desc is not None else None

    def _check_same(self, known: pb.JobSpec, spec: pb.JobSpec, known_class: str = "") -> None:
        """The submission is the known job: the same spec, on the same device or another device of its class.

        Devices of a class are interchangeable, so a controller that re-leased a job to another
        device of the class (e.g. after this agent restarted) submits the same job. The known
        device's class is the recorded one (``known_class``) when that device is gone (a TVM lane
        whose RPC server left before this agent restarted).
        """
        if not spec.device and known.device:  # "the only device" named the known job's device
            spec = self._stored(spec, known.device)
        if spec.device != known.device:
            cls = self._class_of(known.device) or known_class or None
            other = self._class_of(spec.device)
            # A device this agent does not list now (a lane gone with its RPC server) has no class to
            # differ: the job id is the same work. Only two known, different classes conflict.
            if (cls is None and other is None) or (cls is not None and other is not None and cls != other):
                raise JobConflict(
                    f"job {spec.job_id!r} is already known on device {known.device!r} "
                    f"(class {cls or 'no longer served'}), not on {spec.device!r} of another class"
                )
            spec = self._stored(spec, known.device)
        if self._identity(known) != self._identity(spec):
            raise JobConflict(f"job {spec.job_id!r} is already known with a different spec")

    def _move_queued(self, job: _Job, device: str) -> None:
        """Move a queued job to another device of its class (``_cond`` held)."""
        device = self._resolve_device(device)
        queue = self._queues[job.device]
        if job.spec.job_id in queue:
            queue.remove(job.spec.job_id)
        log.info("job %s moves from %s to %s (same class)", job.spec.job_id, job.device, device)
        job.device = device
        job.spec = self._stored(job.spec, device)
        self._state.update_spec(
            job.spec.job_id, job.spec.SerializeToString(), device=device, device_class=self._class_of(device) or ""
        )
        self._enqueue(job)

    def _queue_new(self, spec: pb.JobSpec) -> pb.SubmitJobResponse:
        """Queue a job id seen for the first time (call with ``self._cond`` held)."""
        device = self._resolve_device(spec.device)
        stored = self._stored(spec, device)
        self._queue_pinned(
            spec,
            stored,
            device,
            lambda: self._state.insert_job(
                spec.job_id,
                stored.SerializeToString(),
                device,
                spec.attempt,
                spec.remeasure_token,
                device_class=self._class_of(device) or "",
            ),
        )
        log.info("job %s queued on %s", spec.job_id, device)
        return pb.SubmitJobResponse(job_id=spec.job_id, state=pb.QUEUED, already_known=False)

    def _queue_pinned(self, spec: pb.JobSpec, stored: pb.JobSpec, device: str, record: Callable[[], None]) -> None:
        """Pin the job's blobs (MissingBlobs if gone), ``record`` it durably, then queue it (``_cond`` held)."""
        shas = [spec.model_sha256, spec.dataset_sha256]
        missing = self._blobs.pin_if_present(shas)
        if missing:
            raise MissingBlobs(sorted(set(missing)))
        try:
            record()
        except BaseException:
            self._blobs.unpin(shas)
            raise
        self._enqueue(_Job(spec=stored, device=device, attempt=spec.attempt, token=spec.remeasure_token))

    def _resubmit_active(self, job: _Job, spec: pb.JobSpec) -> pb.SubmitJobResponse:
        """A known queued or running job: keep it, store the latest spec (``_cond`` held).

        A queued execution has not started, so it runs under the newest attempt and
        remeasure token; a running one keeps those it started under.
        """
        job.spec = self._stored(spec, job.device)
        if job.state == pb.QUEUED:
            job.attempt = max(job.attempt, spec.attempt)
            job.token = spec.remeasure_token or job.token
            self._state.update_spec(spec.job_id, job.spec.SerializeToString(), job.attempt, job.token)
        else:
            self._state.update_spec(spec.job_id, job.spec.SerializeToString())
        return pb.SubmitJobResponse(job_id=spec.job_id, state=job.state, already_known=True)

    @staticmethod
    def _rerun_reason(row: JobRow, spec: pb.JobSpec) -> str | None:
        """Why a finished job executes again for this submission (None: it does not)."""
        if row.state in ("FAILED", "CANCELLED") and spec.attempt > row.attempt:
            return f"attempt {spec.attempt} after a {row.state} attempt {row.attempt}"
        if row.state == "SUCCEEDED" and spec.remeasure_token and spec.remeasure_token != row.remeasure_token:
            return f"re-measure (token {spec.remeasure_token!r})"
        return None

    def _requeue(self, row: JobRow, spec: pb.JobSpec, reason: str) -> pb.SubmitJobResponse:
        """Queue a finished job for a new execution series, on the device the submission names
        (of the same class: see :meth:`_check_same`) (call with ``self._cond`` held)."""
        device = self._resolve_device(spec.device or row.device)
        stored = self._stored(spec, device)

        def record() -> None:
            self._state.requeue_job(spec.job_id, stored.SerializeToString(), spec.attempt, spec.remeasure_token)
            if device != row.device:
                self._state.update_spec(
                    spec.job_id, stored.SerializeToString(), device=device, device_class=self._class_of(device) or ""
                )

        self._queue_pinned(spec, stored, device, record)
        log.info("job %s queued again on %s: %s", spec.job_id, device, reason)
        return pb.SubmitJobResponse(job_id=spec.job_id, state=pb.QUEUED, already_known=False)

    def _enqueue(self, job: _Job) -> None:
        """Make a job active and queue it on its device (call with ``self._cond`` held)."""
        self._active[job.spec.job_id] = job
        self._queues[job.device].append(job.spec.job_id)
        self._publish(job, pb.QUEUED, "queued")
        self._prepare_ahead(job)

    def _prepare_ahead(self, job: _Job) -> None:
        """Let the job's backend start preparing its model (the hook must not block)."""
        spec = job.spec
        self._backends[job.device].prepare_ahead(
            self._blobs.path(spec.model_sha256),
            LoadOptions(input_name=spec.input_name, backend_options=spec.backend_options),
        )

    def cancel(self, job_id: str) -> pb.JobState:
        """Cancel a job; returns its state after the request (RUNNING = cancel pending)."""
        with self._cond:
            job = self._active.get(job_id)
            if job is None:
                row = self._state.get_job(job_id)
                if row is None:
                    raise JobNotFound(job_id)
                return state_value(row.state)
            if job.state == pb.QUEUED:
                self._queues[job.device].remove(job_id)
                del self._active[job_id]
                now = time.time()
                result = self._result(job, pb.CANCELLED, "cancelled while queued")
                result.finished_at = now
                self._state.set_state(job_id, "CANCELLED", result=result.SerializeToString(), error=result.error)
                self._blobs.unpin([job.spec.model_sha256, job.spec.dataset_sha256])
                self._backends[job.device].forget_ahead(
                    self._blobs.path(job.spec.model_sha256),
                    LoadOptions(input_name=job.spec.input_name, backend_options=job.spec.backend_options),
                )
                self._publish(job, pb.CANCELLED, "done", final_result=result)
                log.info("job %s cancelled while queued", job_id)
                return pb.CANCELLED
            job.cancel_requested = True
            job.interrupt.set()
            log.info("cancel requested for running job %s", job_id)
            return job.state

    def watch(
        self,
        job_id: str,
        is_active: Callable[[], bool],
        heartbeat_s: float = DEFAULT_HEARTBEAT_SECONDS,
    ) -> Iterator[pb.JobEvent]:
        """Events of a job until its final one; a finished job yields its final event at once.

        While nothing changes, the latest event is repeated with ``heartbeat = True`` every
        ``heartbeat_s`` seconds. Raises :class:`JobNotFound` for an unknown id and
        :class:`AgentStopping` when the agent stops before the job finished. ``is_active``
        tells whether the watcher is still connected; call :meth:`wake_watchers` when that
        changes.
        """
        heartbeat_s = max(heartbeat_s, MIN_HEARTBEAT_SECONDS)
        with self._cond:
            job = self._active.get(job_id)
            row = None if job is not None else self._state.get_job(job_id)
        if job is None:
            if row is None or row.result is None:
                raise JobNotFound(job_id)
            result = pb.JobResult.FromString(row.result)
            yield pb.JobEvent(
                job_id=job_id,
                state=result.state,
                stage="done",
                done=result.num_samples,
                total=result.num_samples,
                final=True,
                result=result,
                timestamp=result.finished_at,
            )
            return
        seen = -1
        sent_at = time.monotonic()
        while True:
            with self._cond:
                beat = False
                while job.version == seen:
                    if not is_active():
                        return
                    # while the agent drains, watchers of a running job see it finish
                    if self._interrupting or (self._stopping and job.state != pb.RUNNING):
                        raise AgentStopping("the agent is shutting down; watch again after restart")
                    remaining = sent_at + heartbeat_s - time.monotonic()
                    if remaining <= 0:
                        beat = True
                        break
                    self._cond.wait(timeout=remaining)
                if not is_active():
                    return
                event = job.event
                seen = job.version
            if beat:
                repeat = pb.JobEvent()
                repeat.CopyFrom(event)
                repeat.heartbeat = True
                event = repeat
            sent_at = time.monotonic()
            yield event
            if event.final:
                return

    def wake_watchers(self) -> None:
        """Wake watchers so they re-check whether their client is still there."""
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ internals

    def _validate(self, spec: pb.JobSpec) -> None:
        if not spec.job_id:
            raise InvalidJob("job_id is empty")
        if len(spec.job_id) > MAX_JOB_ID_LENGTH:
            raise InvalidJob(f"job_id is longer than {MAX_JOB_ID_LENGTH} characters")
        for name in ("model_sha256", "dataset_sha256"):
            value = getattr(spec, name)
            try:
                check_sha256(value)
            except ValueError as exc:
                raise InvalidJob(f"{name}: {exc}") from None
        for name in ("top_k", "chunk_size"):
            if spec.HasField(name) and getattr(spec, name) == 0:
                raise InvalidJob(f"{name} must be > 0")

    def _known(self, job_id: str) -> tuple[pb.JobSpec | None, pb.JobState]:
        job = self._active.get(job_id)
        if job is not None:
            return job.spec, job.state
        row = self._state.get_job(job_id)
        if row is None:
            return None, pb.JOB_STATE_UNSPECIFIED
        return pb.JobSpec.FromString(row.spec), state_value(row.state)

    def _identity(self, spec: pb.JobSpec) -> pb.JobSpec:
        """What must match for two submissions to be the same job (device filled in)."""
        out = pb.JobSpec()
        out.CopyFrom(spec)
        for name in SUBMISSION_FIELDS:
            out.ClearField(name)
        if not out.device and len(self._backends) == 1:
            out.device = next(iter(self._backends))
        return out

    @staticmethod
    def _stored(spec: pb.JobSpec, device: str) -> pb.JobSpec:
        """The spec as stored: a copy with the resolved device."""
        out = pb.JobSpec()
        out.CopyFrom(spec)
        out.device = device
        return out

    def _resolve_device(self, name: str) -> str:
        if not name:
            if len(self._backends) == 1:
                return next(iter(self._backends))
            raise InvalidJob("this agent has several devices; name one of: " + ", ".join(self._backends))
        if name not in self._backends:
            raise InvalidJob(f"unknown device {name!r}; this agent has: " + ", ".join(self._backends))
        return name

    def _publish(
        self,
        job: _Job,
        state: pb.JobState,
        stage: str,
        done: int = 0,
        total: int = 0,
        final_result: pb.JobResult | None = None,
    ) -> None:
        """Set the job's latest event and wake watchers (call with ``self._cond`` held)."""
        job.state = state
        event = pb.JobEvent(
            job_id=job.spec.job_id,
            state=state,
            stage=stage,
            done=done,
            total=total,
            timestamp=time.time(),
        )
        if final_result is not None:
            event.final = True
            event.result.CopyFrom(final_result)
            event.done = final_result.num_samples
            event.total = final_result.num_samples
        job.event = event
        job.version += 1
        self._cond.notify_all()

    def _result(self, job: _Job, state: pb.JobState, error: str) -> pb.JobResult:
        desc = self._descriptions.get(job.device)
        result = pb.JobResult(
            job_id=job.spec.job_id,
            device=job.device,
            device_class=desc.device_class if desc else "",
            agent_id=self._agent_id,
            state=state,
            error=error,
            attempt=job.attempt,
            executions=self._state.count_executions(job.spec.job_id),
        )
        if desc is not None:
            result.runtime_versions.update(desc.runtime_versions)
            result.simulated_latency_ms_per_sample = desc.simulated_latency_ms_per_sample
        handle = job.handle
        if handle is not None:
            result.compile_seconds = handle.compile_seconds
            result.tuning_seconds = handle.tuning_seconds
            result.tuned = handle.tuned
            result.compile_cache_hit = handle.compile_cache_hit
            result.executed_on = handle.executed_on
        return result

    def _startable(self, device: str) -> bool:
        """Whether the first queued job of ``device`` may start now (lock held): on an idle device, or beside
        running jobs when it and they only predict (no latency measured) and the device runs that many at once."""
        queue, running = self._queues[device], self._running[device]
        if not queue:
            return False
        if not running:
            return True
        jobs = [self._active[j] for j in (*running, queue[0])]
        return len(running) < self._backends[device].prediction_slots() and all(predicts_only(j.spec) for j in jobs)

    def _worker(self, device: str) -> None:
        queue = self._queues[device]
        while True:
            with self._cond:
                while not self._startable(device) and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job_id = queue.popleft()
                job = self._active[job_id]
                self._running[device].append(job_id)
                self._state.set_state(job_id, "RUNNING")
                execution_id = self._state.start_execution(job_id, job.attempt)
                self._publish(job, pb.RUNNING, "loading")
            log.info("job %s started on %s", job_id, device)
            self._execute(job, execution_id)

    def _execute(self, job: _Job, execution_id: int) -> None:
        spec = job.spec
        started = time.time()
        clock = time.monotonic()
        try:
            result = self._measure(job, started)
        except Interrupted:
            if not job.cancel_requested:  # the agent is stopping: run it again after restart
                self._state.finish_execution(execution_id, "interrupted")
                self._state.set_state(spec.job_id, "QUEUED")
                self._report_finished(job.device, "INTERRUPTED", time.monotonic() - clock)
                with self._cond:
                    self._running[job.device].remove(spec.job_id)
                    self._status[job.device] = ""
                    self._cond.notify_all()
                log.info("job %s on %s interrupted by shutdown; it stays queued", spec.job_id, job.device)
                return
            result = self._result(job, pb.CANCELLED, "cancelled while running")
        except Infeasible as exc:
            log.warning("job %s is infeasible on %s: %s", spec.job_id, job.device, exc)
            result = self._result(job, pb.FAILED, f"infeasible on {job.device}: {exc}")
            result.infeasible = True
            result.unsupported_ops.extend(exc.ops)
        except Exception as exc:  # job-failure handler: any error of model, data or runtime
            # must end as a FAILED job with its message instead of killing the device worker.
            log.warning("job %s on %s failed: %s", spec.job_id, job.device, exc)
            message = str(exc) or type(exc).__name__
            result = self._result(job, pb.FAILED, f"{type(exc).__name__}: {message}")
        result.started_at = started
        result.finished_at = time.time()
        self._state.set_state(
            spec.job_id,
            state_name(result.state),
            result=result.SerializeToString(),
            error=result.error,
        )
        self._state.finish_execution(execution_id, state_name(result.state))
        self._blobs.unpin([spec.model_sha256, spec.dataset_sha256])
        self._report_finished(job.device, state_name(result.state), time.monotonic() - clock)
        with self._cond:
            self._running[job.device].remove(spec.job_id)
            self._status[job.device] = ""
            self._active.pop(spec.job_id, None)
            self._cond.notify_all()  # a job queued behind it may start now
            self._publish(job, result.state, "done", final_result=result)
        log.info("job %s on %s finished: %s", spec.job_id, job.device, state_name(result.state))

    def _report_finished(self, device: str, state: str, seconds: float) -> None:
        if self._on_finished is not None:
            self._on_finished(device, state, seconds)

    def _measure(self, job: _Job, started: float) -> pb.JobResult:
        """The job measured on its device (:func:`tuneqn.agent.measure.measure`), as a SUCCEEDED result."""
        with self._cond:
            backend = self._backends[job.device]

        def progress(stage: str, done: int, total: int) -> None:
            with self._cond:
                self._publish(job, pb.RUNNING, stage, done=done, total=total)

        def loaded(handle: PreparedModel | None) -> None:
            job.handle = handle

        measured = measure(job.spec, backend, self._blobs, job.interrupt, progress, lambda: self._quiet(job), loaded)
        result = self._result(job, pb.SUCCEEDED, "")
        measured.fill(result)
        result.started_at = started
        return result

    @contextmanager
    def _quiet(self, job: _Job) -> Iterator[None]:
        """Hold the quiet lock (if configured) while the job's latency is measured."""
        if self._quiet_lock is None:
            yield
            return
        lock = self._quiet_lock

        def blocked() -> None:
            with self._cond:
                self._status[job.device] = f"waiting for the quiet lock {lock.path} before timing job {job.spec.job_id}"

        try:
            with lock.exclusive(stop=job.interrupt, on_blocked=blocked):
                with self._cond:
                    self._status[job.device] = ""
                yield
        finally:
            with self._cond:
                self._status[job.device] = ""
