"""``python -m tuneqn.agent.probe [HOST:PORT]``: is an agent serving? (a container HEALTHCHECK)

Asks the agent's standard gRPC health service about ``tuneqn.v1.Agent``. Exit 0 when it
answers SERVING; 1 otherwise, with one line on stderr saying why (not serving, refused,
TLS failure, timeout); 2 for bad arguments or unreadable TLS files.

Without an address it probes the agent of this host: its plaintext loopback health listener
when ``TUNEQN_AGENT_HEALTH_LISTEN`` is set (``tuneqn-agent --health-listen``; no TLS, no key:
the TLS settings below are not used), else the agent's address as configured by
``TUNEQN_AGENT_LISTEN`` (``localhost`` for a wildcard host; port 50051 by default). TLS
files default to ``TUNEQN_PROBE_TLS_CA`` / ``_CERT`` / ``_KEY``: ``--tls-ca`` verifies the
agent's certificate (the address's host must be one of its names), ``--tls-cert`` and
``--tls-key`` are the client certificate an mTLS agent asks for (one its CA signed for
client use, such as the controller's). Health checks need no bearer token.
This module imports neither the controller nor the agent's runtime (only the argument
helpers of :mod:`tuneqn.agent.cli`).
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tuneqn.agent.cli import OneLineParser, UsageError, env_option, parse_listen, read_user_file

__all__ = ["default_address", "default_target", "main", "probe"]

PROG = "python -m tuneqn.agent.probe"
SERVICE = "tuneqn.v1.Agent"
DEFAULT_PORT = 50051
DEFAULT_TIMEOUT = 5.0
_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def default_address(listen: str | None = None) -> str:
    """``HOST:PORT`` to probe for an agent listening on ``listen`` (``TUNEQN_AGENT_LISTEN``)."""
    text = (listen if listen is not None else os.environ.get("TUNEQN_AGENT_LISTEN", "")).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return f"localhost:{DEFAULT_PORT}"
    return f"{'localhost' if host in _WILDCARD_HOSTS else host}:{port}"


def default_target() -> tuple[str, bool]:
    """``HOST:PORT`` to probe without an address, and whether it is the plaintext health listener
    (``TUNEQN_AGENT_HEALTH_LISTEN``, preferred) rather than the agent's own port."""
    health = os.environ.get("TUNEQN_AGENT_HEALTH_LISTEN", "").strip()
    if health:
        return default_address(health), True
    return default_address(), False


def probe(
    address: str,
    tls_ca: bytes | None = None,
    tls_cert: bytes | None = None,
    tls_key: bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> str | None:
    """None when the agent at ``address`` serves; otherwise why not, in one line."""
    if tls_ca is not None or tls_cert is not None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=tls_ca, private_key=tls_key, certificate_chain=tls_cert
        )
        channel = grpc.secure_channel(address, credentials)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout, wait_for_ready=False)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = (exc.details() if hasattr(exc, "details") else "") or str(exc)
            first = details.strip().splitlines()[0] if details.strip() else ""
            return f"{address}: {code.name if code else 'error'}: {first}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{address}: {SERVICE} is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Probe once; the exit code (0 serving, 1 not, 2 bad arguments)."""
    p = OneLineParser(prog=PROG, description="Exit 0 if the tuneqn agent at HOST:PORT is serving, 1 if not.")
    p.add_argument(
        "address",
        nargs="?",
        default=None,
        metavar="HOST:PORT",
        help="the agent (default: its loopback health listener TUNEQN_AGENT_HEALTH_LISTEN, "
        "plaintext; else TUNEQN_AGENT_LISTEN, localhost for 0.0.0.0)",
    )
    env_option(p, "--tls-ca", "TUNEQN_PROBE_TLS_CA", "CA that signed the agent's certificate; enables TLS", metavar="F")
    env_option(p, "--tls-cert", "TUNEQN_PROBE_TLS_CERT", "client certificate for an mTLS agent", metavar="F")
    env_option(p, "--tls-key", "TUNEQN_PROBE_TLS_KEY", "client key for an mTLS agent", metavar="F")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for the answer (default {DEFAULT_TIMEOUT:g})",
    )
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    try:
        if bool(args.tls_cert) != bool(args.tls_key):
            raise UsageError("--tls-cert and --tls-key must be given together")
        if args.tls_cert and not args.tls_ca:
            raise UsageError("--tls-cert needs --tls-ca (the CA that signed the agent's certificate)")
        if not args.timeout > 0:
            raise UsageError(f"--timeout must be > 0, got {args.timeout:g}")
        address, plaintext = (args.address, False) if args.address else default_target()
        parse_listen(address, "address")
        ca = read_user_file(args.tls_ca, "TLS CA") if args.tls_ca and not plaintext else None
        cert = read_user_file(args.tls_cert, "TLS certificate") if args.tls_cert and not plaintext else None
        key = read_user_file(args.tls_key, "TLS key") if args.tls_key and not plaintext else None
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    problem = probe(address, ca, cert, key, args.timeout)
    if problem is not None:
        print(f"{PROG}: not serving: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
