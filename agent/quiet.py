"""Quiet lock: the agent times a model only while tuneqn's own CPU-heavy work is paused.

A controller and an agent on the same host share nothing but a lock file (``tuneqn-agent
--quiet-lock FILE``, env ``TUNEQN_AGENT_QUIET_LOCK``). The protocol uses ``flock(2)``
(``fcntl.flock``), so a lock dies with its holder's process (even on SIGKILL) and a crashed
process never blocks anyone:

* ``FILE`` — created if missing (mode 0666 minus the umask, content unused).

  - The **agent** holds ``LOCK_EX`` on it while it measures latency (warm-up plus timed
    runs of one job) and releases it right after; predictions and loading run unlocked.
  - A **controller** (or any tool of tuneqn) holds ``LOCK_SH`` on it around each unit of
    CPU-heavy work (building one candidate, calibrating, analysing a model) and releases
    it between units. Several builders may hold it at once.

* ``FILE.gate`` — the turnstile that keeps builders from starving the agent (``flock``
  gives a waiting ``LOCK_EX`` no priority over new ``LOCK_SH`` requests).

  - The agent takes ``LOCK_EX`` on the gate *before* it waits for ``FILE`` and keeps it
    until it releases ``FILE``.
  - A builder takes ``LOCK_SH`` on the gate (blocking: it waits while an agent waits or
    times), then ``LOCK_SH`` on ``FILE``, then releases the gate and does its work.

  A builder that skips the gate still never runs during timing; it may only delay the
  agent's timing for as long as it keeps re-taking ``FILE`` without a gap.

Controller side, per unit of work (about ten lines, no tuneqn import needed)::

    with open(path + ".gate", "a") as gate, open(path, "a") as lock:
        fcntl.flock(gate, fcntl.LOCK_SH)   # waits while an agent waits for or holds FILE
        fcntl.flock(lock, fcntl.LOCK_SH)
        fcntl.flock(gate, fcntl.LOCK_UN)
        build_one_candidate()              # closing ``lock`` releases LOCK_SH

``flock`` locks belong to an open file description: open the files yourself (one
``open`` per unit or per thread); two ``open`` calls in one process do conflict.
The agent polls with ``LOCK_NB`` so that a cancel or a stop interrupts its wait.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tuneqn.agent.backends.base import Interrupted

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX hosts cannot use a quiet lock
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

GATE_SUFFIX = ".gate"
POLL_SECONDS = 0.01


def gate_path(path: Path) -> Path:
    """The turnstile file that belongs to the lock file ``path``."""
    return path.with_name(path.name + GATE_SUFFIX)


def open_lock_file(path: Path) -> int:
    """Open (creating if missing) a lock file read-only; returns the descriptor."""
    return os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)


class QuietLock:
    """The agent's side of the quiet-lock protocol (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        if fcntl is None:  # pragma: no cover - non-POSIX
            raise OSError("a quiet lock needs fcntl.flock (POSIX)")
        self.path = Path(path)
        self.gate = gate_path(self.path)
        for p in (self.path, self.gate):  # fail early (at start) on an unusable path
            os.close(open_lock_file(p))

    @contextmanager
    def exclusive(
        self,
        stop: threading.Event | None = None,
        on_blocked: Callable[[], None] | None = None,
    ) -> Iterator[float]:
        """Hold ``LOCK_EX`` on the gate and the lock file for the ``with`` body.

        Waits (polling, interruptible) while other processes hold the lock; calls
        ``on_blocked`` once when it has to wait. Yields the seconds waited. Raises
        :class:`~tuneqn.agent.backends.base.Interrupted` when ``stop`` is set while waiting.
        """
        gate_fd = open_lock_file(self.gate)
        try:
            lock_fd = open_lock_file(self.path)
            try:
                t0 = time.monotonic()
                blocked = self._acquire(gate_fd, stop, on_blocked, False)
                self._acquire(lock_fd, stop, on_blocked, blocked)
                waited = time.monotonic() - t0
                if waited > POLL_SECONDS:
                    log.info("waited %.2f s for the quiet lock %s", waited, self.path)
                yield waited
            finally:
                os.close(lock_fd)  # releases LOCK_EX
        finally:
            os.close(gate_fd)

    @staticmethod
    def _acquire(
        fd: int,
        stop: threading.Event | None,
        on_blocked: Callable[[], None] | None,
        blocked: bool,
    ) -> bool:
        """Take LOCK_EX on ``fd``; returns whether it had to wait (or had waited before)."""
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return blocked
            except BlockingIOError:
                pass
            if not blocked:
                blocked = True
                if on_blocked is not None:
                    on_blocked()
            if stop is None:
                time.sleep(POLL_SECONDS)  # polling a lock another process holds
            elif stop.wait(POLL_SECONDS):
                raise Interrupted()
