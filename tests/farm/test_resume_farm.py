"""A study SIGKILLed while both of its agents run a job, then run again (issue 17: the resume hang).

Real agent processes of one class on loopback, the controller as a real ``tuneqn tune`` process
(SIGKILLed), real SQLite stores on both sides; the kill is timed by polling the checkpoint for a
condition (both agents hold a job), with bounded timeouts.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agent_fixtures import executions

from tuneqn.controller.farm.local import LocalAgent

KILL_TIMEOUT = 180.0
RERUN_TIMEOUT = 300.0

pytestmark = pytest.mark.heavy  # a controller process SIGKILLed mid-study, then run again


def _rows(db: Path, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    except sqlite3.OperationalError:
        return []
    try:
        return con.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        con.close()


def _start_agents(tmp: Path, latency_ms: int = 40) -> list[LocalAgent]:
    """Two agents of one class; ``latency_ms`` per sample keeps jobs in flight long enough to be caught."""
    agents = [
        LocalAgent(
            tmp / f"agent-{n}",
            device_name=n,
            extra_args=["--device-class", "lab", "--simulated-latency-ms", str(latency_ms)],
        )
        for n in "ab"
    ]
    for a in agents:
        a.start()
    return agents


def _tune(tmp: Path, assets: Path, agents: list[LocalAgent], *extra: str) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "tuneqn.controller",
        "tune",
        "--model",
        str(assets / "wide.onnx"),
        "--images",
        str(assets / "images"),
        "--eval",
        "16",
        "--calibration",
        "12",
        "--analysis",
        "6",
        "--out",
        str(tmp / "out"),
        *extra,
    ]
    for a in agents:
        cmd += ["--agent", a.address]
    return cmd


def _kill_when_both_busy(cmd: list[str], db: Path, min_results: int, where: str = "") -> list[tuple[str, str]]:
    """Run ``cmd`` and SIGKILL it once ``min_results`` results are stored and both agents hold a job
    (``where``: a condition on those jobs); returns the (job id, holder) pairs in flight at the kill."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + KILL_TIMEOUT
    flying: list[tuple[str, str]] = []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = _rows(db, "select count(*) from results")
            rows = _rows(db, f"select id, agent from jobs where state = 'submitted' {where}")
            if done and int(str(done[0][0])) >= min_results and len({str(a).split("#")[0] for _, a in rows}) >= 2:
                flying = [(str(j), str(a)) for j, a in rows]
                break
            time.sleep(0.02)  # polling the checkpoint for a condition
        assert flying, "the study never had a job on both agents (or ended first)"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    return flying


def test_a_study_killed_with_jobs_on_both_agents_resumes_and_collects_them(tmp_path: Path, assets: Path) -> None:
    """The default search, SIGKILLed mid-search with a job in flight on each of two agents, then run again with the
    same command (default lease): the rerun ends, and the jobs in flight are collected from the agents that ran
    them — each executed once, stored once — without waiting for a lease."""
    agents = _start_agents(tmp_path)
    db = tmp_path / "out" / "tuneqn.db"
    try:
        cmd = _tune(tmp_path, assets, agents)
        flying = _kill_when_both_busy(cmd, db, min_results=8)
        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=RERUN_TIMEOUT)
        assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
        by_name = {a.address: a for a in agents}
        for job_id, holder in flying:
            state, attempts, error = _rows(db, "select state, attempts, error from jobs where id = ?", (job_id,))[0]
            assert (state, attempts, error) == ("done", 1, None), (job_id, state, attempts, error)
            agent = by_name[holder.split("#")[0]]
            assert executions(agent.state_dir, job_id) == 1
        assert _rows(db, "select count(*) from jobs where state != 'done'") == [(0,)]
        dup = _rows(
            db, "select candidate_id, device, level, count(*) from results group by 1, 2, 3 having count(*) > 1"
        )
        assert dup == []
    finally:
        for a in agents:
            a.stop()


def test_jobs_of_a_killed_run_that_the_rerun_does_not_ask_for_do_not_stay_submitted(
    tmp_path: Path, assets: Path
) -> None:
    """A rerun asks for other work (here: one recipe instead of the automatic ones): the jobs the killed run had in
    flight have no holder any more. Once their lease runs out they are pending again in the store (before, they
    stayed ``submitted`` with a dead lease, for ever: nothing reported or retried them)."""
    agents = _start_agents(tmp_path, latency_ms=120)  # the rerun must outlast the killed run's 6 s leases
    db = tmp_path / "out" / "tuneqn.db"
    try:
        lease = ["--lease-timeout", "6"]
        cmd = _tune(tmp_path, assets, agents, *lease)
        # Jobs of the automatic recipes other than per-tensor (their fully quantized models and best cases,
        # which the gate evaluates first), one on each agent.
        flying = _kill_when_both_busy(
            cmd,
            db,
            min_results=1,
            where="and candidate_id not like '%:per-tensor:%' and candidate_id not like '%:fp32'",
        )
        recipe = {
            j: str(_rows(db, "select candidate_id from jobs where id = ?", (j,))[0][0]).split(":")[1] for j, _ in flying
        }
        orphans = [j for j, r in recipe.items() if r != "per-tensor"]
        assert orphans
        rerun = subprocess.run(
            _tune(tmp_path, assets, agents, *lease, "--recipe", "per-tensor"),
            capture_output=True,
            text=True,
            timeout=RERUN_TIMEOUT,
        )
        assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
        now = time.time()
        stale = _rows(db, "select id from jobs where state = 'submitted' and lease_until < ?", (now,))
        assert stale == [], "jobs kept submitted with an expired lease"
        for job_id in orphans:
            assert _rows(db, "select state from jobs where id = ?", (job_id,)) in ([("pending",)], [("done",)])
    finally:
        for a in agents:
            a.stop()
