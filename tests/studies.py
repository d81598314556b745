"""Studies run the way `tuneqn tune` runs them, against real agent processes on loopback (the farm and search
tests): fast farm timings, a local agent per test, a bounded run, what an agent executed."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from tuneqn.controller.config import load_config
from tuneqn.controller.farm.jobs import Endpoint, FarmSettings
from tuneqn.controller.farm.local import LocalAgent
from tuneqn.controller.orchestrator import TuneOutcome, remeasure_token, tune
from tuneqn.controller.study import Study

SIM_MS = "15"  # simulated per-sample device latency: gives every job a window to be killed in
FAST = {
    "latency_repeats": 3,
    "latency_warmup": 1,
    "heartbeat_s": 0.5,
    "silent_after_s": 3.0,
    "unreachable_grace_s": 1.0,
    "lease_timeout_s": 10.0,
    "device_wait_s": 30.0,
}


BUSY_SQL = "select count(*) from jobs where state = 'submitted' and agent like ?"


def local_agent(tmp: Path, name: str, device_class: str | None = None, sim: str = SIM_MS, *extra: str) -> LocalAgent:
    """A real agent process (not started yet) with ``sim`` ms of simulated device time per sample."""
    args = ["--simulated-latency-ms", sim, *extra]
    if device_class:
        args += ["--device-class", device_class]
    return LocalAgent(tmp / f"agent-{name}", device_name=name, extra_args=args)


def agent_executions(agent: LocalAgent) -> list[str]:
    """The jobs ``agent`` started executing (its own state database; none before it made one)."""
    db = agent.state_dir / "agent.db"
    if not db.exists():
        return []
    try:
        return [r[0] for r in sqlite3.connect(db).execute("select job_id from executions")]
    except sqlite3.OperationalError:  # its tables are not made yet
        return []


def run_study(
    study_toml: Path, endpoints: list[Endpoint], on_progress: Any = None, fresh: bool = False, **overrides: Any
) -> TuneOutcome:
    cfg = load_config(study_toml)
    study = Study(cfg, fresh=fresh)
    try:
        settings = FarmSettings.from_config(cfg.evaluation, remeasure_token=remeasure_token(study, fresh), **overrides)
        return tune(study, endpoints, settings, on_progress=on_progress)
    finally:
        study.close()


def run_bounded(seconds: float, *args: Any, **kwargs: Any) -> TuneOutcome:
    """``_run`` in a thread: a hang becomes a test failure instead of a stuck suite."""
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(run_study(*args, **kwargs)), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"tune did not end within {seconds}s"
    assert box, "tune raised (see the log)"
    return box[0]
