"""Agent operations: Prometheus metrics endpoint, bounded drain on SIGTERM, host and job in logs."""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_fixtures import DEVICE, dataset, executions, job_spec, npy_bytes
from prometheus_client.parser import text_string_to_metric_families

from tuneqn.agent import cli
from tuneqn.v1 import agent_pb2 as pb


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics on 127.0.0.1:port; samples by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def stored_job(state_dir: Path, job_id: str) -> tuple[str, bytes | None]:
    """State and stored result of a job, read from the agent's SQLite file."""
    with sqlite3.connect(state_dir / "agent.db") as conn:
        state, result = conn.execute("SELECT state, result FROM jobs WHERE job_id = ?", [job_id]).fetchone()
    return state, result


def test_metrics_endpoint_counts_jobs_by_state_and_device(
    agent_factory, client_factory, cnn_bytes, tmp_path: Path
) -> None:
    agent = agent_factory(metrics_host="127.0.0.1", metrics_port=0)
    # a second agent in the same process: its own registry, its own counts
    other = agent_factory(state_dir=tmp_path / "other", metrics_host="127.0.0.1", metrics_port=0)
    assert agent.metrics_port and other.metrics_port and agent.metrics_port != other.metrics_port
    client = client_factory(agent)
    model = client.upload_bytes(cnn_bytes)
    data = client.upload_bytes(npy_bytes(dataset(6)))
    bad_data = client.upload_bytes(npy_bytes(np.zeros((3, 5), dtype=np.float32)))
    for job_id, data_sha in (("ok-1", data), ("ok-2", data), ("bad", bad_data)):
        client.submit(job_spec(job_id, model, data_sha))
    assert client.wait_result("ok-1", timeout=30).state == pb.SUCCEEDED
    assert client.wait_result("ok-2", timeout=30).state == pb.SUCCEEDED
    assert client.wait_result("bad", timeout=30).state == pb.FAILED

    samples = scrape(agent.metrics_port)
    dev = ("device", DEVICE)
    assert samples[("tuneqn_agent_jobs_finished_total", (dev, ("state", "SUCCEEDED")))] == 2
    assert samples[("tuneqn_agent_jobs_finished_total", (dev, ("state", "FAILED")))] == 1
    assert samples[("tuneqn_agent_job_duration_seconds_count", (dev, ("state", "SUCCEEDED")))] == 2
    assert samples[("tuneqn_agent_job_duration_seconds_count", (dev, ("state", "FAILED")))] == 1
    assert samples[("tuneqn_agent_job_duration_seconds_sum", (dev, ("state", "SUCCEEDED")))] > 0
    assert samples[("tuneqn_agent_queue_length", (dev,))] == 0
    assert samples[("tuneqn_agent_running_jobs", (dev,))] == 0
    assert samples[("tuneqn_agent_blob_cache_bytes", ())] == agent.blobs.total_bytes > 0
    assert samples[("tuneqn_agent_blob_cache_limit_bytes", ())] == agent.blobs.cache_bytes
    assert ("tuneqn_agent_compile_cache_bytes", ()) not in samples  # ORT: no compile cache

    untouched = scrape(other.metrics_port)
    assert not any(name == "tuneqn_agent_jobs_finished_total" for name, _ in untouched)
    assert untouched[("tuneqn_agent_blob_cache_bytes", ())] == 0

    port = agent.metrics_port
    agent.stop(grace=0.5)
    with pytest.raises(OSError):  # the endpoint goes with the agent
        scrape(port)


@pytest.mark.heavy
def test_sigterm_lets_a_running_job_finish_within_the_drain(
    agent_process, client_factory, cnn_bytes, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    agent = agent_process(state_dir, "--simulated-latency-ms", "20", "--drain-seconds", "120")
    client = client_factory(agent.address)
    spec = job_spec(
        "short",
        client.upload_bytes(cnn_bytes),
        client.upload_bytes(npy_bytes(dataset(100))),
        chunk_size=4,
    )
    client.submit(spec)
    events = client.watch("short", timeout=60)
    for event in events:
        if event.done > 0:
            break
    assert agent.terminate() == 0
    log = agent.log_path.read_text()
    assert "draining: waiting up to 120 s for job short on " + DEVICE in log
    assert f"job short on {DEVICE} finished: SUCCEEDED" in log
    assert "interrupted" not in log
    state, result = stored_job(state_dir, "short")
    assert state == "SUCCEEDED" and result is not None
    assert pb.JobResult.FromString(result).num_samples == 100
    assert executions(state_dir, "short") == 1

    again = agent_process(state_dir)  # the stored result is served, the job not run again
    (final,) = list(client_factory(again.address).watch("short", timeout=10))
    assert final.final and final.result.state == pb.SUCCEEDED
    assert executions(state_dir, "short") == 1


def start_long_job(
    agent_process: Callable[..., Any],
    client_factory: Callable[..., Any],
    cnn_bytes: bytes,
    state_dir: Path,
    drain_seconds: str,
) -> Any:
    """An agent process (``--drain-seconds``) running job "long" (2000 samples at 25 ms each), past its first chunk."""
    agent = agent_process(state_dir, "--simulated-latency-ms", "25", "--drain-seconds", drain_seconds)
    client = client_factory(agent.address)
    spec = job_spec(
        "long",
        client.upload_bytes(cnn_bytes),
        client.upload_bytes(npy_bytes(dataset(2000))),
        chunk_size=4,
    )
    client.submit(spec)
    for event in client.watch("long", timeout=60):
        if event.done > 0:
            break
    return agent


def assert_requeued_and_runs_after_restart(
    agent_process: Callable[..., Any], client_factory: Callable[..., Any], state_dir: Path
) -> None:
    """Job "long" was interrupted once and stays queued; a restarted agent runs it to the end."""
    assert stored_job(state_dir, "long") == ("QUEUED", None)
    assert executions(state_dir, "long") == 1

    again = agent_process(state_dir)  # no simulated latency now: it finishes quickly
    result = client_factory(again.address).wait_result("long", timeout=60)
    assert result.state == pb.SUCCEEDED and result.num_samples == 2000
    assert executions(state_dir, "long") == 2


@pytest.mark.heavy
def test_a_job_past_the_drain_is_requeued_and_runs_after_restart(
    agent_process, client_factory, cnn_bytes, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    agent = start_long_job(agent_process, client_factory, cnn_bytes, state_dir, drain_seconds="0.2")
    assert agent.terminate() == 0
    log = agent.log_path.read_text()
    assert f"job long on {DEVICE} still running after the 0.2 s drain" in log
    assert f"job long on {DEVICE} interrupted by shutdown; it stays queued" in log
    assert_requeued_and_runs_after_restart(agent_process, client_factory, state_dir)


def test_startup_log_names_the_host(agent_process, tmp_path: Path) -> None:
    agent = agent_process(tmp_path / "state")
    assert agent.terminate() == 0
    assert f"on host {socket.gethostname()} listening on {agent.address}" in agent.log_path.read_text()


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--drain-seconds", "-1", "--drain-seconds must be a finite number >= 0"),
        ("--drain-seconds", "nan", "--drain-seconds must be a finite number >= 0"),
        ("--metrics-listen", "9100", "--metrics-listen must be HOST:PORT"),
        ("--metrics-listen", "127.0.0.1:70000", "--metrics-listen port out of range"),
    ],
)
def test_bad_ops_flags_exit_2_with_one_line(
    flag: str, value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "s"), flag, value])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "s").exists()


def test_metrics_listen_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEQN_AGENT_METRICS_LISTEN", "127.0.0.1:9108")
    monkeypatch.setenv("TUNEQN_AGENT_DRAIN_SECONDS", "5")
    args = cli.build_parser().parse_args([])
    assert args.metrics_listen == "127.0.0.1:9108" and args.drain_seconds == 5.0


def wait_for_log(agent: object, text: str, timeout: float = 60.0) -> str:
    """Wait (with a deadline) until the agent's log contains ``text``; returns the log."""
    deadline = time.monotonic() + timeout
    while True:
        log = agent.log_path.read_text()  # type: ignore[attr-defined]
        if text in log:
            return log
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged within {timeout} s:\n{log}")
        if agent.proc.poll() is not None:  # type: ignore[attr-defined]
            raise AssertionError(f"agent exited before logging {text!r}:\n{log}")
        time.sleep(0.05)  # polling a file for a condition, not synchronising by sleeping


@pytest.mark.heavy
def test_a_second_sigterm_cuts_the_drain_short_and_the_job_reruns_after_restart(
    agent_process, client_factory, cnn_bytes, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    agent = start_long_job(agent_process, client_factory, cnn_bytes, state_dir, drain_seconds="600")
    agent.proc.send_signal(signal.SIGTERM)
    wait_for_log(agent, f"draining: waiting up to 600 s for job long on {DEVICE}")
    agent.proc.send_signal(signal.SIGTERM)
    # the job needs ~50 s and the drain allows 600: only the second signal can end it now
    assert agent.proc.wait(timeout=60) == 0
    agent.terminate()  # reaps and closes the pipes (the process is gone already)
    log = agent.log_path.read_text()
    assert log.count("received SIGTERM again: cutting the drain short") == 1, log
    assert f"job long on {DEVICE} interrupted by shutdown; it stays queued" in log
    assert "still running after the 600 s drain" not in log
    assert "agent stopped" in log
    assert_requeued_and_runs_after_restart(agent_process, client_factory, state_dir)


def test_a_metrics_port_in_use_is_one_line_naming_the_flag_exit_2(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "tuneqn.agent",
                "--listen",
                "127.0.0.1:0",
                "--state-dir",
                str(tmp_path / "state"),
                "--device-name",
                DEVICE,
                "--metrics-listen",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""  # never announced itself as listening
    lines = proc.stderr.splitlines()
    assert lines == [
        f"tuneqn-agent: error: cannot serve metrics: --metrics-listen 127.0.0.1:{port}: Address already in use"
    ], proc.stderr
