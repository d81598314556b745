"""``tuneqn-agent``: the daemon that runs evaluation jobs next to a device.

Every flag has an environment variable (``TUNEQN_AGENT_<FLAG>``) that provides its
default. On start the agent prints exactly one line to stdout,
``tuneqn-agent listening on HOST:PORT`` (the actual port, also with ``:0``); logs go
to stderr. SIGTERM/SIGINT stop it gracefully: no new job starts (submissions get
UNAVAILABLE), a running job gets ``--drain-seconds`` to finish (its result is stored),
and one still running then is interrupted and stays queued for the next start; stored
results are kept. A second SIGTERM/SIGINT during the drain interrupts running jobs at
once (they stay queued the same way) and the agent exits as after a normal stop. With
``--stop-on-stdin-eof`` the end of stdin does the same, so a
parent that starts the agent with a stdin pipe never leaves it behind, even when the
parent is SIGKILLed. ``--metrics-listen HOST:PORT`` serves Prometheus metrics
(:mod:`tuneqn.agent.metrics`) at ``/metrics``; off loopback only with ``--metrics-public``.
``--health-listen 127.0.0.1:PORT`` serves the standard gRPC health service alone, plaintext,
on loopback (a container's HEALTHCHECK needs no client key then; see :mod:`tuneqn.agent.probe`).

Security: on a loopback address anything goes. Off loopback the agent needs a bearer
token over TLS (``--token-file`` + ``--tls-cert/--tls-key``) or mutual TLS (``--tls-ca``);
it refuses to start (exit 2) with neither, with a token but no TLS, or with TLS but
neither token nor client CA, unless ``--insecure`` is given (then it warns).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import tuneqn
from tuneqn.agent.backends import BACKENDS, RUNTIME_MODULES
from tuneqn.agent.config import (
    DEFAULT_TVM_CALL_TIMEOUT,
    DEFAULT_TVM_PRIORITY,
    DEFAULT_TVM_REQUEST_TIMEOUT,
    DEFAULT_TVM_SESSION_TIMEOUT,
    AgentConfig,
    TvmSettings,
    is_loopback,
    listen_problem,
    security_problem,
)

__all__ = [
    "OneLineParser",
    "UsageError",
    "build_parser",
    "env_option",
    "is_loopback",
    "main",
    "parse_listen",
    "parse_size",
    "read_user_file",
]

log = logging.getLogger(__name__)

PROG = "tuneqn-agent"
DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DRAIN_SECONDS = 30.0
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class UsageError(Exception):
    """Bad command-line input; reported as one line on stderr with exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line and exit code 2 (the agent's commands)."""

    def error(self, message: str) -> NoReturn:
        """Report a usage error in one line (no usage dump) and exit 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_size(text: str) -> int:
    """Parse a byte size such as ``2147483648``, ``512MiB``, ``2G`` or ``1.5GiB``."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a byte size (like 2GiB or 1048576): {text!r}")
    number, unit = m.group(1), (m.group(2) or "").lower()
    prefix = unit[:1] if unit[:1] in "kmgt" else ""
    factor = _SIZE_UNITS[prefix]
    if prefix and "i" in unit:
        factor = 1024 ** ("kmgt".index(prefix) + 1)
    value = int(float(number) * factor)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"byte size must be positive: {text!r}")
    return value


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/tuneqn-agent`` or ``~/.local/state/tuneqn-agent``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tuneqn-agent"


def env_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str,
    env: str,
    help: str,  # noqa: A002 - argparse's name
    *,
    default: str | None = None,
    **kwargs: Any,
) -> None:
    """Add ``flag`` with its default from the environment variable ``env`` (else ``default``).

    ``help`` gains ``(env NAME, default D)``; a ``store_true`` flag is on when ``env`` is 1/true/yes/on.
    """
    if kwargs.get("action") == "store_true":
        parser.add_argument(flag, default=_env_flag(env), help=f"{help} (env {env}=1)", **kwargs)
        return
    shown = f", default {default}" if default is not None else ""
    parser.add_argument(flag, default=os.environ.get(env, default), help=f"{help} (env {env}{shown})", **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; defaults come from ``TUNEQN_AGENT_*`` environment variables."""
    p = OneLineParser(
        prog=PROG,
        description="Run tuneqn evaluation jobs for the devices attached to this host.",
        epilog="Security: off loopback the agent needs a bearer token over TLS (--token-file "
        "with --tls-cert/--tls-key) or mutual TLS (--tls-ca, with or without a token); "
        "anything else is refused unless --insecure.",
    )
    opt = functools.partial(env_option, p)
    opt(
        "--listen",
        "TUNEQN_AGENT_LISTEN",
        "address to bind; port 0 picks a free port",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
    )
    opt("--token-file", "TUNEQN_AGENT_TOKEN_FILE", "file holding the bearer token clients must send", metavar="F")
    opt("--backend", "TUNEQN_AGENT_BACKEND", "execution backend: " + ", ".join(BACKENDS), default="ort")
    opt("--device-name", "TUNEQN_AGENT_DEVICE_NAME", "device name; the hostname unless given", metavar="NAME")
    opt("--device-class", "TUNEQN_AGENT_DEVICE_CLASS", "device class; the device name unless given", metavar="NAME")
    opt(
        "--state-dir",
        "TUNEQN_AGENT_STATE_DIR",
        "state directory; $XDG_STATE_HOME/tuneqn-agent or ~/.local/state/tuneqn-agent unless given",
        metavar="DIR",
    )
    opt("--tls-cert", "TUNEQN_AGENT_TLS_CERT", "server certificate chain, PEM", metavar="F")
    opt("--tls-key", "TUNEQN_AGENT_TLS_KEY", "server private key, PEM", metavar="F")
    opt("--tls-ca", "TUNEQN_AGENT_TLS_CA", "CA that client certificates must chain to; enables mTLS", metavar="F")
    opt(
        "--insecure",
        "TUNEQN_AGENT_INSECURE",
        "allow a non-loopback bind without a token over TLS or mTLS; off loopback the agent otherwise needs "
        "--token-file with --tls-cert/--tls-key, or --tls-ca",
        action="store_true",
    )
    opt(
        "--stop-on-stdin-eof",
        "TUNEQN_AGENT_STOP_ON_STDIN_EOF",
        "stop gracefully (like SIGTERM) when stdin reaches end of file, e.g. when the process that started "
        "the agent with a stdin pipe dies",
        action="store_true",
    )
    opt(
        "--quiet-lock",
        "TUNEQN_AGENT_QUIET_LOCK",
        "hold an exclusive flock on FILE (created if missing) while timing latency, so that co-located "
        "tuneqn work holding shared locks pauses (protocol in tuneqn.agent.quiet)",
        metavar="FILE",
    )
    opt(
        "--max-blob-bytes",
        "TUNEQN_AGENT_MAX_BLOB_BYTES",
        "largest blob accepted",
        default="2GiB",
        type=parse_size,
        metavar="N",
    )
    opt(
        "--blob-cache-bytes",
        "TUNEQN_AGENT_BLOB_CACHE_BYTES",
        "blob cache size before LRU eviction",
        default="20GiB",
        type=parse_size,
        metavar="N",
    )
    opt(
        "--simulated-latency-ms",
        "TUNEQN_AGENT_SIMULATED_LATENCY_MS",
        "sleep X ms per predicted sample to emulate a slow device; reported as simulated",
        default="0",
        type=float,
        metavar="X",
    )
    opt("--log-level", "TUNEQN_AGENT_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR", default="INFO", metavar="LEVEL")
    opt(
        "--drain-seconds",
        "TUNEQN_AGENT_DRAIN_SECONDS",
        "on SIGTERM/SIGINT a running job gets S seconds to finish before it is interrupted and kept queued; "
        "0 = interrupt at once; keep a service manager's stop timeout above it",
        default=f"{DEFAULT_DRAIN_SECONDS:g}",
        type=float,
        metavar="S",
    )
    opt(
        "--metrics-listen",
        "TUNEQN_AGENT_METRICS_LISTEN",
        "serve Prometheus metrics at http://HOST:PORT/metrics (jobs by state and device, queue lengths, "
        "cache bytes, job durations); off unless given; off loopback only with --metrics-public",
        metavar="HOST:PORT",
    )
    opt(
        "--metrics-public",
        "TUNEQN_AGENT_METRICS_PUBLIC",
        "allow --metrics-listen off loopback; the endpoint has no authentication, so keep it behind a firewall",
        action="store_true",
    )
    opt(
        "--health-listen",
        "TUNEQN_AGENT_HEALTH_LISTEN",
        "also serve the standard gRPC health service (and nothing else) in plaintext on this loopback "
        "address, for local health checks that hold no client key (python -m tuneqn.agent.probe uses it); "
        "off unless given",
        metavar="HOST:PORT",
    )
    _add_tvm_arguments(p)
    p.add_argument("--version", action="version", version=f"%(prog)s {tuneqn.__version__}")
    return p


def _add_tvm_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--tvm-*`` flags of ``--backend tvm``."""
    g = p.add_argument_group(
        "TVM backend (--backend tvm, needs the tuneqn[tvm] extra)",
        "Without --tvm-tracker or --tvm-rpc the models run on this host's CPU/GPU.",
    )
    opt = functools.partial(env_option, g)
    opt(
        "--tvm-target",
        "TUNEQN_AGENT_TVM_TARGET",
        'TVM target as a JSON dict, e.g. \'{"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon"]}\'',
        default='{"kind": "llvm"}',
        metavar="JSON",
    )
    opt(
        "--tvm-host",
        "TUNEQN_AGENT_TVM_HOST",
        'host target for cross-compilation, a JSON dict; may also be the target\'s "host"',
        metavar="JSON",
    )
    opt(
        "--tvm-cc",
        "TUNEQN_AGENT_TVM_CC",
        "compiler command export_library links with, e.g. the NDK's aarch64-linux-android33-clang++; "
        "TVM's unless given",
        metavar="CMD",
    )
    opt(
        "--tvm-tracker",
        "TUNEQN_AGENT_TVM_TRACKER",
        "reach the devices through this TVM RPC tracker",
        metavar="HOST:PORT",
    )
    opt(
        "--tvm-key",
        "TUNEQN_AGENT_TVM_KEY",
        "device key at the tracker, required with --tvm-tracker; with --tvm-rpc the key the servers were "
        "started with, if any",
        metavar="KEY",
    )
    opt(
        "--tvm-priority",
        "TUNEQN_AGENT_TVM_PRIORITY",
        "tracker request priority",
        default=str(DEFAULT_TVM_PRIORITY),
        type=int,
        metavar="N",
    )
    for flag, env, text, value in (
        (
            "--tvm-session-timeout",
            "SESSION_TIMEOUT",
            "remote session timeout the server enforces, 0 = none",
            DEFAULT_TVM_SESSION_TIMEOUT,
        ),
        (
            "--tvm-request-timeout",
            "REQUEST_TIMEOUT",
            "how long a job waits for a free device of the key; shown in the device status",
            DEFAULT_TVM_REQUEST_TIMEOUT,
        ),
        (
            "--tvm-call-timeout",
            "CALL_TIMEOUT",
            "a remote call (a chunk, a latency measurement) taking longer means a hung server",
            DEFAULT_TVM_CALL_TIMEOUT,
        ),
    ):
        opt(flag, f"TUNEQN_AGENT_TVM_{env}", text, default=f"{value:g}", type=float, metavar="S")
    g.add_argument(
        "--tvm-rpc",
        action="append",
        metavar="HOST:PORT",
        default=None,
        help="a direct TVM RPC server instead of a tracker; repeat for more devices "
        "(env TUNEQN_AGENT_TVM_RPC, comma-separated)",
    )
    opt(
        "--tvm-cache-bytes",
        "TUNEQN_AGENT_TVM_CACHE_BYTES",
        "compiled-library cache size before LRU eviction",
        default="10GiB",
        type=parse_size,
        metavar="N",
    )


def parse_listen(text: str, flag: str = "--listen") -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6) into host and port."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise UsageError(f"{flag} must be HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if port > 65535:
        raise UsageError(f"{flag} port out of range: {port}")
    return host, port


def read_user_file(path: str, what: str) -> bytes:
    """The bytes of a file the user named, else a one-line :class:`UsageError` naming ``what``."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _read_pem_certificates(path: str, flag: str) -> bytes:
    """The bytes of ``path``, checked to hold PEM certificates (else one line naming ``flag``, exit 2)."""
    from cryptography import x509  # noqa: PLC0415 - only with TLS

    data = read_user_file(path, flag)
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise UsageError(f"{flag}: {path} is not a PEM certificate") from None
    return data


def _read_tls_pair(cert_path: str, key_path: str) -> tuple[bytes, bytes]:
    """``--tls-cert``/``--tls-key``: a PEM certificate and the unencrypted PEM private key of its public key."""
    from cryptography import x509  # noqa: PLC0415 - only with TLS
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    cert = _read_pem_certificates(cert_path, "--tls-cert")
    key = read_user_file(key_path, "--tls-key")
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        raise UsageError(f"--tls-key: {key_path} is not an unencrypted PEM private key") from None

    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    if x509.load_pem_x509_certificates(cert)[0].public_key().public_bytes(
        serialization.Encoding.PEM, raw
    ) != private.public_key().public_bytes(serialization.Encoding.PEM, raw):
        raise UsageError(f"--tls-key: {key_path} is not the key of the certificate {cert_path} (--tls-cert)")
    return cert, key


def _on_signal(stop: threading.Event, received: list[int]) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)  # no logging here: the handler may interrupt a log call
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _stop_on_stdin_eof(stop: threading.Event, eof: threading.Event) -> None:
    """Set ``stop`` (and ``eof``) once stdin reaches end of file; its data is discarded."""

    def watch() -> None:
        try:
            while os.read(0, 65536):
                pass
        except OSError as exc:  # a closed or unreadable stdin counts as its end
            log.debug("stdin unreadable: %s", exc)
        eof.set()
        stop.set()

    threading.Thread(target=watch, name="tuneqn-stdin-eof", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits for --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    try:
        config, device_name, device_class = _validate(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    problem = security_problem(
        config.host,
        token=config.token is not None,
        tls=config.tls_cert is not None,
        client_ca=config.tls_ca is not None,
    )
    if problem is not None:
        log.warning("--insecure: listening on non-loopback %s %s", args.listen, problem)
    # Imported here so that argument errors are reported without loading a runtime.
    from tuneqn.agent.backends import create_backends
    from tuneqn.agent.quiet import QuietLock
    from tuneqn.agent.server import AgentServer, MetricsBindError
    from tuneqn.agent.state import StateDirInUse

    if config.quiet_lock is not None:
        try:
            QuietLock(config.quiet_lock)
        except OSError as exc:
            print(f"{PROG}: error: cannot use --quiet-lock {config.quiet_lock}: {exc.strerror or exc}", file=sys.stderr)
            return 2

    if args.backend == "tvm":
        try:
            settings = _tvm_settings(args)
        except UsageError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
        backends = create_backends(
            "tvm",
            device_name=device_name,
            device_class=device_class,
            settings=settings,
            state_dir=config.state_dir,
        )
    else:
        backends = create_backends(
            args.backend,
            device_name=device_name,
            device_class=device_class,
            simulated_latency_ms_per_sample=args.simulated_latency_ms,
        )
    try:
        server = AgentServer(config, backends)
    except StateDirInUse as exc:
        _close(backends)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, sqlite3.Error) as exc:
        _close(backends)
        print(f"{PROG}: error: cannot use state dir {config.state_dir}: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    eof = threading.Event()
    received: list[int] = []
    _on_signal(stop, received)
    if args.stop_on_stdin_eof:
        _stop_on_stdin_eof(stop, eof)
    try:
        server.start()
    except MetricsBindError as exc:
        server.stop(grace=0)
        print(f"{PROG}: error: cannot serve {exc.what}: {exc.flag} {exc.address}: {exc.reason}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"{PROG}: error: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 1
    print(f"{PROG} listening on {server.address}", flush=True)
    while not stop.wait(1.0):
        pass
    if received:
        log.info("received %s, stopping", signal.Signals(received[0]).name)
    else:
        log.info("stdin reached end of file, stopping" if eof.is_set() else "stopping")
    _stop_server(server, received)
    return 0


def _stop_server(server: Any, received: list[int]) -> None:
    """Stop ``server`` (drain included) in a thread; a second SIGTERM/SIGINT cuts the drain.

    The signal handler only appends to ``received`` (no locks in a handler); the calling
    (main) thread polls it while the stop runs and calls ``server.cut_drain()`` once two
    signals came. The end of stdin does not count: a parent that closes the pipe and then
    sends SIGTERM asks only once.
    """
    stopper = threading.Thread(target=server.stop, name="tuneqn-stop")
    stopper.start()
    cut = False
    while stopper.is_alive():
        stopper.join(0.2)
        if not cut and len(received) >= 2:
            cut = True
            log.warning(
                "received %s again: cutting the drain short, running jobs are interrupted "
                "now and stay queued for the next start",
                signal.Signals(received[1]).name,
            )
            server.cut_drain()


def _close(backends: list[Any]) -> None:
    for backend in backends:
        backend.close()


def parse_hostport(text: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` of a ``--tvm-*`` flag (``[v6]:PORT`` for IPv6); UsageError otherwise."""
    host, sep, port_text = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise UsageError(f"{flag} must be HOST:PORT with a port in 1-65535, got {text!r}")
    return host, int(port_text)


def _json_target(text: str, flag: str) -> dict[str, Any]:
    """A target JSON dict with a string "kind"; UsageError otherwise."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{flag} is not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict) or not isinstance(value.get("kind"), str):
        raise UsageError(f'{flag} must be a JSON object with a "kind", e.g. {{"kind": "llvm"}}; got {text!r}')
    return value


def _tvm_rpc_list(args: argparse.Namespace) -> list[str]:
    if args.tvm_rpc is not None:
        return list(args.tvm_rpc)
    env = os.environ.get("TUNEQN_AGENT_TVM_RPC", "")
    return [part for part in env.replace(" ", ",").split(",") if part]


def _validate_tvm(args: argparse.Namespace) -> None:
    """Cheap checks of the --tvm-* flags (before TVM is imported)."""
    rpcs = _tvm_rpc_list(args)
    if args.backend != "tvm":
        given = [
            flag
            for flag, value in (
                ("--tvm-tracker", args.tvm_tracker),
                ("--tvm-rpc", rpcs),
                ("--tvm-key", args.tvm_key),
                ("--tvm-cc", args.tvm_cc),
                ("--tvm-host", args.tvm_host),
            )
            if value
        ]
        if given:
            raise UsageError(f"{', '.join(given)}: only for --backend tvm (the backend is {args.backend!r})")
        return
    if args.simulated_latency_ms:
        raise UsageError("--simulated-latency-ms is for the ort backend only")
    target = _json_target(args.tvm_target, "--tvm-target")
    if args.tvm_host:
        _json_target(args.tvm_host, "--tvm-host")
        if "host" in target:
            raise UsageError('give the host target either in --tvm-target ("host") or as --tvm-host, not both')
    if args.tvm_tracker:
        parse_hostport(args.tvm_tracker, "--tvm-tracker")
        if rpcs:
            raise UsageError("--tvm-tracker and --tvm-rpc exclude each other (a tracker or direct servers)")
        if not args.tvm_key:
            raise UsageError("--tvm-tracker needs --tvm-key (the key the devices registered under)")
    for text in rpcs:
        parse_hostport(text, "--tvm-rpc")
    if len(set(rpcs)) != len(rpcs):
        raise UsageError("--tvm-rpc names a server twice")
    if args.tvm_cc and not shlex.split(args.tvm_cc):
        raise UsageError("--tvm-cc is empty")
    for flag, value, allow_zero in (
        ("--tvm-session-timeout", args.tvm_session_timeout, True),
        ("--tvm-request-timeout", args.tvm_request_timeout, False),
        ("--tvm-call-timeout", args.tvm_call_timeout, False),
    ):
        if value < 0 or (value == 0 and not allow_zero):
            raise UsageError(f"{flag} must be {'>= 0' if allow_zero else '> 0'} seconds, got {value:g}")


def _tvm_settings(args: argparse.Namespace) -> TvmSettings:
    """The TVM settings of validated arguments; checks TVM itself (needs it importable)."""
    target = _json_target(args.tvm_target, "--tvm-target")
    host = _json_target(args.tvm_host, "--tvm-host") if args.tvm_host else None
    try:
        import tvm
    except ImportError as exc:  # checked in _validate already; kept for callers of this function
        raise UsageError(f"--backend tvm needs Apache TVM (pip install 'tuneqn[tvm]'): {exc}") from None
    try:
        tvm.target.Target(dict(target), host=dict(host)) if host else tvm.target.Target(dict(target))
    except (ValueError, RuntimeError, TypeError) as exc:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        raise UsageError(f"--tvm-target: TVM rejects it: {lines[-1] if lines else exc}") from None
    if args.tvm_cc:
        compiler = shlex.split(args.tvm_cc)[0]
        if shutil.which(compiler) is None:
            raise UsageError(f"--tvm-cc: compiler {compiler!r} not found")
    tracker = parse_hostport(args.tvm_tracker, "--tvm-tracker") if args.tvm_tracker else None
    return TvmSettings(
        target=target,
        host=host,
        compiler=args.tvm_cc or "",
        tracker=tracker,
        key=args.tvm_key or "",
        priority=args.tvm_priority,
        session_timeout=args.tvm_session_timeout,
        request_timeout=args.tvm_request_timeout,
        rpc=tuple(parse_hostport(t, "--tvm-rpc") for t in _tvm_rpc_list(args)),
        call_timeout=args.tvm_call_timeout,
        cache_bytes=args.tvm_cache_bytes,
    )


def _runtime_missing(backend: str) -> str | None:
    """Why the backend's runtime cannot be imported (None: it can)."""
    module = RUNTIME_MODULES.get(backend)
    if module is None:
        return None
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return str(exc) or f"No module named {module!r}"
    return None


def _validate(args: argparse.Namespace) -> tuple[AgentConfig, str, str]:
    """Check the arguments; returns the server configuration, device name and class."""
    host, port = parse_listen(args.listen)
    if args.backend not in BACKENDS:
        raise UsageError(f"unknown backend {args.backend!r} (available: {', '.join(BACKENDS)})")
    if args.log_level.upper() not in _LOG_LEVELS:
        raise UsageError(f"unknown log level {args.log_level!r} (use {', '.join(_LOG_LEVELS)})")
    if args.simulated_latency_ms < 0:
        raise UsageError("--simulated-latency-ms must be >= 0")
    if not args.drain_seconds >= 0 or args.drain_seconds == float("inf"):  # also NaN
        raise UsageError(f"--drain-seconds must be a finite number >= 0, got {args.drain_seconds:g}")
    metrics_host, metrics_port = (
        parse_listen(args.metrics_listen, "--metrics-listen") if args.metrics_listen else (None, 0)
    )
    health_host, health_port = parse_listen(args.health_listen, "--health-listen") if args.health_listen else (None, 0)
    problem = listen_problem(health_host, health_port, metrics_host, metrics_port, args.metrics_public)
    if problem is not None:
        raise UsageError(problem)
    _validate_tvm(args)
    token = None
    if args.token_file:
        token = read_user_file(args.token_file, "token file").decode("utf-8", "replace").strip()
        if not token:
            raise UsageError(f"token file {args.token_file} is empty")
        if any(c.isspace() for c in token):
            raise UsageError(f"token in {args.token_file} contains whitespace")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key must be given together")
    if args.tls_ca and not args.tls_cert:
        raise UsageError("--tls-ca (client certificates) needs --tls-cert and --tls-key")
    tls_cert = tls_key = tls_ca = None
    if args.tls_cert:
        tls_cert, tls_key = _read_tls_pair(args.tls_cert, args.tls_key)
    tls_ca = _read_pem_certificates(args.tls_ca, "--tls-ca") if args.tls_ca else None
    problem = security_problem(host, token is not None, tls_cert is not None, tls_ca is not None)
    if problem is not None and not args.insecure:
        raise UsageError(
            f"refusing to listen on non-loopback {args.listen} {problem}; off loopback use a "
            "token over TLS or mTLS (--insecure to allow anyway)"
        )
    quiet_lock = None
    if args.quiet_lock:
        quiet_lock = Path(args.quiet_lock).expanduser()
        if not quiet_lock.parent.is_dir():
            raise UsageError(f"--quiet-lock {args.quiet_lock}: folder {quiet_lock.parent} does not exist")
        if quiet_lock.is_dir():
            raise UsageError(f"--quiet-lock {args.quiet_lock} is a folder, not a file")
    if args.backend == "tvm":  # last: importing TVM takes seconds
        missing = _runtime_missing("tvm")
        if missing is not None:
            raise UsageError(f"--backend tvm needs Apache TVM (pip install 'tuneqn[tvm]'): {missing}")
    device_name = args.device_name or socket.gethostname()
    state_dir = Path(args.state_dir).expanduser() if args.state_dir else default_state_dir()
    config = AgentConfig(
        state_dir=state_dir,
        host=host,
        port=port,
        token=token,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
        max_blob_bytes=args.max_blob_bytes,
        blob_cache_bytes=args.blob_cache_bytes,
        insecure=args.insecure,
        quiet_lock=quiet_lock,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        metrics_public=args.metrics_public,
        health_host=health_host,
        health_port=health_port,
        drain_seconds=args.drain_seconds,
    )
    return config, device_name, args.device_class or device_name


if __name__ == "__main__":
    sys.exit(main())
