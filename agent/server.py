"""The agent's gRPC server: the ``tuneqn.v1.Agent`` servicer plus the health service.

Keepalive: the server accepts client pings every :data:`MIN_CLIENT_PING_MS` or more
(also without calls, never answering them with GOAWAY) and pings idle connections
itself, so dead peers on either side are noticed; ``WatchJob`` streams carry heartbeats.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from pathlib import Path
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import tuneqn
from tuneqn.agent.auth import BearerTokenInterceptor
from tuneqn.agent.backends.base import Backend, DeviceDescription
from tuneqn.agent.blobs import BlobStore, BlobTooLarge, InvalidBlob, check_sha256
from tuneqn.agent.config import AgentConfig, hostport, listen_problem, security_problem
from tuneqn.agent.jobs import (
    DEFAULT_HEARTBEAT_SECONDS,
    AgentStopping,
    DeviceStatus,
    InvalidJob,
    JobConflict,
    JobManager,
    JobNotFound,
    MissingBlobs,
)
from tuneqn.agent.metrics import AgentMetrics, compile_caches
from tuneqn.agent.quiet import QuietLock
from tuneqn.agent.state import AgentState, StateDirLock
from tuneqn.v1 import agent_pb2 as pb
from tuneqn.v1 import agent_pb2_grpc
from tuneqn.v1.contract import CONTRACT_REVISION, CONTRACT_VERSION, MIN_CLIENT_REVISION

log = logging.getLogger(__name__)

SERVICE_NAME = "tuneqn.v1.Agent"
MAX_RECEIVE_MESSAGE_BYTES = 16 * 1024**2
MIN_CLIENT_PING_MS = 5_000  # clients may ping this often (the controller pings every 10 s)
SERVER_PING_MS = 20_000  # the server pings idle connections this often ...
SERVER_PING_TIMEOUT_MS = 10_000  # ... and drops them when no ack comes within this
KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", SERVER_PING_MS),
    ("grpc.keepalive_timeout_ms", SERVER_PING_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_CLIENT_PING_MS),
    ("grpc.http2.max_ping_strikes", 0),  # 0 = never GOAWAY a client for pinging too often
    ("grpc.http2.max_pings_without_data", 0),  # 0 = server pings need no data in between
]


def device_proto(desc: DeviceDescription, status: DeviceStatus | None = None) -> pb.Device:
    """``tuneqn.v1.Device`` for a backend's description and (optionally) its current status."""
    device = pb.Device(**dataclasses.asdict(desc))
    if status is not None:
        device.queue_length = status.queue_length
        device.running_job_id = status.running_job_id
        device.healthy = status.healthy
        device.status = status.status
    return device


def cache_usage(blobs: BlobStore, backends: Iterable[Backend]) -> list[pb.CacheUsage]:
    """The agent's disk caches: the blob cache, and the TVM compile cache(s) if any."""
    usage = [
        pb.CacheUsage(name="blobs", used_bytes=blobs.total_bytes, limit_bytes=blobs.cache_bytes, entries=blobs.count)
    ]
    for cache in compile_caches(backends):
        used, entries = cache.usage()
        usage.append(pb.CacheUsage(name="tvm-compile", used_bytes=used, limit_bytes=cache.max_bytes, entries=entries))
    return usage


def last_failure(state: AgentState) -> pb.JobFailure | None:
    """The latest FAILED job of the state dir, infeasible ones aside (they are an answer, not an error)."""
    for row in state.recent_failures():
        if row.result is not None and pb.JobResult.FromString(row.result).infeasible:
            continue
        return pb.JobFailure(job_id=row.job_id, device=row.device, error=row.error or "", at=row.updated)
    return None


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """``context.abort``, typed as not returning: grpc raises from it, its (missing) stubs don't say so."""
    context.abort(code, details)
    raise RuntimeError("grpc.ServicerContext.abort returned")  # unreachable: abort always raises


class MetricsBindError(RuntimeError):
    """A side listener (``--metrics-listen``, ``--health-listen``: ``flag``) cannot bind its address."""

    def __init__(
        self, host: str, port: int, reason: str, flag: str = "--metrics-listen", what: str = "metrics"
    ) -> None:
        self.address = hostport((host, port))
        self.reason = reason
        self.flag = flag
        self.what = what
        super().__init__(f"cannot serve {what} on {self.address}: {reason}")


class AgentServicer(agent_pb2_grpc.AgentServicer):
    """Implements ``tuneqn.v1.Agent`` on top of the job manager and the blob store.

    The devices are read from the job manager at each ``GetInfo``: backends may add
    devices while the agent runs, and a device's description may change (remote servers).
    """

    def __init__(
        self,
        jobs: JobManager,
        blobs: BlobStore,
        agent_id: str,
        state: AgentState | None = None,
        started_at: float | None = None,
    ) -> None:
        self._jobs = jobs
        self._blobs = blobs
        self._agent_id = agent_id
        self._state = state
        self._started_at = time.time() if started_at is None else started_at
        self._hostname = socket.gethostname()

    def GetInfo(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> pb.AgentInfo:
        """Handshake: refuse clients of another contract, describe the agent otherwise."""
        if request.contract_version != CONTRACT_VERSION:
            spoken = request.contract_version or "nothing"
            _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"contract mismatch: client speaks {spoken!r}, this agent speaks "
                f"{CONTRACT_VERSION!r} (revision {CONTRACT_REVISION}); "
                "use a controller and agent of the same major contract",
            )
        if request.contract_revision < MIN_CLIENT_REVISION:
            _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"contract revision too old: client {request.client_version or '?'} speaks "
                f"{CONTRACT_VERSION} revision {request.contract_revision}, this agent needs "
                f"revision {MIN_CLIENT_REVISION} or newer (it implements {CONTRACT_REVISION}); "
                "upgrade the controller",
            )
        if request.contract_revision > CONTRACT_REVISION:
            log.info(
                "client %s uses contract revision %d, newer than this agent's %d",
                request.client_version,
                request.contract_revision,
                CONTRACT_REVISION,
            )
        running = self._jobs.running_job_ids()
        info = pb.AgentInfo(
            agent_version=tuneqn.__version__,
            contract_version=CONTRACT_VERSION,
            contract_revision=CONTRACT_REVISION,
            agent_id=self._agent_id,
            hostname=self._hostname,
            queue_length=self._jobs.queue_length(),
            running_job_id=running[0] if running else "",
            running_job_ids=running,
            devices=[device_proto(d, self._jobs.device_status(d.name)) for d in self._jobs.devices()],
            caches=cache_usage(self._blobs, self._jobs.backends()),
            started_at=self._started_at,
        )
        if self._state is not None:
            info.jobs_by_state.update(self._state.job_counts())
            failure = last_failure(self._state)
            if failure is not None:
                info.last_failure.CopyFrom(failure)
        return info

    def UploadBlob(self, request_iterator: Iterator[pb.BlobChunk], context: grpc.ServicerContext) -> pb.BlobRef:
        """Store a verified blob (temp file + atomic rename); nothing is kept on error."""
        first = next(request_iterator, None)
        if first is None:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "empty upload: no chunk received")
        try:
            check_sha256(first.sha256)
            present_size = self._blobs.size(first.sha256)
            if present_size is not None:
                if present_size != first.total_size:
                    raise InvalidBlob(f"blob {first.sha256} is {present_size} bytes, announced {first.total_size}")
                self._blobs.touch(first.sha256)
                return pb.BlobRef(sha256=first.sha256, size=present_size, already_present=True)
            upload = self._blobs.begin_upload(first.sha256, first.total_size)
            try:
                upload.write(first.data)
                for chunk in request_iterator:
                    upload.write(chunk.data)
                upload.commit()
            finally:
                upload.abort()
        except InvalidBlob as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except BlobTooLarge as exc:
            _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except OSError as exc:
            log.error("cannot store blob %s: %s", first.sha256, exc)
            _abort(context, grpc.StatusCode.INTERNAL, f"cannot store blob: {exc}")
        log.info("stored blob %s (%d bytes)", first.sha256, first.total_size)
        return pb.BlobRef(sha256=first.sha256, size=first.total_size, already_present=False)

    def HasBlobs(self, request: pb.HasBlobsRequest, context: grpc.ServicerContext) -> pb.HasBlobsResponse:
        """Presence of each requested blob."""
        try:
            present = [self._blobs.has(s) for s in request.sha256]
        except InvalidBlob as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.HasBlobsResponse(present=present)

    def SubmitJob(self, request: pb.JobSpec, context: grpc.ServicerContext) -> pb.SubmitJobResponse:
        """Queue a job (idempotent by job_id)."""
        try:
            return self._jobs.submit(request)
        except InvalidJob as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except JobConflict as exc:
            _abort(context, grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except MissingBlobs as exc:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except AgentStopping as exc:
            _abort(context, grpc.StatusCode.UNAVAILABLE, str(exc))

    def WatchJob(self, request: pb.WatchJobRequest, context: grpc.ServicerContext) -> Iterator[pb.JobEvent]:
        """Stream a job's events until its final one, with heartbeats while nothing changes."""
        context.add_callback(self._jobs.wake_watchers)
        heartbeat_s = request.heartbeat_ms / 1000.0 if request.heartbeat_ms else DEFAULT_HEARTBEAT_SECONDS
        try:
            yield from self._jobs.watch(request.job_id, context.is_active, heartbeat_s)
        except JobNotFound:
            _abort(context, grpc.StatusCode.NOT_FOUND, f"unknown job {request.job_id!r}")
        except AgentStopping as exc:
            _abort(context, grpc.StatusCode.UNAVAILABLE, str(exc))

    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.CancelJobResponse:
        """Cancel a queued job now or a running one at its next chunk boundary."""
        try:
            return pb.CancelJobResponse(state=self._jobs.cancel(request.job_id))
        except JobNotFound:
            _abort(context, grpc.StatusCode.NOT_FOUND, f"unknown job {request.job_id!r}")


class AgentServer:
    """State, blob cache, job workers and gRPC server of one agent process."""

    def __init__(self, config: AgentConfig, backends: list[Backend]) -> None:
        if (config.tls_cert is None) != (config.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if config.tls_ca is not None and config.tls_cert is None:
            raise ValueError("tls_ca (client certificates) needs tls_cert and tls_key")
        problem = security_problem(
            config.host, bool(config.token), config.tls_cert is not None, config.tls_ca is not None
        )
        if problem is not None and not config.insecure:
            raise ValueError(f"refusing to serve on non-loopback {config.host} {problem}")
        side = listen_problem(
            config.health_host, config.health_port, config.metrics_host, config.metrics_port, config.metrics_public
        )
        if side is not None:
            raise ValueError(side)
        self.config = config
        self.quiet_lock = QuietLock(config.quiet_lock) if config.quiet_lock is not None else None
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = StateDirLock(self.state_dir)
        try:
            self.state = AgentState(self.state_dir)
        except BaseException:
            self._lock.release()
            raise
        self.agent_id = self.state.agent_id()
        self.blobs = BlobStore(
            self.state_dir / "blobs",
            cache_bytes=config.blob_cache_bytes,
            max_blob_bytes=config.max_blob_bytes,
        )
        by_name: dict[str, Backend] = {}
        for backend in backends:
            name = backend.describe().name
            if name in by_name:
                raise ValueError(f"two backends for device {name!r}")
            by_name[name] = backend
        self.metrics = AgentMetrics(self._live_metrics)
        self.jobs = JobManager(
            self.state,
            self.blobs,
            by_name,
            self.agent_id,
            self.quiet_lock,
            on_finished=self.metrics.job_finished,
        )
        self.hostname = socket.gethostname()
        self.started_at = time.time()
        self.health = health.HealthServicer()
        self._server: grpc.Server | None = None
        self._health_server: grpc.Server | None = None
        self.port: int = 0
        self.health_port: int = 0  # of the plaintext loopback health listener (0: none)

    @property
    def backends(self) -> dict[str, Backend]:
        """The device backends served now, by device name (devices may join while it runs)."""
        return {b.describe().name: b for b in self.jobs.backends()}

    def _live_metrics(self) -> dict[str, object]:
        """What the metrics endpoint reads at each scrape (see :class:`AgentMetrics`)."""
        return {
            "queues": self.jobs.queue_lengths(),
            "running": {d.name for d in self.jobs.devices() if self.jobs.device_status(d.name).running_job_id},
            "caches": cache_usage(self.blobs, self.jobs.backends()),
        }

    @property
    def metrics_port(self) -> int:
        """Port of the metrics endpoint (0: not serving)."""
        return self.metrics.port

    @property
    def running(self) -> bool:
        """Whether the server was started and not stopped yet."""
        return self._server is not None

    @property
    def address(self) -> str:
        """``host:port`` the server listens on (IPv6 hosts in brackets)."""
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"{host}:{self.port}"

    def start(self) -> int:
        """Recover jobs, start the workers and the server; returns the bound port."""
        interceptors: list[grpc.ServerInterceptor] = (
            [BearerTokenInterceptor(self.config.token)] if self.config.token else []
        )
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.config.max_workers, thread_name_prefix="tuneqn-rpc"),
            interceptors=interceptors,
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
                *KEEPALIVE_OPTIONS,
            ],
        )
        agent_pb2_grpc.add_AgentServicer_to_server(
            AgentServicer(self.jobs, self.blobs, self.agent_id, self.state, self.started_at), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        target = f"{host}:{self.config.port}"
        if self.config.tls_cert is not None and self.config.tls_key is not None:
            credentials = grpc.ssl_server_credentials(
                [(self.config.tls_key, self.config.tls_cert)],
                root_certificates=self.config.tls_ca,
                require_client_auth=self.config.tls_ca is not None,
            )
            self.port = server.add_secure_port(target, credentials)
        else:
            self.port = server.add_insecure_port(target)
        if self.port == 0:  # older grpc versions report a failed bind this way
            raise RuntimeError(f"cannot bind {target}")
        health_server = self._health_listener(server) if self.config.health_host is not None else None
        if self.config.metrics_host is not None:
            try:
                self.metrics.serve(self.config.metrics_host, self.config.metrics_port)
            except OSError as exc:
                server.stop(None)
                if health_server is not None:
                    health_server.stop(None)
                raise MetricsBindError(
                    self.config.metrics_host, self.config.metrics_port, str(exc.strerror or exc)
                ) from None
        self.jobs.start()
        server.start()
        self._server = server
        if health_server is not None:
            health_server.start()
            self._health_server = health_server
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("agent %s on host %s listening on %s", self.agent_id, self.hostname, self.address)
        if self.metrics.port:
            mhost = self.config.metrics_host or ""
            mhost = f"[{mhost}]" if ":" in mhost else mhost
            log.info("metrics on http://%s:%d/metrics", mhost, self.metrics.port)
        if self.health_port:
            log.info("plaintext gRPC health on %s", hostport((self.config.health_host or "", self.health_port)))
        return self.port

    def _health_listener(self, main: grpc.Server) -> grpc.Server:
        """The plaintext loopback server of ``--health-listen``: the health service and nothing
        else (no token, no TLS: it says SERVING or not, and drives nothing)."""
        host, port = self.config.health_host or "", self.config.health_port
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="tuneqn-health"),
            options=[("grpc.so_reuseport", 0)],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        try:  # a plain bind first: its error says why in words (gRPC's bind only logs it)
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as trial:
                trial.bind((host, port))
        except OSError as exc:
            main.stop(None)
            raise MetricsBindError(host, port, str(exc.strerror or exc), "--health-listen", "health") from None
        try:
            bound = server.add_insecure_port(hostport((host, port)))
        except RuntimeError as exc:  # grpc raises RuntimeError for a failed bind
            bound, reason = 0, str(exc)
        else:
            reason = "address in use or not available"
        if bound == 0:
            main.stop(None)
            raise MetricsBindError(host, port, reason, "--health-listen", "health")
        self.health_port = bound
        return server

    def stop(self, grace: float = 2.0, drain_seconds: float | None = None) -> None:
        """Stop taking work, let running jobs finish within the drain time, stop the server.

        ``drain_seconds`` (default ``config.drain_seconds``): how long running jobs may
        take to finish; those still running then are interrupted and stay queued.
        """
        drain = self.config.drain_seconds if drain_seconds is None else drain_seconds
        started = self._server is not None
        self.health.enter_graceful_shutdown()
        self.jobs.stop(drain_seconds=drain)
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        if self._health_server is not None:
            self._health_server.stop(None).wait()
            self._health_server = None
        for backend in self.jobs.backends():
            backend.close()
        self.metrics.close()
        self.state.close()
        self._lock.release()
        if started:  # after a failed start() this only releases what __init__ took
            log.info("agent stopped (%s on host %s)", self.agent_id, self.hostname)

    def cut_drain(self) -> None:
        """Cut a running (or coming) drain of :meth:`stop` short: running jobs are
        interrupted now and stay queued. Thread-safe; not for signal handlers."""
        self.jobs.cut_drain()

    def __enter__(self) -> AgentServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
