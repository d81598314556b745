"""The agent as a real process: readiness line, crash + restart, CLI errors."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_agent_fixtures import (  # noqa: F401  (fixtures are used by name)
    agent_process,
    client_factory,
    cnn_bytes,
    dataset,
    direct_topk,
    executions,
    job_spec,
    npy_bytes,
)
from tuneqn.agent import cli
from tuneqn.controller.farm.client import decode_topk
from tuneqn.v1 import agent_pb2 as pb


def test_result_survives_sigkill_and_is_not_rerun(
    agent_process, client_factory, cnn_bytes, tmp_path: Path
) -> None:
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
        (["--backend", "tvm"], {}, "unknown backend 'tvm'"),
        ([], {"TUNEQN_AGENT_BACKEND": "nope"}, "unknown backend 'nope'"),
        (["--listen", "localhost"], {}, "--listen must be HOST:PORT"),
        (["--max-blob-bytes", "lots"], {}, "--max-blob-bytes"),
        (["--token-file", "/nonexistent/token"], {}, "cannot read token file"),
        (["--tls-cert", "/x.pem"], {}, "--tls-cert and --tls-key"),
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
