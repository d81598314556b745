"""Every strategy ends when what it waits for can never arrive (issue 17, items 1 and 2).

Each search strategy × each way its results can become impossible: no agent answers, the FP32
model is refused for good on the only class (a TVM agent that cannot import ``Celu``), the fully
quantized model is infeasible everywhere (QOperator on TVM, ``feasibility = "report"``), and the
only class dies while the ranking is measured (its real agent process SIGKILLed). ``tune`` must
end (bounded wait: a hang is a failure) with exit 1 and one line naming the class and the reason.
Real agents on loopback, real ONNX Runtime / TVM, real SQLite stores.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port, write_study
from onnx_models import cnn

from tuneqn.controller.cli import main
from tuneqn.controller.farm.local import LocalAgent

STRATEGIES = {
    "sweep-paper": {"strategy": "sweep", "ranking": "paper"},
    "greedy": {"strategy": "greedy", "ranking": "measured", "regain_every": 2, "screen_samples": 8},
    "budget-measured": {"strategy": "budget", "ranking": "measured", "screen_samples": 8},
    "target": {"strategy": "target", "ranking": "measured", "max_loss": 0.0, "screen_samples": 8},
}
#: Timing for the tests; ``device_wait_s`` stays long unless a case is about a class that vanished.
FAST = {
    "latency_repeats": 2,
    "latency_warmup": 1,
    "heartbeat_s": 0.5,
    "silent_after_s": 3.0,
    "unreachable_grace_s": 0.5,
    "lease_timeout_s": 10.0,
    "device_wait_s": 600.0,
    "max_attempts": 1,
}
LIMIT_S = 90.0  # a run that has not ended by then hangs


def _tune_bounded(argv: list[str], capsys: pytest.CaptureFixture[str], limit: float = LIMIT_S) -> tuple[int, str]:
    """``tuneqn tune …`` in a thread; a run still going after ``limit`` seconds fails the test."""
    box: list[int] = []
    t = threading.Thread(target=lambda: box.append(main(argv)), daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), f"tune did not end within {limit:.0f}s (it waits for results that cannot arrive)"
    assert box, "tune raised (see the log)"
    return box[0], capsys.readouterr().err


def _failure_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("tuneqn: failed:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def _study(
    tmp: Path, model: Path, images: Path, strategy: str, recipes: list[dict[str, Any]] | None = None, **evaluation: Any
) -> Path:
    return write_study(
        tmp,
        model=model,
        images=images,
        evaluation={**FAST, **evaluation},
        search=STRATEGIES[strategy],
        quantization={"recipes": recipes or [{"name": "static"}]},
    )


@pytest.mark.heavy
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_no_agent_reachable(tmp_path: Path, assets: Path, strategy: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An agent that never answers is given up after agent_connect_timeout_s (not device_wait_s, 600 s)."""
    dead = f"127.0.0.1:{free_port()}"
    study = _study(tmp_path, assets / "cnn.onnx", assets / "images", strategy, agent_connect_timeout_s=2.0)
    started = time.monotonic()
    rc, err = _tune_bounded(["tune", str(study), "--agent", dead], capsys, limit=60)
    line = _failure_line(err)
    assert rc == 1 and dead in line and "never answered" in line and "connection refused" in line, line
    assert time.monotonic() - started < 60


@pytest.fixture(scope="module")
def tvm_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One TVM agent state dir for the module: its compile cache builds the FP32 model once."""
    return tmp_path_factory.mktemp("tvm-state")


def _tvm_phone(tvm_agent: Any, state: Path) -> str:
    from tuneqn.agent.config import TvmSettings

    return str(tvm_agent(TvmSettings(), state_dir=state, name="phone", device_class="phone").address)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_fp32_refused_for_good_on_the_only_class(
    tmp_path: Path,
    assets: Path,
    strategy: str,
    tvm_state: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The only class (TVM) cannot import the model's Celu: FP32 is infeasible there, nothing to compare with."""
    pytest.importorskip("tvm")
    tvm_agent = request.getfixturevalue("tvm_agent")
    model = cnn(tmp_path / "celu.onnx", activation="Celu")
    address = _tvm_phone(tvm_agent, tvm_state)
    study = _study(tmp_path, model, assets / "images", strategy)
    rc, err = _tune_bounded(["tune", str(study), "--agent", address], capsys)
    line = _failure_line(err)
    assert rc == 1 and "device class phone" in line and "FP32 model" in line and "Celu" in line, line


@pytest.mark.heavy
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_fully_quantized_infeasible_everywhere(
    tmp_path: Path,
    assets: Path,
    strategy: str,
    tvm_state: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """feasibility = "report": the QOperator recipe's fully quantized model (QLinearConv) is infeasible on the
    only class; FP32 runs there. Nothing to search from."""
    pytest.importorskip("tvm")
    tvm_agent = request.getfixturevalue("tvm_agent")
    address = _tvm_phone(tvm_agent, tvm_state)
    study = _study(
        tmp_path,
        assets / "cnn.onnx",
        assets / "images",
        strategy,
        recipes=[{"name": "qop", "format": "qoperator"}],
        feasibility="report",
    )
    rc, err = _tune_bounded(["tune", str(study), "--agent", address], capsys, limit=150)
    line = _failure_line(err)
    assert rc == 1 and "device class phone" in line and "fully quantized model of qop" in line, line
    assert "QLinearConv" in line, line
    db = sqlite3.connect(tmp_path / "out" / "tuneqn.db")
    assert db.execute("select state from jobs where candidate_id = 'cnn:fp32'").fetchone()[0] == "done"


def _state(db: Path, sql: str, args: list[Any]) -> int:
    if not db.exists():
        return 0
    try:
        return int(sqlite3.connect(db).execute(sql, args).fetchone()[0])
    except sqlite3.OperationalError:
        return 0


@pytest.mark.heavy
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_the_only_class_dies_mid_ranking(
    tmp_path: Path, assets: Path, strategy: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The only agent is SIGKILLed while its first jobs run: after device_wait_s its jobs end unreachable and
    the searches, which wait for the FP32 and fully quantized results, end too."""
    agent = LocalAgent(
        tmp_path / "agent", device_name="cpu0", extra_args=["--device-class", "cpu", "--simulated-latency-ms", "300"]
    )
    study = _study(tmp_path, assets / "cnn.onnx", assets / "images", strategy, device_wait_s=2.0)
    db = tmp_path / "out" / "tuneqn.db"
    killed: list[int] = []

    def kill_when_busy() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            if _state(db, "select count(*) from jobs where state = 'submitted'", []):
                assert agent.proc is not None
                os.kill(agent.proc.pid, signal.SIGKILL)
                killed.append(agent.proc.pid)
            time.sleep(0.02)  # polling the checkpoint for a condition

    with agent:
        watcher = threading.Thread(target=kill_when_busy, daemon=True)
        watcher.start()
        rc, err = _tune_bounded(["tune", str(study), "--agent", agent.address], capsys)
        watcher.join()
    line = _failure_line(err)
    assert killed and rc == 1 and "device class cpu" in line and "unreachable" in line, line


@pytest.mark.heavy
def test_quick_form_with_a_wrong_address_says_what_it_waits_for_and_ends(tmp_path: Path, assets: Path) -> None:
    """The default search (auto recipes, budget on the measured ranking) with an address nothing listens on:
    status lines while it waits (output is not a terminal: one line per change, on stdout with the log), then
    exit 1 and one line on stderr."""
    dead = f"127.0.0.1:{free_port()}"
    cmd = [
        sys.executable,
        "-m",
        "tuneqn.controller",
        "tune",
        "--model",
        str(assets / "cnn.onnx"),
        "--images",
        str(assets / "images"),
        "--out",
        str(tmp_path / "out"),
        "--agent",
        dead,
        "--connect-timeout",
        "3",
    ]
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("tune did not end within 90 s") from exc
    wall = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    line = _failure_line(proc.stderr)
    assert dead in line and "never answered" in line, line
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    waiting = [ln for ln in proc.stdout.splitlines() if f"waiting for agent {dead}" in ln]
    assert waiting and "connection refused" in waiting[0] and "giving up in" in waiting[0], proc.stdout
    assert len(waiting) < 5, "status lines are printed at changes, not every tick"
    assert wall < 60, wall
