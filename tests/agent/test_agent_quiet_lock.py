"""The quiet lock: the agent times latency only while no co-located tuneqn work holds LOCK_SH."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_fixtures import dataset, job_spec, npy_bytes

from tuneqn.agent import cli
from tuneqn.agent.quiet import gate_path
from tuneqn.v1 import agent_pb2 as pb

RESULT_TIMEOUT = 30.0

# A stand-in for a controller building a candidate: holds LOCK_SH until its stdin closes.
_HOLDER = """
import fcntl, sys
with open(sys.argv[1], "a") as f:
    fcntl.flock(f, fcntl.LOCK_SH)
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def shared_holder() -> Iterator[Callable[[Path], subprocess.Popen[bytes]]]:
    """Start processes that hold LOCK_SH on a file until their stdin is closed."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(path: Path) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == b"locked\n"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = RESULT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)  # polling the agent's reported status


def _free(path: Path) -> bool:
    """Whether LOCK_EX on ``path`` can be taken right now (taken and released)."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


def test_shared_holder_delays_timing_and_the_lock_is_free_after(
    agent_factory, client_factory, cnn_bytes, shared_holder, tmp_path: Path
) -> None:
    lock = tmp_path / "quiet.lock"
    holder = shared_holder(lock)
    server = agent_factory(quiet_lock=lock)
    client = client_factory(server)
    m, d = client.upload_bytes(cnn_bytes), client.upload_bytes(npy_bytes(dataset(8)))
    client.submit(job_spec("timed", m, d, latency_repeats=5))

    events = client.watch("timed", timeout=RESULT_TIMEOUT)
    stage = next(e for e in events if e.stage == "latency")
    assert stage.state == pb.RUNNING and stage.done == stage.total == 8

    def waiting() -> bool:
        status = client.info().devices[0].status
        return "waiting for the quiet lock" in status and str(lock) in status

    _wait_for(waiting, "the agent to wait for the quiet lock")
    info = client.info()
    assert info.running_job_id == "timed" and info.devices[0].healthy
    # a builder that follows the gate protocol cannot start new work while the agent waits
    with open(gate_path(lock), "a") as gate, pytest.raises(BlockingIOError):
        fcntl.flock(gate, fcntl.LOCK_SH | fcntl.LOCK_NB)
    assert not _free(lock)

    assert holder.stdin is not None
    holder.stdin.close()  # the "build" ends: its LOCK_SH goes
    final = next(e for e in events if e.final)
    assert final.result.state == pb.SUCCEEDED, final.result.error
    assert final.result.latency.count == 5
    assert client.info().devices[0].status == ""
    assert _free(lock) and _free(gate_path(lock))


def test_cancel_interrupts_the_wait_for_the_quiet_lock(
    agent_factory, client_factory, cnn_bytes, shared_holder, tmp_path: Path
) -> None:
    lock = tmp_path / "quiet.lock"
    shared_holder(lock)
    server = agent_factory(quiet_lock=lock)
    client = client_factory(server)
    m, d = client.upload_bytes(cnn_bytes), client.upload_bytes(npy_bytes(dataset(4)))
    client.submit(job_spec("impatient", m, d))
    _wait_for(lambda: "quiet lock" in client.info().devices[0].status, "the quiet-lock wait")
    assert client.cancel("impatient") == pb.RUNNING
    result = client.wait_result("impatient", timeout=RESULT_TIMEOUT)
    assert result.state == pb.CANCELLED and result.latency.count == 0
    assert client.info().devices[0].status == "" and _free(gate_path(lock))


def test_missing_lock_file_is_created_and_jobs_run(agent_factory, client_factory, cnn_bytes, tmp_path: Path) -> None:
    lock = tmp_path / "created.lock"
    client = client_factory(agent_factory(quiet_lock=lock))
    assert lock.is_file() and gate_path(lock).is_file()
    m, d = client.upload_bytes(cnn_bytes), client.upload_bytes(npy_bytes(dataset(4)))
    client.submit(job_spec("plain", m, d))
    assert client.wait_result("plain", timeout=RESULT_TIMEOUT).latency.count == 3
    assert _free(lock)


def test_quiet_lock_flag_and_environment(monkeypatch, tmp_path: Path) -> None:
    args = ["--state-dir", str(tmp_path / "s")]
    config, _, _ = cli._validate(cli.build_parser().parse_args([*args, "--quiet-lock", str(tmp_path / "q")]))
    assert config.quiet_lock == tmp_path / "q"
    monkeypatch.setenv("TUNEQN_AGENT_QUIET_LOCK", str(tmp_path / "env.lock"))
    config, _, _ = cli._validate(cli.build_parser().parse_args(args))
    assert config.quiet_lock == tmp_path / "env.lock"
    assert not (tmp_path / "env.lock").exists()  # created by the agent when it starts
