"""A local agent process on loopback, started when a study configures no agents.

The agent is started with ``--stop-on-stdin-eof`` and a pipe as its stdin: when the
controller ends in any way (even SIGKILL) the pipe closes and the agent stops, so it never
outlives the controller holding its state-dir lock. It shares the controller's CPU, so it
also gets ``--quiet-lock``: it holds that file's exclusive lock while timing latency, and
the controller holds a shared lock around CPU-heavy work (candidate builds), so timing
never competes with tuneqn's own work (:class:`SharedQuietLock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from tuneqn.controller.common import yielding
from tuneqn.controller.common.errors import StudyFailed

log = logging.getLogger(__name__)
_LISTENING = re.compile(r"listening on (\S+:\d+)")


class SharedQuietLock:
    """The controller's side of the agent's ``--quiet-lock`` (protocol: ``tuneqn.agent.quiet``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the shared lock around one unit of CPU-heavy work (waits while the agent times).

        A long unit in the body can give way to the agent's timing (:func:`tuneqn.controller.common.yielding.run`)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        hold = _SharedHold(self.path)
        try:
            hold.take()
            with yielding.holding(hold):
                yield
        finally:
            hold.close()  # closing releases the locks


class _SharedHold:
    """One unit's shared quiet lock: taken through the gate, given way to an agent that waits to time."""

    def __init__(self, path: Path) -> None:
        self.gate_fd = os.open(f"{path}.gate", os.O_RDWR | os.O_CREAT, 0o600)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def take(self) -> None:
        """The turnstile, then the lock: waits while the agent waits or times."""
        fcntl.flock(self.gate_fd, fcntl.LOCK_SH)
        fcntl.flock(self.fd, fcntl.LOCK_SH)
        fcntl.flock(self.gate_fd, fcntl.LOCK_UN)

    def agent_waiting(self) -> bool:
        """An agent holds the gate (it takes it before it waits for the lock and keeps it while it times)."""
        try:
            fcntl.flock(self.gate_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self.gate_fd, fcntl.LOCK_UN)
        return False

    def give_way(self) -> None:
        """Let the waiting agent time: release the lock, and take it back through the gate once it is done."""
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.take()

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.gate_fd)


class LocalAgent:
    """``python -m tuneqn.agent --listen 127.0.0.1:0`` as a child process."""

    def __init__(
        self,
        state_dir: Path,
        device_name: str = "local",
        extra_args: list[str] | None = None,
        start_timeout: float = 60.0,
        quiet_lock: Path | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.device_name = device_name
        self.extra_args = list(extra_args or [])
        if quiet_lock is not None:
            self.extra_args += ["--quiet-lock", str(quiet_lock)]
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""

    def start(self) -> str:
        """Start the agent and return its address once it listens."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "tuneqn.agent",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(self.state_dir),
            "--device-name",
            self.device_name,
            "--stop-on-stdin-eof",
            "--drain-seconds",
            "0",  # a stopped study interrupts its jobs at once
            *self.extra_args,
        ]
        log.info("starting local agent: %s", " ".join(cmd))
        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.state_dir / "agent.log", "ab"),  # noqa: SIM115
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        found: list[str] = []
        done = threading.Event()

        stdout = self.proc.stdout

        def read() -> None:
            for line in stdout or ():
                m = _LISTENING.search(line)
                if m and not found:
                    found.append(m.group(1))
                    done.set()
            done.set()

        threading.Thread(target=read, daemon=True, name="local-agent-stdout").start()
        if not done.wait(self.start_timeout) or not found:
            self.stop()
            raise StudyFailed(f"local agent did not start; see {self.state_dir / 'agent.log'}")
        self.address = found[0]
        return self.address

    def stop(self) -> None:
        """Terminate the agent (SIGTERM, then SIGKILL)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> LocalAgent:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
