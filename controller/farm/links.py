"""The agents of a run: one :class:`AgentLink` per agent (connection and liveness), one :class:`DeviceSlot` per
device it serves (upload by hash, submit, watch; the next job handed ahead where the device takes it).

Agent liveness (:class:`AgentState`): CONNECTING → READY ⇄ BUSY; an RPC failure, a closed
stream or silence (no event, heartbeat or keepalive answer for ``silent_after_s``) →
UNREACHABLE (reconnect with backoff) → READY; a contract mismatch or a rejected token →
INCOMPATIBLE (never used again); STOPPED at the end.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable

import grpc

from tuneqn.controller.farm.board import JobBoard
from tuneqn.controller.farm.client import AgentClient, AgentSilent, ContractMismatch
from tuneqn.controller.farm.jobs import Endpoint, JobPlan
from tuneqn.v1 import agent_pb2 as pb

log = logging.getLogger(__name__)

#: Errors that no retry can fix: the agent is unusable for this controller.
_FATAL = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED)
#: Submission errors that say the job itself is wrong (retrying elsewhere gives the same answer).
_JOB_REJECTED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS)


def gone_device(details: str | None) -> bool:
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


class AgentLink(threading.Thread):
    """Connection and liveness of one agent; starts a :class:`DeviceSlot` per device it serves."""

    def __init__(
        self,
        endpoint: Endpoint,
        board: JobBoard,
        stop: threading.Event,
        on_device: Callable[[AgentLink, pb.Device], None],
    ) -> None:
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
            self._set(
                AgentState.INCOMPATIBLE if exc.code() in _FATAL else AgentState.UNREACHABLE,
                f"{exc.code().name}: {exc.details()}",
            )
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
            log.info(
                "device %s: %s",
                self.holder,
                "healthy again"
                if device_available(device)
                else f"unhealthy ({device.status or 'no reason given'}); it takes no new job",
            )
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
            job = (
                held[0]
                if held
                else self.board.take(self.device.device_class, self.holder, timeout=1.0, ready=self.available)
            )
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
                elif exc.code() == grpc.StatusCode.INVALID_ARGUMENT and gone_device(exc.details()):
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
