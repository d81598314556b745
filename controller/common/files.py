"""The controller's two file helpers: atomic writes and content hashes."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from tuneqn.controller.common.errors import UserError


def _file_mode() -> int:
    """Mode a plain ``open()`` would give a new file (0o666 minus the umask), read without changing it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o644


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync and ``os.replace``.

    Readers see the old file or the new one, never a half-written one. ``mode`` (default: the
    usual permissions under the umask) is set before any byte is written (keys: 0o600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), _file_mode() if mode is None else mode)  # mkstemp creates 0o600
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def file_digest(path: Path) -> tuple[str, int]:
    """(hex sha256, size in bytes) of a file."""
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    return digest, os.path.getsize(path)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return file_digest(path)[0]


def read_user_file(path: Path, kind: str, expected: str, what: str | None = None) -> bytes:
    """The bytes of a file the user named; a missing file, a folder or an unreadable file is a one-line
    :class:`UserError` naming ``what`` (the flag or config key, e.g. ``--lab``), the ``kind`` of file and the path."""
    prefix = f"{what}: " if what else ""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{prefix}{kind} not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{prefix}{path} is a folder, expected {expected}") from None
    except OSError as exc:
        raise UserError(f"{prefix}cannot read {path} ({exc.strerror or exc.__class__.__name__})") from None
