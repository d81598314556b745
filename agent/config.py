"""Configuration of an agent server (kept free of heavy imports for the CLI)."""

from __future__ import annotations

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
