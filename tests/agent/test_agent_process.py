"""The agent as a real process: readiness line, crash + restart, SIGSTOP, stdin EOF, CLI errors."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from agent_fixtures import DEVICE, READY_TIMEOUT, dataset, direct_topk, executions, job_spec, npy_bytes

from tuneqn.agent import cli
from tuneqn.controller.farm.client import AgentSilent, decode_topk
from tuneqn.v1 import agent_pb2 as pb


def test_result_survives_sigkill_and_is_not_rerun(agent_process, client_factory, cnn_bytes, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    data = dataset(12)
    first = agent_process(state_dir)
    client = client_factory(first.address)
    agent_id = client.info().agent_id
    spec = job_spec("survivor", client.upload_bytes(cnn_bytes), client.upload_bytes(npy_bytes(data)))
    client.submit(spec)
    result = client.wait_result("survivor", timeout=20)
    assert result.state == pb.SUCCEEDED, result.error
    first.kill()

    second = agent_process(state_dir)
    client2 = client_factory(second.address)
    assert client2.info().agent_id == agent_id
    (event,) = list(client2.watch("survivor", timeout=10))
    assert event.final and event.result == result
    assert np.array_equal(decode_topk(event.result), direct_topk(cnn_bytes, data))
    again = client2.submit(spec)
    assert again.already_known and again.state == pb.SUCCEEDED
    assert client2.has_blobs([spec.model_sha256, spec.dataset_sha256]) == [True, True]
    assert executions(state_dir, "survivor") == 1
    assert second.terminate() == 0  # SIGTERM: graceful stop


def test_job_running_at_a_crash_runs_again_after_restart(
    agent_process, client_factory, cnn_bytes, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    first = agent_process(state_dir, "--simulated-latency-ms", "25")
    client = client_factory(first.address)
    spec = job_spec(
        "crashed", client.upload_bytes(cnn_bytes), client.upload_bytes(npy_bytes(dataset(400))), chunk_size=4
    )
    client.submit(spec)
    for event in client.watch("crashed", timeout=20):
        if event.done > 0:
            break
    first.kill()

    second = agent_process(state_dir)
    result = client_factory(second.address).wait_result("crashed", timeout=20)
    assert result.state == pb.SUCCEEDED and result.num_samples == 400
    assert result.simulated_latency_ms_per_sample == 0
    with sqlite3.connect(state_dir / "agent.db") as conn:
        outcomes = [r[0] for r in conn.execute("SELECT outcome FROM executions ORDER BY id")]
    assert outcomes == ["interrupted", "SUCCEEDED"]


def _outcomes(state_dir: Path, job_id: str) -> list[str]:
    with sqlite3.connect(state_dir / "agent.db") as conn:
        rows = conn.execute("SELECT outcome FROM executions WHERE job_id = ? ORDER BY id", [job_id])
        return [r[0] for r in rows]


def _wait_until_running(client, job_id: str) -> None:
    """Block until the job has predicted something in the agent's current execution."""
    for event in client.watch(job_id, timeout=30):
        if event.state == pb.RUNNING and event.done > 0:
            return
    raise AssertionError(f"job {job_id} finished before it was seen running")


@pytest.mark.heavy
def test_job_that_keeps_crashing_its_agent_ends_failed_and_a_retry_runs_it(
    agent_process, client_factory, cnn_bytes, tmp_path: Path
) -> None:
    """Restart re-queue is bounded by max_executions (0 = 3): no endless crash loop."""
    state_dir = tmp_path / "state"
    spec = None
    for _ in range(3):
        agent = agent_process(state_dir, "--simulated-latency-ms", "25")
        client = client_factory(agent.address)
        if spec is None:
            m, d = client.upload_bytes(cnn_bytes), client.upload_bytes(npy_bytes(dataset(400)))
            spec = job_spec("crasher", m, d, chunk_size=4, attempt=1)
            client.submit(spec)
        _wait_until_running(client, "crasher")  # the restarted agent re-queued and runs it
        agent.kill()
    assert _outcomes(state_dir, "crasher") == ["interrupted", "interrupted", None]  # None: open

    last = agent_process(state_dir)  # no simulated latency: a fourth execution would finish
    client = client_factory(last.address)
    result = client.wait_result("crasher", timeout=20)
    assert result.state == pb.FAILED
    assert "interrupted 3 times (the agent stopped or crashed while running it)" in result.error
    assert (result.attempt, result.executions) == (1, 3)
    assert _outcomes(state_dir, "crasher") == ["interrupted"] * 3

    spec.attempt = 2  # the controller's retry is a new execution series
    assert client.submit(spec).state == pb.QUEUED
    retried = client.wait_result("crasher", timeout=20)
    assert (retried.state, retried.attempt, retried.executions) == (pb.SUCCEEDED, 2, 4)
    assert _outcomes(state_dir, "crasher") == ["interrupted"] * 3 + ["SUCCEEDED"]


def test_max_executions_of_the_spec_bounds_the_requeue(
    agent_process, client_factory, cnn_bytes, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    first = agent_process(state_dir, "--simulated-latency-ms", "25")
    client = client_factory(first.address)
    m, d = client.upload_bytes(cnn_bytes), client.upload_bytes(npy_bytes(dataset(400)))
    client.submit(job_spec("once", m, d, chunk_size=4, max_executions=1))
    _wait_until_running(client, "once")
    first.kill()
    result = client_factory(agent_process(state_dir).address).wait_result("once", timeout=20)
    assert result.state == pb.FAILED and "interrupted once" in result.error
    assert executions(state_dir, "once") == 1


@pytest.mark.heavy
def test_sigstopped_agent_is_noticed_by_the_watching_client(
    agent_process, client_factory, cnn_bytes, tmp_path: Path
) -> None:
    agent = agent_process(tmp_path / "state", "--simulated-latency-ms", "25")
    client = client_factory(agent.address)
    m, d = client.upload_bytes(cnn_bytes), client.upload_bytes(npy_bytes(dataset(400)))
    client.submit(job_spec("frozen", m, d, chunk_size=4))
    # the stream deadline (60 s) only guards against a hang; silence is noticed after 2 s
    events = client.watch("frozen", timeout=60, heartbeat_ms=200, idle_timeout=2.0)
    stopped = False
    try:
        with pytest.raises((AgentSilent, grpc.RpcError)) as err:
            for event in events:
                assert not event.final, "the job finished although its agent was stopped"
                if event.done > 0 and not stopped:
                    agent.proc.send_signal(signal.SIGSTOP)
                    stopped = True
        assert stopped
        if isinstance(err.value, grpc.RpcError):  # keepalive noticed it first
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    finally:
        agent.proc.send_signal(signal.SIGCONT)
    assert client.info().running_job_id == "frozen"  # alive again after SIGCONT
    assert client.cancel("frozen") == pb.RUNNING
    assert client.wait_result("frozen", timeout=20).state == pb.CANCELLED


_PARENT = """
import subprocess, sys
agent = subprocess.Popen(
    [sys.executable, "-m", "tuneqn.agent", "--listen", "127.0.0.1:0", "--state-dir", sys.argv[1],
     "--device-name", sys.argv[2], "--stop-on-stdin-eof"],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(sys.argv[3], "ab"),
)
print(agent.pid, agent.stdout.readline().decode().strip(), flush=True)
sys.stdin.read()  # until killed
"""


def _gone(pid: int) -> bool:
    """Whether the process has exited (an unreaped zombie counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_agent_stops_when_its_parent_dies(agent_process, client_factory, tmp_path: Path) -> None:
    """--stop-on-stdin-eof: a SIGKILLed parent never orphans the agent and its state-dir lock."""
    state_dir, log = tmp_path / "state", tmp_path / "child-agent.log"
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(state_dir), DEVICE, str(log)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    agent_pid = 0
    try:
        assert parent.stdout is not None
        pid_text, line = parent.stdout.readline().decode().split(" ", 1)
        agent_pid = int(pid_text)
        assert line.startswith("tuneqn-agent listening on "), log.read_text()
        address = line.strip().rsplit(" ", 1)[1]
        assert client_factory(address).info().devices[0].name == DEVICE

        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=READY_TIMEOUT)
        deadline = time.monotonic() + READY_TIMEOUT
        while not _gone(agent_pid):
            assert time.monotonic() < deadline, "the agent outlived its parent"
            time.sleep(0.05)  # polling the process table for the exit
        agent_pid = 0
        assert "stdin reached end of file, stopping" in log.read_text()
        assert "agent stopped" in log.read_text()  # graceful: the server and state were closed

        again = agent_process(state_dir)  # the state-dir lock is free
        assert client_factory(again.address).info().agent_id
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for stream in (parent.stdin, parent.stdout):
            if stream is not None:
                stream.close()
        if agent_pid and not _gone(agent_pid):
            os.kill(agent_pid, signal.SIGKILL)


def _run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tuneqn.agent", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **env},
    )


def test_non_loopback_bind_without_token_or_tls_is_refused(tmp_path: Path) -> None:
    done = _run_cli("--listen", "0.0.0.0:0", "--state-dir", str(tmp_path / "s"))
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert "non-loopback" in line and "--insecure" in line and "Traceback" not in line
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "argv, env, needle",
    [
        (["--backend", "tflite"], {}, "unknown backend 'tflite'"),
        ([], {"TUNEQN_AGENT_BACKEND": "nope"}, "unknown backend 'nope'"),
        (["--listen", "localhost"], {}, "--listen must be HOST:PORT"),
        (["--max-blob-bytes", "lots"], {}, "--max-blob-bytes"),
        (["--token-file", "/nonexistent/token"], {}, "cannot read token file"),
        (["--tls-cert", "/x.pem"], {}, "--tls-cert and --tls-key"),
        (["--quiet-lock", "/nonexistent/dir/quiet.lock"], {}, "folder /nonexistent/dir does not exist"),
        (["--no-such-flag"], {}, "unrecognized arguments"),
    ],
)
def test_bad_cli_input_is_one_line_and_exit_2(
    argv: list[str], env: dict[str, str], needle: str, capsys, monkeypatch, tmp_path: Path
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cli.main([*argv, "--state-dir", str(tmp_path / "s")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("tuneqn-agent: error:") and needle in line
    assert not (tmp_path / "s").exists()


def test_parse_size() -> None:
    assert cli.parse_size("2GiB") == 2 * 1024**3
    assert cli.parse_size("512MiB") == 512 * 1024**2
    assert cli.parse_size("1G") == 10**9
    assert cli.parse_size("1048576") == 1048576


def test_is_loopback() -> None:
    assert cli.is_loopback("127.0.0.1") and cli.is_loopback("::1") and cli.is_loopback("localhost")
    assert not cli.is_loopback("0.0.0.0") and not cli.is_loopback("192.168.1.5")
    assert cli.parse_listen("[::1]:0") == ("::1", 0)
