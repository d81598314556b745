"""Content-addressed blob cache of the agent: ``<state dir>/blobs/<sha256>``.

Uploads are written to a temporary file, verified (size and sha256) and only then
renamed into place, so a blob file that exists is always complete and correct. The
cache is bounded by ``cache_bytes`` with least-recently-used eviction; blobs pinned
by queued or running jobs are never evicted. A blob whose file disappeared behind the
cache's back (deleted by hand, a cleaned disk) counts as absent from then on, so a
client uploads it again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class BlobError(Exception):
    """Base class of blob upload errors."""


class InvalidBlob(BlobError, ValueError):
    """The upload is malformed or its bytes do not match the announced size/sha256."""


class BlobTooLarge(BlobError):
    """The announced size exceeds the agent's per-blob cap."""


def check_sha256(sha256: str) -> str:
    """Return ``sha256`` if it is 64 lowercase hex digits, else raise :class:`InvalidBlob`."""
    if not _SHA256_RE.match(sha256):
        raise InvalidBlob(f"not a lowercase hex sha256: {sha256[:80]!r}")
    return sha256


class BlobUpload:
    """One in-progress upload; use :meth:`write`, then :meth:`commit` (or :meth:`abort`)."""

    def __init__(self, store: BlobStore, sha256: str, total_size: int) -> None:
        self._store = store
        self.sha256 = sha256
        self.total_size = total_size
        self._received = 0
        self._hash = hashlib.sha256()
        fd, name = tempfile.mkstemp(prefix=f"{sha256[:16]}-", suffix=".part", dir=store.tmp_dir)
        self._tmp_path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._done = False

    def write(self, data: bytes) -> None:
        """Append ``data``; raises :class:`InvalidBlob` past the announced size."""
        if not data:
            return
        self._received += len(data)
        if self._received > self.total_size:
            raise InvalidBlob(f"blob {self.sha256}: received more than the announced {self.total_size} bytes")
        self._hash.update(data)
        self._file.write(data)

    def commit(self) -> Path:
        """Verify size and hash, then atomically move the blob into the cache."""
        self._file.close()
        if self._received != self.total_size:
            raise InvalidBlob(f"blob {self.sha256}: received {self._received} bytes, announced {self.total_size}")
        actual = self._hash.hexdigest()
        if actual != self.sha256:
            raise InvalidBlob(f"blob sha256 mismatch: announced {self.sha256}, received {actual}")
        path = self._store._install(self._tmp_path, self.sha256, self.total_size)
        self._done = True
        return path

    def abort(self) -> None:
        """Drop the temporary file (no-op after a successful commit)."""
        if self._done:
            return
        self._done = True
        self._file.close()
        self._tmp_path.unlink(missing_ok=True)


class BlobStore:
    """The on-disk blob cache with LRU eviction and pinning."""

    def __init__(self, root: Path, cache_bytes: int, max_blob_bytes: int) -> None:
        if cache_bytes <= 0 or max_blob_bytes <= 0:
            raise ValueError("cache_bytes and max_blob_bytes must be positive")
        self.root = Path(root)
        self.tmp_dir = self.root / ".tmp"
        self.cache_bytes = cache_bytes
        self.max_blob_bytes = max_blob_bytes
        self._lock = threading.Lock()
        self._pins: Counter[str] = Counter()
        self._lru: OrderedDict[str, int] = OrderedDict()  # sha256 -> size, oldest first
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(exist_ok=True)
        for stale in self.tmp_dir.iterdir():  # partial uploads of a previous run
            stale.unlink(missing_ok=True)
        entries = []
        for path in self.root.iterdir():
            if path.is_file() and _SHA256_RE.match(path.name):
                st = path.stat()
                entries.append((st.st_mtime, path.name, st.st_size))
        for _, name, size in sorted(entries):
            self._lru[name] = size

    def path(self, sha256: str) -> Path:
        """Where the blob ``sha256`` lives (whether or not it is present)."""
        return self.root / check_sha256(sha256)

    def has(self, sha256: str) -> bool:
        """Whether the blob is in the cache (and its file still exists)."""
        check_sha256(sha256)
        with self._lock:
            return self._present_locked(sha256)

    def size(self, sha256: str) -> int | None:
        """Size of a present blob, else None."""
        with self._lock:
            return self._lru[sha256] if self._present_locked(sha256) else None

    def forget(self, sha256: str) -> None:
        """Drop a blob whose file is gone from the cache's books."""
        with self._lock:
            if self._lru.pop(sha256, None) is not None:
                log.warning("blob %s vanished from the cache directory", sha256)

    def _present_locked(self, sha256: str) -> bool:
        if sha256 not in self._lru:
            return False
        if (self.root / sha256).is_file():
            return True
        del self._lru[sha256]
        log.warning("blob %s vanished from the cache directory", sha256)
        return False

    @property
    def total_bytes(self) -> int:
        """Bytes currently held by the cache."""
        with self._lock:
            return sum(self._lru.values())

    @property
    def count(self) -> int:
        """Blobs currently held by the cache."""
        with self._lock:
            return len(self._lru)

    def begin_upload(self, sha256: str, total_size: int) -> BlobUpload:
        """Start an upload after checking the address format and the size cap."""
        check_sha256(sha256)
        if total_size > self.max_blob_bytes:
            raise BlobTooLarge(f"blob of {total_size} bytes exceeds the agent's cap of {self.max_blob_bytes} bytes")
        return BlobUpload(self, sha256, total_size)

    def pin_if_present(self, shas: Iterable[str]) -> list[str]:
        """Pin all of ``shas`` if they are all present; else pin nothing and return the missing."""
        shas = list(shas)
        with self._lock:
            missing = [s for s in shas if not self._present_locked(s)]
            if not missing:
                self._pins.update(shas)
                for s in shas:
                    self._touch_locked(s)
            return missing

    def pin(self, shas: Iterable[str]) -> None:
        """Pin blobs (present or not) so they are not evicted."""
        with self._lock:
            self._pins.update(shas)

    def unpin(self, shas: Iterable[str]) -> None:
        """Release pins taken by :meth:`pin` / :meth:`pin_if_present`."""
        with self._lock:
            self._pins.subtract(shas)
            for s in [s for s, n in self._pins.items() if n <= 0]:
                del self._pins[s]

    def touch(self, sha256: str) -> None:
        """Mark a blob as just used (LRU order, persisted as the file's mtime)."""
        with self._lock:
            self._touch_locked(sha256)

    def _touch_locked(self, sha256: str) -> None:
        if sha256 in self._lru:
            self._lru.move_to_end(sha256)
            try:
                os.utime(self.root / sha256)
            except FileNotFoundError:
                del self._lru[sha256]

    def _install(self, tmp_path: Path, sha256: str, size: int) -> Path:
        final = self.root / sha256
        with self._lock:
            os.replace(tmp_path, final)
            self._lru[sha256] = size
            self._lru.move_to_end(sha256)
            self._evict_locked(keep=sha256)
        return final

    def _evict_locked(self, keep: str) -> None:
        total = sum(self._lru.values())
        if total <= self.cache_bytes:
            return
        for sha in list(self._lru):
            if total <= self.cache_bytes:
                break
            if sha == keep or self._pins.get(sha, 0) > 0:
                continue
            size = self._lru.pop(sha)
            (self.root / sha).unlink(missing_ok=True)
            total -= size
            log.info("evicted blob %s (%d bytes) from the cache", sha, size)
        if total > self.cache_bytes:
            log.warning(
                "blob cache holds %d bytes, over its limit of %d: the rest is pinned or new",
                total,
                self.cache_bytes,
            )
