"""Configuration of an agent server (kept free of heavy imports for the CLI)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MAX_BLOB_BYTES = 2 * 1024**3
DEFAULT_BLOB_CACHE_BYTES = 20 * 1024**3


@dataclass
class AgentConfig:
    """Everything the agent server needs besides its backends."""

    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_ca: bytes | None = None  # set: clients must present a certificate signed by it
    max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES
    blob_cache_bytes: int = DEFAULT_BLOB_CACHE_BYTES
    max_workers: int = 64
    insecure: bool = False  # allow a non-loopback bind that breaks the security rule
    quiet_lock: Path | None = None  # see tuneqn.agent.quiet
    metrics_host: str | None = None  # set: serve Prometheus metrics on metrics_host:metrics_port
    metrics_port: int = 0  # 0 = a free port (AgentServer.metrics_port tells which)
    metrics_public: bool = False  # allow a metrics_host off loopback (the endpoint has no auth)
    health_host: str | None = None  # set: plaintext gRPC health only, on a loopback address
    health_port: int = 0  # 0 = a free port (AgentServer.health_port tells which)
    drain_seconds: float = 0.0  # on stop, running jobs get this long to finish


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen_problem(
    health_host: str | None, health_port: int, metrics_host: str | None, metrics_port: int, metrics_public: bool
) -> str | None:
    """Why these side listeners are refused (None: allowed).

    The health listener is plaintext without auth and must stay on loopback (a container's
    HEALTHCHECK, a local supervisor); the metrics endpoint has no auth either and goes off
    loopback only with ``metrics_public`` (``--metrics-public``).
    """
    if health_host is not None and not is_loopback(health_host):
        return (
            f"--health-listen {hostport((health_host, health_port))}: not a loopback address (the health "
            "listener is plaintext for local checks only; use 127.0.0.1 or ::1)"
        )
    if metrics_host is not None and not metrics_public and not is_loopback(metrics_host):
        return (
            f"--metrics-listen {hostport((metrics_host, metrics_port))}: not a loopback address and the "
            "metrics have no authentication; add --metrics-public to serve them off loopback"
        )
    return None


def security_problem(host: str, token: bool, tls: bool, client_ca: bool) -> str | None:
    """Why serving on ``host`` with these settings is refused (None: it is allowed).

    Off loopback an agent needs a bearer token over TLS, or mutual TLS (client
    certificates signed by ``--tls-ca``): a token without TLS travels in clear text, and
    TLS without token or client CA serves every RPC to anyone.
    """
    if is_loopback(host):
        return None
    if tls and (token or client_ca):
        return None
    if not tls and not token:
        return "without --token-file or TLS"
    if not tls:
        return "with a token but without TLS (the token would travel in clear text; add --tls-cert/--tls-key)"
    return "with TLS but neither a token nor client certificates (add --token-file or --tls-ca)"


# ---------------------------------------------------------------------- TVM backend

DEFAULT_TVM_TARGET: dict[str, Any] = {"kind": "llvm"}
DEFAULT_TVM_PRIORITY = 1
DEFAULT_TVM_SESSION_TIMEOUT = 900.0
DEFAULT_TVM_REQUEST_TIMEOUT = 300.0
DEFAULT_TVM_CALL_TIMEOUT = 120.0
DEFAULT_TVM_CACHE_BYTES = 10 * 1024**3
TVM_POLL_SECONDS = 2.0
TVM_MAX_RECONNECTS = 3
TVM_RECONNECT_BACKOFF = 1.0  # seconds before the first reconnect; doubles, at most 10 s


def hostport(addr: tuple[str, int]) -> str:
    """``HOST:PORT`` (IPv6 hosts in brackets)."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class TvmSettings:
    """The agent's TVM configuration (the ``--tvm-*`` flags, see ``tuneqn.agent.backends.tvm``)."""

    target: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_TVM_TARGET))
    host: dict[str, Any] | None = None  # host target when cross-compiling
    compiler: str = ""  # export_library compiler command ("" = TVM's default)
    tracker: tuple[str, int] | None = None
    key: str = ""  # device key at the tracker (or the key a direct RPC server expects)
    priority: int = DEFAULT_TVM_PRIORITY
    session_timeout: float = DEFAULT_TVM_SESSION_TIMEOUT
    request_timeout: float = DEFAULT_TVM_REQUEST_TIMEOUT
    rpc: tuple[tuple[str, int], ...] = ()  # direct RPC servers, one device each
    call_timeout: float = DEFAULT_TVM_CALL_TIMEOUT
    cache_bytes: int = DEFAULT_TVM_CACHE_BYTES
    poll_seconds: float = TVM_POLL_SECONDS
    max_reconnects: int = TVM_MAX_RECONNECTS
    reconnect_backoff: float = TVM_RECONNECT_BACKOFF

    @property
    def mode(self) -> str:
        """``"tracker"``, ``"rpc"`` or ``"local"``."""
        if self.tracker is not None:
            return "tracker"
        return "rpc" if self.rpc else "local"
