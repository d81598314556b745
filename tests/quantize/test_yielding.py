"""Long heavy units give way to a local agent's timing (controller/common/yielding.py): real processes, real flock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tuneqn.agent.quiet import QuietLock as AgentQuietLock
from tuneqn.controller.common import yielding
from tuneqn.controller.farm.local import SharedQuietLock

DEADLINE = 30.0


def _spin(folder: str) -> tuple[int, int]:
    """Work until ``folder/done`` exists, counting rounds into ``folder/count``; returns (pid, rounds)."""
    d = Path(folder)
    (d / "pid").write_text(str(os.getpid()))
    rounds = 0
    while not (d / "done").exists():
        rounds += 1
        (d / "count").write_text(str(rounds))
    return os.getpid(), rounds


def _fail(message: str) -> None:
    raise ValueError(message)


def _wait_for(what: str, cond: object) -> None:
    deadline = time.monotonic() + DEADLINE
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _state(pid: int) -> str:
    """The process's state letter (R, S, T, Z, …), or "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")


def test_a_long_unit_is_stopped_while_the_agent_times_and_ends_with_its_result(tmp_path: Path) -> None:
    lock = SharedQuietLock(tmp_path / "quiet.lock")
    out: dict[str, object] = {}

    def unit() -> None:
        with lock.shared():
            out["result"] = yielding.run(_spin, str(tmp_path))

    worker = threading.Thread(target=unit)
    worker.start()
    _wait_for("the child to work", lambda: (tmp_path / "count").exists())
    pid = int((tmp_path / "pid").read_text())
    assert pid != os.getpid()
    with AgentQuietLock(tmp_path / "quiet.lock").exclusive():  # the agent's side: it gets the lock mid-unit
        _wait_for("the child to stop", lambda: _state(pid) == "T")
        count = (tmp_path / "count").read_text()
        assert _state(pid) == "T" and (tmp_path / "count").read_text() == count  # no work while timing
        (tmp_path / "done").write_text("")
    worker.join(DEADLINE)
    assert not worker.is_alive()
    got_pid, rounds = out["result"]  # type: ignore[misc]
    assert got_pid == pid and rounds > 0


def test_a_failing_unit_raises_its_error_and_without_a_hold_runs_in_this_process(tmp_path: Path) -> None:
    with SharedQuietLock(tmp_path / "quiet.lock").shared(), pytest.raises(ValueError, match="no such layer"):
        yielding.run(_fail, "no such layer")
    (tmp_path / "done").write_text("")
    assert yielding.run(_spin, str(tmp_path)) == (os.getpid(), 0)  # no quiet lock held: in-process


def test_a_unit_stopped_for_timing_dies_with_a_killed_controller(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_yielding import _spin
        from tuneqn.controller.common import yielding
        from tuneqn.controller.farm.local import SharedQuietLock
        if __name__ == "__main__":
            with SharedQuietLock(__import__("pathlib").Path({str(tmp_path / "quiet.lock")!r})).shared():
                yielding.run(_spin, {str(tmp_path)!r})
    """)
    (tmp_path / "controller.py").write_text(script)
    controller = subprocess.Popen([sys.executable, str(tmp_path / "controller.py")])  # noqa: S603
    try:
        _wait_for("the child to work", lambda: (tmp_path / "count").exists())
        pid = int((tmp_path / "pid").read_text())
        with AgentQuietLock(tmp_path / "quiet.lock").exclusive():
            _wait_for("the child to stop", lambda: _state(pid) == "T")
            controller.send_signal(signal.SIGKILL)
            controller.wait(DEADLINE)
            _wait_for("the stopped child to die", lambda: _state(pid) in ("", "Z"))
    finally:
        if controller.poll() is None:
            controller.kill()


def _priority_and_trim() -> tuple[int, int]:
    """This process's niceness, and how many bytes of a freed 64 MiB block glibc kept (RSS not given back)."""
    import ctypes

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    block = libc.malloc(64 << 20)
    ctypes.memset(block, 1, 64 << 20)
    before = rss()
    libc.free(ctypes.c_void_p(block))
    return os.nice(0), max(0, (64 << 20) - (before - rss()))


def test_a_unit_runs_at_the_priority_asked_and_keeps_the_memory_it_frees(tmp_path: Path) -> None:
    """A unit that is not the one the study waits for runs niced; a child keeps freed memory for reuse (the
    histogram calibrators free GBs, and faulting them back in cost seconds of system time)."""
    parent_nice, parent_kept = _priority_and_trim()
    with SharedQuietLock(tmp_path / "quiet.lock").shared():
        child_nice, kept = yielding.run(_priority_and_trim, nice=10)
        same, _ = yielding.run(_priority_and_trim)
    assert child_nice == min(parent_nice + 10, 19) and same == parent_nice
    assert parent_kept < 8 << 20  # by default glibc gives a freed large block back at once...
    assert kept == 64 << 20  # ...in the child it stays for the next allocation
