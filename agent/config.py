"""Configuration of an agent server (kept free of heavy imports for the CLI)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

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


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
        return (
            "with a token but without TLS (the token would travel in clear text; "
            "add --tls-cert/--tls-key)"
        )
    return "with TLS but neither a token nor client certificates (add --token-file or --tls-ca)"
