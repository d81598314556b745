"""The farm end to end with real agent processes on loopback and real SQLite checkpoints."""

from __future__ import annotations

import inspect
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import write_study
from studies import BUSY_SQL, FAST, agent_executions, local_agent, run_bounded, run_study

from tuneqn.controller.config import load_config
from tuneqn.controller.farm.client import AgentClient
from tuneqn.controller.farm.jobs import Endpoint, FarmSettings, make_job
from tuneqn.controller.farm.local import LocalAgent
from tuneqn.controller.study import Study
from tuneqn.v1 import agent_pb2 as pb


def _study(tmp: Path, assets: Path, **evaluation: Any) -> Path:
    return write_study(tmp, model=assets / "cnn.onnx", images=assets / "images", evaluation={**FAST, **evaluation})


def _predictions(out: Path) -> dict[tuple[str, str], bytes]:
    con = sqlite3.connect(out / "tuneqn.db")
    rows = con.execute("select candidate_id, device, topk from results").fetchall()
    pairs = [(c, d) for c, d, _ in rows]
    assert len(pairs) == len(set(pairs)), "a (candidate, device) result was stored twice"
    return {(c, d): t for c, d, t in rows}


def _state(db: Path, sql: str, args: list[Any] | None = None) -> int:
    if not db.exists():
        return 0
    try:
        return int(sqlite3.connect(db).execute(sql, args or []).fetchone()[0])
    except sqlite3.OperationalError:
        return 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> dict[str, bytes]:
    """Fault-free predictions of every candidate (one agent), by candidate id."""
    tmp = tmp_path_factory.mktemp("ref")
    with local_agent(tmp, "ref", "lab", "0") as agent:
        outcome = run_study(_study(tmp, assets), [Endpoint(address=agent.address)])
    assert outcome.failed == 0
    return {c: t for (c, _), t in _predictions(tmp / "out").items()}


@pytest.mark.heavy
def test_two_agents_one_class_survive_sigkill(tmp_path: Path, assets: Path, reference: dict[str, bytes]) -> None:
    a, b = local_agent(tmp_path, "a", "lab"), local_agent(tmp_path, "b", "lab")
    with a, b:
        killed: list[float] = []
        db = tmp_path / "out" / "tuneqn.db"

        def kill_a_mid_job(counts: dict[str, int], total: int) -> None:
            busy = _state(db, BUSY_SQL, [a.address + "#%"])
            # a job held by a is not yet one it runs (it may wait there, submitted ahead): killed once it ran one
            if not killed and busy and counts.get("done", 0) >= 1 and agent_executions(a) and a.proc is not None:
                os.kill(a.proc.pid, signal.SIGKILL)
                killed.append(time.monotonic())

        endpoints = [Endpoint(address=a.address), Endpoint(address=b.address)]
        outcome = run_bounded(120, _study(tmp_path, assets), endpoints, kill_a_mid_job)
        assert killed, "agent a was never caught mid-job"
        assert outcome.failed == 0 and outcome.done == outcome.total == 7
        assert agent_executions(b) and agent_executions(a)  # both agents worked for the one device class
    preds = _predictions(tmp_path / "out")
    assert {c: t for (c, _), t in preds.items()} == reference  # each stored once, same as fault-free
    assert {d for _, d in preds} == {"lab"}


@pytest.mark.heavy
def test_sigstopped_agent_is_detected_and_its_job_runs_elsewhere(
    tmp_path: Path, assets: Path, reference: dict[str, bytes]
) -> None:
    a, b = local_agent(tmp_path, "a", "lab", "40"), local_agent(tmp_path, "b", "lab", "40")
    stopped: list[int] = []
    with a, b:
        db = tmp_path / "out" / "tuneqn.db"

        def stop_a_mid_job(counts: dict[str, int], total: int) -> None:
            busy = _state(db, BUSY_SQL, [a.address + "#%"])
            if not stopped and busy and a.proc is not None:
                os.kill(a.proc.pid, signal.SIGSTOP)
                stopped.append(a.proc.pid)

        try:
            endpoints = [Endpoint(address=a.address), Endpoint(address=b.address)]
            outcome = run_bounded(120, _study(tmp_path, assets), endpoints, stop_a_mid_job)
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        assert stopped, "agent a was never caught mid-job"
        assert outcome.failed == 0 and outcome.done == outcome.total == 7
    assert {c: t for (c, _), t in _predictions(tmp_path / "out").items()} == reference


@pytest.mark.heavy
def test_controller_killed_then_resumed_runs_only_missing_jobs(
    tmp_path: Path, assets: Path, reference: dict[str, bytes]
) -> None:
    study_toml = _study(tmp_path, assets)
    db = tmp_path / "out" / "tuneqn.db"
    with local_agent(tmp_path, "solo", "lab", "40") as agent:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tuneqn.controller", "tune", str(study_toml), "--agent", agent.address],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if _state(db, "select count(*) from results") >= 2:
                break
            time.sleep(0.05)  # polling the checkpoint for a condition
        assert proc.poll() is None, "controller finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = _state(db, "select count(*) from results")
        assert 2 <= before < 7
        outcome = run_study(study_toml, [Endpoint(address=agent.address)])
        assert outcome.done == 7 and outcome.failed == 0
        runs = agent_executions(agent)
    # every job ran exactly once on the agent: the killed controller's in-flight job was re-collected
    assert len(runs) == len(set(runs)) == 7
    assert {c: t for (c, _), t in _predictions(tmp_path / "out").items()} == reference


@pytest.mark.heavy
def test_fresh_remeasures_and_other_studies_reuse_successes(tmp_path: Path, assets: Path) -> None:
    study_toml = _study(tmp_path, assets)
    with local_agent(tmp_path, "solo", "lab", "0") as agent:
        assert run_study(study_toml, [Endpoint(address=agent.address)]).done == 7
        assert len(agent_executions(agent)) == 7
        assert run_study(study_toml, [Endpoint(address=agent.address)]).done == 7  # nothing new: all stored
        assert len(agent_executions(agent)) == 7
        # --fresh measures everything again on the agent, not its stored results
        assert run_study(study_toml, [Endpoint(address=agent.address)], fresh=True).done == 7
        runs = agent_executions(agent)
        assert len(runs) == 14 and len(set(runs)) == 7
        # another study of the same model and data reuses the agent's stored successes
        other = tmp_path / "other"
        other.mkdir()
        assert run_study(_study(other, assets), [Endpoint(address=agent.address)]).done == 7
        assert len(agent_executions(agent)) == 14


@pytest.mark.heavy
def test_a_retry_executes_again(tmp_path: Path, assets: Path) -> None:
    """A job that failed on the agent (its blob vanished) is re-executed by the retry, not re-read."""
    study_toml = _study(tmp_path, assets)
    cfg = load_config(study_toml)
    study = Study(cfg)
    study.prepare()
    pm, split = study.models["cnn"], study.eval_split("cnn")
    settings = FarmSettings.from_config(cfg.evaluation)
    study.close()
    plan = make_job(
        "cnn:fp32",
        "lab",
        pm.path,
        pm.sha256,
        split.path,
        split.sha256,
        pm.input_name,
        {},
        settings,
        tuning_group=pm.sha256,
    )
    with local_agent(tmp_path, "solo", "lab", "40") as agent:
        client = AgentClient(agent.address)
        client.upload_file(pm.path)
        client.upload_file(split.path)
        # a long job occupies the device, so the target job waits in the queue with its blobs present ...
        blocker = io.BytesIO()
        np.save(blocker, np.zeros((100, *np.load(split.path).shape[1:]), dtype=np.float32))
        busy = pb.JobSpec(
            job_id="blocker",
            model_sha256=pm.sha256,
            dataset_sha256=client.upload_bytes(blocker.getvalue()),
            input_name=pm.input_name,
            latency_repeats=0,
            attempt=1,
        )
        client.submit(busy)
        next(e for e in client.watch("blocker", timeout=30) if e.state == pb.RUNNING)
        spec = pb.JobSpec()
        spec.CopyFrom(plan.spec)
        spec.attempt = 1
        assert not client.submit(spec).already_known
        # ... and its model blob is gone when it runs: attempt 1 fails on the agent
        (agent.state_dir / "blobs" / pm.sha256).unlink()
        failed = client.wait_result(plan.id, timeout=60)
        assert failed.state == pb.FAILED and failed.attempt == 1
        client.close()
        outcome = run_bounded(120, study_toml, [Endpoint(address=agent.address)])
        assert outcome.failed == 0 and outcome.done == 7
        assert agent_executions(agent).count(plan.id) == 2  # the retry ran it again instead of re-reading FAILED
    con = sqlite3.connect(tmp_path / "out" / "tuneqn.db")
    (attempt,) = con.execute("select attempt from results where job_id = ?", [plan.id]).fetchone()
    assert attempt == 2


@pytest.mark.heavy
@pytest.mark.parametrize("when", ["its turn", "ahead"])
def test_controller_side_error_fails_the_attempt_and_the_run_goes_on(
    tmp_path: Path, assets: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """An OSError while uploading (disk trouble on the controller) fails that attempt; no hang. The same whether
    the job is submitted at its turn or ahead, while the device runs the one before it."""
    real = AgentClient.upload_file
    broken: list[str] = []

    def flaky_upload(self: AgentClient, path: Any, timeout: float | None = None) -> str:
        ahead = any(frame.function == "_submit_ahead" for frame in inspect.stack(0))
        if not broken and str(path).endswith(".onnx") and "candidates" in str(path) and ahead == (when == "ahead"):
            broken.append(str(path))
            raise OSError(28, "No space left on device")
        return real(self, path, timeout)

    monkeypatch.setattr(AgentClient, "upload_file", flaky_upload)
    with local_agent(tmp_path, "solo", "lab", "0") as agent:
        outcome = run_bounded(120, _study(tmp_path, assets), [Endpoint(address=agent.address)])
    assert broken and outcome.failed == 0 and outcome.done == 7
    con = sqlite3.connect(tmp_path / "out" / "tuneqn.db")
    assert con.execute("select max(attempts) from jobs").fetchone()[0] == 2


@pytest.mark.heavy
def test_a_class_that_hangs_mid_study_ends_unreachable_while_others_finish(
    tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The only agent of a class hangs (SIGSTOP) mid-job: its job uses up its attempts, the class's
    other jobs end as unreachable after device_wait_s, the other class finishes, tune exits 1 naming it."""
    from tuneqn.controller.cli import main

    a, b = local_agent(tmp_path, "a", "phone", "40"), local_agent(tmp_path, "b", "cpu", "0")
    study_toml = _study(tmp_path, assets, device_wait_s=4.0, max_attempts=1)
    db = tmp_path / "out" / "tuneqn.db"
    stopped: list[int] = []

    def stop_a_mid_job() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not stopped:
            if _state(db, "select count(*) from jobs where state = 'submitted' and agent like ?", [a.address + "#%"]):
                assert a.proc is not None
                os.kill(a.proc.pid, signal.SIGSTOP)
                stopped.append(a.proc.pid)
            time.sleep(0.02)  # polling the checkpoint for a condition

    with a, b:
        watcher = threading.Thread(target=stop_a_mid_job, daemon=True)
        watcher.start()
        try:
            rc = main(["tune", str(study_toml), "--agent", a.address, "--agent", b.address])
        finally:
            watcher.join()
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
    err = capsys.readouterr().err
    assert stopped and rc == 1 and "device class phone" in err and "Traceback" not in err
    assert _state(db, "select count(*) from jobs where device = 'cpu' and state = 'done'") == 7
    assert _state(db, "select count(*) from jobs where device = 'phone' and state = 'failed'") == 1
    assert _state(db, "select count(*) from jobs where device = 'phone' and state = 'unreachable'") >= 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    statuses = [r["status"] for c in report["candidates"] for r in c["results"] if r["device"] == "phone"]
    assert "unreachable" in statuses


@pytest.mark.heavy
def test_a_declared_class_whose_agent_never_answers_ends_unreachable(
    tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tuneqn.controller.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens here
    with local_agent(tmp_path, "b", "cpu", "0") as b:
        study_toml = write_study(
            tmp_path,
            model=assets / "cnn.onnx",
            images=assets / "images",
            evaluation={**FAST, "device_wait_s": 3.0},
            agents=[{"address": b.address}, {"address": dead, "device_class": "phone"}],
        )
        rc = main(["tune", str(study_toml)])
    err = capsys.readouterr().err
    assert rc == 1 and "device class phone" in err and dead in err and "Traceback" not in err
    db = tmp_path / "out" / "tuneqn.db"
    assert _state(db, "select count(*) from jobs where device = 'cpu' and state = 'done'") == 7
    assert _state(db, "select count(*) from jobs where device = 'phone' and state = 'unreachable'") == 7


@pytest.mark.heavy
def test_a_class_whose_agent_comes_up_late_gets_its_jobs(tmp_path: Path, assets: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    late = LocalAgent(tmp_path / "agent-late", device_name="late", extra_args=["--device-class", "late"])
    started: list[bool] = []
    db = tmp_path / "out" / "tuneqn.db"

    def start_late(counts: dict[str, int], total: int) -> None:
        if not started and counts.get("done", 0) >= 2:
            started.append(True)
            cmd = [
                sys.executable,
                "-m",
                "tuneqn.agent",
                "--listen",
                f"127.0.0.1:{port}",
                "--state-dir",
                str(late.state_dir),
                "--device-name",
                "late",
                "--device-class",
                "late",
            ]
            late.state_dir.mkdir(parents=True, exist_ok=True)
            late.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)

    with local_agent(tmp_path, "early", "early", "20") as early:
        try:
            outcome = run_bounded(
                120,
                _study(tmp_path, assets),
                [Endpoint(address=early.address), Endpoint(address=f"127.0.0.1:{port}")],
                start_late,
            )
        finally:
            late.stop()
    assert started and outcome.failed == 0
    assert _state(db, "select count(*) from results where device = 'late'") == 7
    assert _state(db, "select count(*) from results where device = 'early'") == 7


@pytest.mark.heavy
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
        assert not agent_executions(agent)
        rc = main(["tune", str(study), "--agent", agent.address, "--token-file", str(token)])
        assert rc == 0
    report = (tmp_path / "out" / "report.json").read_text()
    assert '"candidates"' in report


@pytest.mark.heavy
def test_local_agent_started_when_none_configured(tmp_path: Path, assets: Path) -> None:
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


@pytest.mark.heavy
def test_killed_controller_leaves_no_local_agent_behind(tmp_path: Path, assets: Path) -> None:
    study_toml = _study(tmp_path, assets)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneqn.controller", "tune", str(study_toml), "--simulated-latency-ms", "30"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    lock = out / "agents" / "local" / "agent.lock"
    deadline = time.monotonic() + 120
    agent_pid = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if _state(out / "tuneqn.db", "select count(*) from results") >= 1 and lock.exists():
            agent_pid = int(lock.read_text().split()[0] or 0)
            break
        time.sleep(0.05)  # polling the checkpoint for a condition
    assert agent_pid and proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{agent_pid}").exists():
        if Path(f"/proc/{agent_pid}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.05)  # waiting for the orphan to notice its closed stdin
    alive = Path(f"/proc/{agent_pid}").exists() and Path(f"/proc/{agent_pid}/stat").read_text().split()[2] != "Z"
    assert not alive, "the local agent outlived its controller"
    from tuneqn.controller.cli import main

    assert main(["tune", str(study_toml)]) == 0  # the next run gets the state dir


@pytest.mark.heavy
def test_report_numbers_equal_the_database(tmp_path: Path, assets: Path) -> None:

    from tuneqn.controller.cli import main

    study = write_study(
        tmp_path,
        model=assets / "cnn.onnx",
        images=assets / "labelled",
        dataset={
            "images": str(assets / "labelled"),
            "eval": 12,
            "calibration": 12,
            "analysis": 4,
            "labels": {"regex": r"img_\d+_(\d)\.png"},
        },
        evaluation={"latency_repeats": 2, "latency_warmup": 1},
    )
    assert main(["tune", str(study)]) == 0
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    con = sqlite3.connect(out / "tuneqn.db")
    fp32 = np.frombuffer(con.execute("select topk from results where candidate_id = 'cnn:fp32'").fetchone()[0], "<i4")
    labels = json.loads(con.execute("select labels from datasets where split = 'cnn/eval'").fetchone()[0])
    for c in report["candidates"]:
        size, sha = con.execute("select size_bytes, sha256 from candidates where id = ?", [c["id"]]).fetchone()
        assert (c["size_bytes"], c["sha256"]) == (size, sha)
        topk, k, lat = con.execute(
            "select topk, top_k, latency_ms from results where candidate_id = ?", [c["id"]]
        ).fetchone()
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


@pytest.mark.heavy
def test_an_agent_with_several_devices_runs_a_job_on_each(tmp_path: Path, assets: Path) -> None:
    """The controller schedules per device: one agent fronting two devices of one class runs two jobs at once."""
    from tuneqn.agent.backends.ort import OrtBackend
    from tuneqn.agent.config import AgentConfig
    from tuneqn.agent.server import AgentServer

    backends = [OrtBackend(f"phone{i}", "phones", simulated_latency_ms_per_sample=20.0) for i in (1, 2)]
    server = AgentServer(AgentConfig(state_dir=tmp_path / "agent"), backends)
    server.start()
    try:
        outcome = run_bounded(120, _study(tmp_path, assets), [Endpoint(address=server.address)])
    finally:
        server.stop()
    assert outcome.failed == 0 and outcome.done == outcome.total == 7
    con = sqlite3.connect(tmp_path / "out" / "tuneqn.db")
    holders = {r[0] for r in con.execute("select agent from results")}
    assert holders == {f"{server.address}#phone1", f"{server.address}#phone2"}
    assert {r[0] for r in con.execute("select device from results")} == {"phones"}
    # the two devices overlapped in time: some job started on one before a job of the other ended
    with sqlite3.connect(tmp_path / "agent" / "agent.db") as adb:
        runs = adb.execute(
            "select j.device, e.started, e.finished from executions e join jobs j on j.job_id = e.job_id"
        ).fetchall()
    spans = {d: [(s, f) for dd, s, f in runs if dd == d] for d in ("phone1", "phone2")}
    assert any(s1 < f2 and s2 < f1 for s1, f1 in spans["phone1"] for s2, f2 in spans["phone2"])
