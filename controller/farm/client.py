"""Client of a ``tuneqn-agent``; speaks only the ``tuneqn.v1`` gRPC contract.

Errors of the agent surface as :class:`grpc.RpcError` (``.code()``, ``.details()``),
except for the version handshake (:class:`ContractMismatch`), a job stream that stays
silent for longer than its ``idle_timeout`` (:class:`AgentSilent`) and timeouts of
:meth:`AgentClient.wait_result` (:class:`TimeoutError`).

Liveness: the channel pings the agent every ``keepalive_time`` seconds (also between
calls) and fails its calls with UNAVAILABLE when no answer comes within
``keepalive_timeout``; :meth:`AgentClient.watch` asks the agent for heartbeats every
``heartbeat_ms`` and, with ``idle_timeout``, gives up on a stream that stays silent.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tuneqn
from tuneqn.controller.common.files import file_sha256
from tuneqn.v1 import agent_pb2 as pb
from tuneqn.v1 import agent_pb2_grpc
from tuneqn.v1.contract import CONTRACT_REVISION, CONTRACT_VERSION, MIN_AGENT_REVISION

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
MAX_RECEIVE_MESSAGE_BYTES = 512 * 1024 * 1024
DEFAULT_KEEPALIVE_SECONDS = 10.0
DEFAULT_KEEPALIVE_TIMEOUT_SECONDS = 5.0
DEFAULT_HEARTBEAT_MS = 2000

PemSource = str | os.PathLike[str] | bytes


class ContractMismatch(RuntimeError):
    """The agent speaks another contract than this client."""


class AgentSilent(Exception):
    """A job stream brought no event (heartbeats included) for longer than its idle timeout."""


class _IdleWatchdog:
    """Cancels a streaming call when it is armed for longer than ``idle`` seconds.

    Armed only while the client waits for the next message, so a slow consumer of the
    stream is not mistaken for a silent agent.
    """

    def __init__(self, call: grpc.Future, idle: float) -> None:
        self._call = call
        self._idle = idle
        self._cond = threading.Condition()
        self._armed_at: float | None = None
        self._stopped = False
        self.fired = False
        threading.Thread(target=self._run, name="tuneqn-watch-idle", daemon=True).start()

    def arm(self) -> None:
        with self._cond:
            self._armed_at = time.monotonic()
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._armed_at = None
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                if self._armed_at is None:
                    self._cond.wait()
                    continue
                remaining = self._armed_at + self._idle - time.monotonic()
                if remaining <= 0:
                    self.fired = True
                    break
                self._cond.wait(remaining)
        if self.fired:
            self._call.cancel()


def _pem(source: PemSource | None) -> bytes | None:
    """PEM bytes: ``bytes`` are taken as the content, anything else as a file path."""
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


def decode_topk(result: pb.JobResult) -> np.ndarray:
    """``topk_indices`` of a result as an int32 array ``[num_samples, top_k]``."""
    expected = result.num_samples * result.top_k * 4
    if len(result.topk_indices) != expected:
        raise ValueError(
            f"topk_indices holds {len(result.topk_indices)} bytes, expected {expected} "
            f"for {result.num_samples} x {result.top_k} int32"
        )
    flat = np.frombuffer(result.topk_indices, dtype="<i4")
    return flat.astype(np.int32).reshape(result.num_samples, result.top_k)


class AgentClient:
    """Connection to one agent.

    ``token`` is sent as ``authorization: Bearer <token>``. TLS is used when
    ``tls_ca`` (the CA that signed the agent's certificate) or a client certificate is
    given; ``tls_cert``/``tls_key`` are the client's certificate for mTLS. PEM sources
    are file paths or ``bytes`` contents. ``timeout`` is the deadline of unary calls
    in seconds. ``keepalive_time``/``keepalive_timeout`` (seconds) set the channel's
    keepalive pings (the agent accepts one every 5 s or more).
    """

    def __init__(
        self,
        address: str,
        token: str | None = None,
        tls_ca: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        timeout: float = 30.0,
        keepalive_time: float = DEFAULT_KEEPALIVE_SECONDS,
        keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT_SECONDS,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if keepalive_time <= 0 or keepalive_timeout <= 0:
            raise ValueError("keepalive_time and keepalive_timeout must be positive")
        self.address = address
        self.timeout = timeout
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        options = [
            ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", int(keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive_timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        if tls_ca is not None or tls_cert is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(tls_ca),
                private_key=_pem(tls_key),
                certificate_chain=_pem(tls_cert),
            )
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        # grpcio-tools generates the service stubs without annotations (no .pyi for *_pb2_grpc)
        self._stub = agent_pb2_grpc.AgentStub(self._channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # ------------------------------------------------------------------ agent

    def info(self, check_revision: bool = True) -> pb.AgentInfo:
        """Version handshake; returns the agent's description.

        Raises :class:`ContractMismatch` when the agent speaks another contract or refuses
        this client, or (``check_revision``) implements a revision older than
        ``MIN_AGENT_REVISION``.
        """
        request = pb.GetInfoRequest(
            client_version=tuneqn.__version__,
            contract_version=CONTRACT_VERSION,
            contract_revision=CONTRACT_REVISION,
        )
        try:
            info: pb.AgentInfo = self._stub.GetInfo(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise ContractMismatch(f"{self.address}: {exc.details()}") from exc
            raise
        if info.contract_version != CONTRACT_VERSION:
            raise ContractMismatch(f"{self.address} speaks {info.contract_version!r}, this client {CONTRACT_VERSION!r}")
        if check_revision and info.contract_revision < MIN_AGENT_REVISION:
            raise ContractMismatch(
                f"{self.address} implements {CONTRACT_VERSION} revision {info.contract_revision}, "
                f"this client needs revision {MIN_AGENT_REVISION} or newer; upgrade the agent"
            )
        return info

    def health(self, timeout: float | None = None) -> bool:
        """Whether the agent answers its health check as SERVING (no token needed)."""
        try:
            response = self._health.Check(
                health_pb2.HealthCheckRequest(service=""),
                timeout=self.timeout if timeout is None else timeout,
            )
        except grpc.RpcError:
            return False
        status: int = response.status  # grpc_health ships no stubs: name the int types here
        serving: int = health_pb2.HealthCheckResponse.SERVING
        return status == serving

    # ------------------------------------------------------------------ blobs

    def has_blobs(self, sha256s: Sequence[str]) -> list[bool]:
        """Which of the blobs the agent already holds."""
        response = self._stub.HasBlobs(
            pb.HasBlobsRequest(sha256=list(sha256s)), timeout=self.timeout, metadata=self._metadata
        )
        return list(response.present)

    def upload_file(self, path: str | os.PathLike[str], timeout: float | None = None) -> str:
        """Upload a file unless the agent has it; returns its sha256."""
        sha = file_sha256(Path(path))
        if self.has_blobs([sha])[0]:
            return sha
        size = os.path.getsize(path)

        def chunks() -> Iterator[pb.BlobChunk]:
            with open(path, "rb") as f:
                yield pb.BlobChunk(sha256=sha, total_size=size, data=f.read(CHUNK_BYTES))
                while data := f.read(CHUNK_BYTES):
                    yield pb.BlobChunk(data=data)

        self._stub.UploadBlob(chunks(), timeout=timeout, metadata=self._metadata)
        log.debug("uploaded %s (%d bytes) to %s", sha, size, self.address)
        return sha

    def upload_bytes(self, data: bytes, timeout: float | None = None) -> str:
        """Upload bytes unless the agent has them; returns their sha256."""
        sha = hashlib.sha256(data).hexdigest()
        if self.has_blobs([sha])[0]:
            return sha
        view = memoryview(data)

        def chunks() -> Iterator[pb.BlobChunk]:
            yield pb.BlobChunk(sha256=sha, total_size=len(data), data=bytes(view[:CHUNK_BYTES]))
            for start in range(CHUNK_BYTES, len(data), CHUNK_BYTES):
                yield pb.BlobChunk(data=bytes(view[start : start + CHUNK_BYTES]))

        self._stub.UploadBlob(chunks(), timeout=timeout, metadata=self._metadata)
        return sha

    # ------------------------------------------------------------------ jobs

    def submit(self, spec: pb.JobSpec) -> pb.SubmitJobResponse:
        """Submit a job; idempotent by job_id.

        A known id is not run again, except for a retry (``spec.attempt`` above the
        attempt a FAILED/CANCELLED job last ran under) or a re-measure (a new non-empty
        ``spec.remeasure_token`` for a SUCCEEDED job); ``already_known`` is then false.
        """
        response: pb.SubmitJobResponse = self._stub.SubmitJob(spec, timeout=self.timeout, metadata=self._metadata)
        return response

    def watch(
        self,
        job_id: str,
        timeout: float | None = None,
        heartbeat_ms: int = DEFAULT_HEARTBEAT_MS,
        idle_timeout: float | None = None,
    ) -> Iterator[pb.JobEvent]:
        """Events of a job until (and including) its final event.

        The agent repeats the latest event (``heartbeat = True``) every ``heartbeat_ms``
        while nothing changes. With ``idle_timeout`` (seconds, best well above the
        heartbeat period) the call is cancelled and :class:`AgentSilent` raised when no
        event arrives for that long (a stopped or cut-off agent). ``timeout`` is the
        deadline of the whole stream.
        """
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive")
        call = self._stub.WatchJob(
            pb.WatchJobRequest(job_id=job_id, heartbeat_ms=max(int(heartbeat_ms), 0)),
            timeout=timeout,
            metadata=self._metadata,
        )
        watchdog = None if idle_timeout is None else _IdleWatchdog(call, idle_timeout)
        try:
            while True:
                if watchdog is not None:
                    watchdog.arm()
                try:
                    event = next(call)
                except StopIteration:
                    return
                except grpc.RpcError as exc:
                    if watchdog is not None and watchdog.fired:
                        raise AgentSilent(
                            f"{self.address}: no event for job {job_id} in {idle_timeout:g} s "
                            "(heartbeats included); the agent is stopped or unreachable"
                        ) from exc
                    raise
                if watchdog is not None:
                    watchdog.disarm()
                yield event
        finally:
            if watchdog is not None:
                watchdog.stop()
            call.cancel()

    def wait_result(
        self,
        job_id: str,
        timeout: float | None = None,
        idle_timeout: float | None = None,
    ) -> pb.JobResult:
        """Block until the job is finished and return its result.

        Re-watches while the agent is UNAVAILABLE (e.g. restarting) for up to the
        client's ``timeout`` in a row. Raises :class:`TimeoutError` after ``timeout`` and
        :class:`AgentSilent` when a stream stays silent for ``idle_timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        unavailable_since: float | None = None
        backoff = 0.1
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"job {job_id} did not finish within {timeout} s")
            try:
                for event in self.watch(job_id, timeout=remaining, idle_timeout=idle_timeout):
                    unavailable_since = None
                    if event.final:
                        return event.result
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TimeoutError(f"job {job_id} did not finish within {timeout} s") from exc
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                now = time.monotonic()
                unavailable_since = unavailable_since or now
                if now - unavailable_since > self.timeout:
                    raise
                log.info("agent %s unavailable (%s); watching again", self.address, exc.details())
            pause = backoff if remaining is None else min(backoff, max(remaining, 0.0))
            time.sleep(pause)  # reconnect back-off, not synchronisation
            backoff = min(backoff * 2, 5.0)

    def cancel(self, job_id: str) -> int:
        """Cancel a job; returns its JobState after the request (RUNNING = cancel pending)."""
        response = self._stub.CancelJob(
            pb.CancelJobRequest(job_id=job_id), timeout=self.timeout, metadata=self._metadata
        )
        state: int = response.state
        return state

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
