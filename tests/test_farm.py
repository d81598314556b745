"""The farm end to end with real agent processes on loopback and real SQLite checkpoints."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import write_study
from tuneqn.controller.config import load_config
from tuneqn.controller.farm.dispatcher import Endpoint, EvalSettings
from tuneqn.controller.farm.local import LocalAgent
from tuneqn.controller.farm.tune import tune
from tuneqn.controller.study import Study

SIM_MS = "15"  # simulated per-sample device latency: gives every job a window to be killed in


def _agent(tmp: Path, name: str, device_class: str | None = None, sim: str = SIM_MS) -> LocalAgent:
    extra = ["--simulated-latency-ms", sim]
    if device_class:
        extra += ["--device-class", device_class]
    return LocalAgent(tmp / f"agent-{name}", device_name=name, extra_args=extra)


def _study(tmp: Path, assets: Path) -> Path:
    return write_study(tmp, model=assets / "cnn.onnx", images=assets / "images",
                       evaluation={"latency_repeats": 3, "latency_warmup": 1, "lease_timeout_s": 3.0})


def _predictions(out: Path) -> dict[str, bytes]:
    con = sqlite3.connect(out / "tuneqn.db")
    rows = con.execute("select candidate_id, device, topk from results").fetchall()
    pairs = [(c, d) for c, d, _ in rows]
    assert len(pairs) == len(set(pairs)), "a (candidate, device) result was stored twice"
    return {c: t for c, _, t in rows}


def _executions(agent: LocalAgent) -> list[str]:
    db = next(agent.state_dir.glob("*.db"))
    return [r[0] for r in sqlite3.connect(db).execute("select job_id from executions")]


def _run(study_toml: Path, endpoints: list[Endpoint], on_progress=None) -> tuple[Study, object]:  # type: ignore[no-untyped-def]
    cfg = load_config(study_toml)
    study = Study(cfg)
    e = cfg.evaluation
    settings = EvalSettings(top_k=e.top_k, latency_warmup=e.latency_warmup, latency_repeats=e.latency_repeats,
                            lease_timeout_s=e.lease_timeout_s)
    try:
        outcome = tune(study, endpoints, settings, on_progress=on_progress, agent_wait_s=60)
    finally:
        study.close()
    return study, outcome


@pytest.fixture
def reference(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> dict[str, bytes]:
    """Fault-free predictions of every candidate (one agent)."""
    tmp = tmp_path_factory.mktemp("ref")
    with _agent(tmp, "ref", sim="0") as agent:
        _, outcome = _run(_study(tmp, assets), [Endpoint(agent.address)])
    assert outcome.failed == 0  # type: ignore[attr-defined]
    return _predictions(tmp / "out")


def test_two_agents_one_class_survive_sigkill(tmp_path: Path, assets: Path, reference: dict[str, bytes]) -> None:
    a, b = _agent(tmp_path, "a", "lab"), _agent(tmp_path, "b", "lab")
    with a, b:
        killed: list[str] = []
        db = tmp_path / "out" / "tuneqn.db"

        def kill_a_mid_job(counts: dict[str, int], total: int) -> None:
            if killed or not db.exists():
                return
            con = sqlite3.connect(db)
            busy = con.execute("select count(*) from jobs where state = 'submitted' and agent = ?", [a.address]).fetchone()[0]
            done = con.execute("select count(*) from jobs where state = 'done'").fetchone()[0]
            if busy and done >= 1 and a.proc is not None:
                os.kill(a.proc.pid, signal.SIGKILL)
                killed.append(a.address)

        _, outcome = _run(_study(tmp_path, assets), [Endpoint(a.address), Endpoint(b.address)], kill_a_mid_job)
        assert killed, "agent a was never caught mid-job"
        assert outcome.failed == 0 and outcome.done == outcome.total == 7  # type: ignore[attr-defined]
        # both agents worked for the one device class
        assert _executions(b) and _executions(a)
    preds = _predictions(tmp_path / "out")
    assert preds == reference  # same predictions as the fault-free run, each stored once
    con = sqlite3.connect(tmp_path / "out" / "tuneqn.db")
    assert {r[0] for r in con.execute("select device from results")} == {"lab"}


def test_controller_killed_then_resumed_runs_only_missing_jobs(tmp_path: Path, assets: Path,
                                                               reference: dict[str, bytes]) -> None:
    study_toml = _study(tmp_path, assets)
    db = tmp_path / "out" / "tuneqn.db"
    with _agent(tmp_path, "solo", sim="40") as agent:
        proc = subprocess.Popen([sys.executable, "-m", "tuneqn.controller", "tune", str(study_toml), "--agent",
                                 agent.address], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        done = 0
        while time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    done = sqlite3.connect(db).execute("select count(*) from results").fetchone()[0]
                except sqlite3.OperationalError:
                    done = 0
                if done >= 2:
                    break
            time.sleep(0.05)  # polling the checkpoint for a condition
        assert proc.poll() is None, "controller finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = sqlite3.connect(db).execute("select count(*) from results").fetchone()[0]
        assert 2 <= before < 7
        _, outcome = _run(study_toml, [Endpoint(agent.address)])
        assert outcome.done == 7 and outcome.failed == 0  # type: ignore[attr-defined]
        runs = _executions(agent)
    # every job ran exactly once on the agent: the killed controller's in-flight job was re-collected
    assert len(runs) == len(set(runs)) == 7
    assert _predictions(tmp_path / "out") == reference


def test_wrong_token_fails_cleanly(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tuneqn.controller.cli import main

    token = tmp_path / "token"
    token.write_text("s3cret")
    agent = LocalAgent(tmp_path / "agent-t", device_name="t", extra_args=["--token-file", str(token)])
    wrong = tmp_path / "wrong"
    wrong.write_text("nope")
    with agent:
        study = _study(tmp_path, assets)
        rc = main(["tune", str(study), "--agent", agent.address, "--token-file", str(wrong)])
        err = capsys.readouterr().err
        assert rc == 1
        assert "UNAUTHENTICATED" in err and len(err.strip().splitlines()) == 1
        assert not _executions(agent)
        rc = main(["tune", str(study), "--agent", agent.address, "--token-file", str(token)])
        assert rc == 0
    report = (tmp_path / "out" / "report.json").read_text()
    assert '"candidates"' in report


def test_local_agent_started_when_none_configured(tmp_path: Path, assets: Path) -> None:
    import json

    from tuneqn.controller.cli import main

    study = _study(tmp_path, assets)
    assert main(["tune", str(study)]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["partial"] is False
    assert [d["name"] for d in report["devices"]] == ["local"]
    assert len(report["candidates"]) == 6
    for c in report["candidates"]:
        (res,) = c["results"]
        assert res["status"] == "done" and 0.0 <= res["agreement"] <= 1.0 and res["latency_ms"] > 0
    top = np.array([c["results"][0]["agreement"] for c in report["candidates"]])
    assert top[-1] == pytest.approx(1.0)  # everything ranked back in float agrees with FP32


def test_report_numbers_equal_the_database(tmp_path: Path, assets: Path) -> None:
    import json

    from tuneqn.controller.cli import main

    study = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "labelled",
                        dataset={"images": str(assets / "labelled"), "eval": 12, "calibration": 12, "analysis": 4,
                                 "labels": {"regex": r"img_\d+_(\d)\.png"}},
                        evaluation={"latency_repeats": 2, "latency_warmup": 1})
    assert main(["tune", str(study)]) == 0
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    con = sqlite3.connect(out / "tuneqn.db")
    fp32 = np.frombuffer(con.execute("select topk from results where candidate_id = 'cnn:fp32'").fetchone()[0], "<i4")
    labels = json.loads(con.execute("select labels from datasets where split = 'cnn/eval'").fetchone()[0])
    for c in report["candidates"]:
        size, sha = con.execute("select size_bytes, sha256 from candidates where id = ?", [c["id"]]).fetchone()
        assert (c["size_bytes"], c["sha256"]) == (size, sha)
        topk, k, lat = con.execute("select topk, top_k, latency_ms from results where candidate_id = ?", [c["id"]]).fetchone()
        t = np.frombuffer(topk, "<i4").reshape(-1, k)
        (res,) = c["results"]
        assert res["agreement"] == pytest.approx(float((t[:, 0] == fp32.reshape(-1, k)[:, 0]).mean()))
        assert res["accuracy"] == pytest.approx(float((t[:, 0] == np.array(labels)).mean()))
        assert res["latency_ms"] == pytest.approx(lat)
    assert (out / "report.html").stat().st_size > 20_000
    # the report command regenerates the same numbers from the checkpoint
    assert main(["report", str(out)]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["candidates"] == report["candidates"] and again["summary"] == report["summary"]
