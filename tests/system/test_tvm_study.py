"""Whole studies on a TVM agent whose devices sit behind a real TVM RPC tracker.

A real tracker and real RPC servers on 127.0.0.1 (``tests/tvm_rpc.py``), an in-process agent
with TVM lanes, a real ONNX Runtime agent process beside it, real SQLite checkpoints. What is
checked is what the controller sees: predictions of TVM against ONNX Runtime's, infeasible
QOperator candidates with their op types, the per-device and cross-device fronts, feasibility
planning giving the TVM device a complete sweep, and an RPC server killed mid-study.
"""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import write_study
from tvm_rpc import TvmLab, wait_for

from tuneqn.agent.config import TvmSettings
from tuneqn.controller.cli import main
from tuneqn.controller.config import load_config
from tuneqn.controller.farm.jobs import Endpoint, FarmSettings
from tuneqn.controller.farm.local import LocalAgent
from tuneqn.controller.orchestrator import TuneOutcome, tune
from tuneqn.controller.study import Study

FAST = {
    "latency_repeats": 3,
    "latency_warmup": 1,
    "heartbeat_s": 0.5,
    "silent_after_s": 5.0,
    "unreachable_grace_s": 1.0,
    "lease_timeout_s": 20.0,
    "device_wait_s": 60.0,
}
RECIPES = [{"name": "qdq", "format": "qdq"}, {"name": "qop", "format": "qoperator"}]

pytestmark = pytest.mark.heavy  # whole studies on ORT and TVM agents, servers killed mid-study


def _study(tmp: Path, assets: Path, feasibility: str, step: int = 1) -> Path:
    return write_study(
        tmp,
        model=assets / "cnn.onnx",
        images=assets / "images",
        quantization={"recipes": RECIPES},
        search={"step": step},
        evaluation={**FAST, "feasibility": feasibility},
    )


def _tune(study_toml: Path, endpoints: list[Endpoint], on_progress: Any = None) -> TuneOutcome:
    cfg = load_config(study_toml)
    study = Study(cfg)
    try:
        return tune(study, endpoints, FarmSettings.from_config(cfg.evaluation), on_progress=on_progress)
    finally:
        study.close()


def _report(out: Path) -> dict[str, Any]:
    return json.loads((out / "report.json").read_text())


def _topk(out: Path) -> dict[tuple[str, str], np.ndarray]:
    con = sqlite3.connect(out / "tuneqn.db")
    rows = con.execute("select candidate_id, device, topk, num_samples, top_k from results where level = 'full'")
    return {(c, d): np.frombuffer(t, "<i4").reshape(n, k) for c, d, t, n, k in rows}


def _unfused_ort_top1(model: Path, data: np.ndarray) -> np.ndarray:
    """Top-1 of ONNX Runtime with graph optimizations off (the ONNX semantics of a QDQ model)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: data})[0]).argmax(1)


def _tvm_agent(tvm_lab: TvmLab, tvm_agent: Any, servers: int, shared_cache: bool = True) -> tuple[Any, str]:
    """An in-process TVM agent in front of ``servers`` new RPC servers; ``shared_cache``: the session's compile
    cache (the same candidates recur across these studies), else its own."""
    key = tvm_lab.new_key("android")
    started = tvm_lab.start_servers(key, servers)
    tvm_lab.wait_servers(key, servers)
    agent = tvm_agent(
        TvmSettings(tracker=("127.0.0.1", tvm_lab.port), key=key, request_timeout=60.0, poll_seconds=0.2),
        name="pixel",
        device_class="phone",
        shared_cache=shared_cache,
    )
    wait_for(lambda: len(agent.jobs.backends()) == servers, "a lane per server")
    return agent, started


def test_ort_and_tvm_agents_give_per_device_and_cross_device_fronts(
    tvm_lab: TvmLab, tvm_agent: Any, assets: Path, tmp_path: Path
) -> None:
    """feasibility = "report": everything is dispatched; QOperator candidates are infeasible on TVM."""
    agent, _ = _tvm_agent(tvm_lab, tvm_agent, 2, shared_cache=False)  # its results show compile times
    ort_agent = LocalAgent(tmp_path / "ort-agent", device_name="cpu", extra_args=["--device-class", "cpu"])
    try:
        # every other k of the sweep: each candidate is compiled for TVM (seconds each), and no claim here
        # needs every k (the adapted study below sweeps every k)
        outcome = _tune(
            _study(tmp_path, assets, "report", step=2),
            [Endpoint(address=ort_agent.start()), Endpoint(address=agent.address)],
        )
    finally:
        ort_agent.stop()
    out = tmp_path / "out"
    report = _report(out)
    cands = {c["id"]: c for c in report["candidates"]}
    assert outcome.failed == 0 and outcome.unreachable == 0, outcome.errors

    # TVM's predictions equal ONNX Runtime's: FP32 against the ORT agent's; QDQ against ONNX
    # Runtime without graph fusions. (The ORT agent runs QDQ Gemm/Conv as fused int8 kernels, whose
    # u8s8 products saturate on AVX2 CPUs without VNNI: on this model's logits they differ from
    # the ONNX semantics that TVM and unfused ORT compute.)
    topk = _topk(out)
    fp32 = "cnn:fp32"
    assert np.array_equal(topk[(fp32, "phone")][:, 0], topk[(fp32, "cpu")][:, 0])
    qdq = [cid for cid, c in cands.items() if c["recipe"] == "qdq" and c["level"] == "full"]
    assert qdq
    data = np.load(out / "data" / "cnn" / "eval.npy")
    for cid in qdq:
        tag = cid.rsplit(":", 1)[1]  # candidate files are candidates/<model>/<recipe>/<tag>.onnx
        reference = _unfused_ort_top1(out / "candidates" / "cnn" / "qdq" / f"{tag}.onnx", data)
        same = np.mean(topk[(cid, "phone")][:, 0] == reference)
        assert same >= 0.9, (cid, same)

    # QOperator: infeasible on the TVM device with the op types it cannot import, fine on ORT
    qop = [c for c in cands.values() if c["recipe"] == "qop" and c["level"] == "full"]
    assert qop
    fq = next(c for c in qop if c["id"] == "cnn:qop:fq")
    by_device = {r["device"]: r for r in fq["results"]}
    assert by_device["cpu"]["status"] == "done"
    assert by_device["phone"]["status"] == "infeasible"
    assert "QLinearConv" in by_device["phone"]["unsupported_ops"]
    listed = {e["device"]: e["candidates"] for e in report["infeasible_by_device"]}
    assert "cnn:qop:fq" in {c["candidate"] for c in listed["phone"]}
    assert "cpu" not in listed or not listed["cpu"]

    # TVM result details: untuned builds, compile time, which server ran them; both servers used
    phone_results = [
        r for c in cands.values() for r in c["results"] if r["device"] == "phone" and r["status"] == "done"
    ]
    assert all(r["backend"] == "tvm" and r["untuned"] for r in phone_results)
    assert any((r["compile_seconds"] or 0) > 0 for r in phone_results)
    assert len({r["executed_on"] for r in phone_results}) == 2
    devices = {d["name"]: d for d in report["devices"]}
    assert devices["phone"]["info"]["backend"] == "tvm"

    # fronts per device (QOperator only on cpu), and the cross-device front of the QDQ recipe
    fronts = {(f["recipe"], f["device"]): f for f in report["fronts"]}
    assert {("qdq", "cpu"), ("qdq", "phone"), ("qop", "cpu")} <= set(fronts)
    on_phone = {cid for front in fronts[("qdq", "phone")]["fronts"] for cid in front}
    assert on_phone and all(cid.startswith("cnn:qdq:") for cid in on_phone)
    cross = {c["recipe"]: c for c in report["cross_device"]}
    assert set(cross["qdq"]["devices"]) == {"cpu", "phone"} and cross["qdq"]["fronts"][0]


def test_adapted_tvm_device_gets_a_full_sweep_and_a_killed_server_loses_no_job(
    tvm_lab: TvmLab, tvm_agent: Any, assets: Path, tmp_path: Path
) -> None:
    """feasibility = "adapt": the TVM device runs qop.qdq instead of qop, every k of its sweep;
    one of its two RPC servers is killed while the study runs, and no job is lost."""
    agent, servers = _tvm_agent(tvm_lab, tvm_agent, 2)
    killed: list[int] = []

    def progress(counts: dict[str, int], total: int) -> None:
        if not killed and counts.get("done", 0) >= 3:
            killed.append(1)
            servers[0].kill(signal.SIGKILL)  # the phone's RPC app dies mid-study

    outcome = _tune(_study(tmp_path, assets, "adapt"), [Endpoint(address=agent.address)], on_progress=progress)
    assert killed
    assert outcome.failed == 0 and outcome.unreachable == 0 and outcome.infeasible == 0, outcome.errors
    report = _report(tmp_path / "out")
    decisions = {d["recipe"]: d for d in report["feasibility"] if d["device"] == "phone"}
    assert decisions["qop"]["planned"] == "qop.qdq" and decisions["qop"]["status"] == "adapted"
    assert "QLinearConv" in decisions["qop"]["unsupported"]
    assert decisions["qdq"]["status"] == "feasible"
    cands = [c for c in report["candidates"] if c["level"] == "full"]
    # the paper's sweep on the variant is complete: every k from 0 to the number of layers
    variant = sorted(c["k"] for c in cands if c["recipe"] == "qop.qdq")
    base = sorted(c["k"] for c in cands if c["recipe"] == "qdq")
    assert variant and variant == base == list(range(len(base)))
    # the base recipe runs on no device of this study: its candidates were built, never dispatched
    assert all(not c["results"] for c in cands if c["recipe"] == "qop")
    for c in cands:
        if c["recipe"] != "qop":
            assert [r["status"] for r in c["results"]] == ["done"], (c["id"], c["results"])


def test_target_answer_across_a_recipe_split_between_ort_and_tvm(
    tvm_lab: TvmLab, tvm_agent: Any, assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """feasibility = "adapt" splits the QOperator recipe: `qop` on the ORT agent's cpu, `qop.qdq` on the TVM
    phone, so no candidate has results on both. The target search's answer and the cross-device pick are
    then one candidate per part, each meeting the loss on its devices (main: ``id: None``, no pick)."""
    agent, _ = _tvm_agent(tvm_lab, tvm_agent, 1)
    ort_agent = LocalAgent(tmp_path / "ort-agent", device_name="cpu", extra_args=["--device-class", "cpu"])
    study = write_study(
        tmp_path,
        model=assets / "cnn.onnx",
        images=assets / "images",
        quantization={"recipes": [{"name": "qop", "format": "qoperator"}]},
        search={"strategy": "target", "ranking": "paper", "max_loss": 0.25},
        evaluation={**FAST, "feasibility": "adapt"},
    )
    try:
        outcome = _tune(study, [Endpoint(address=ort_agent.start()), Endpoint(address=agent.address)])
    finally:
        ort_agent.stop()
    assert outcome.failed == 0 and outcome.unreachable == 0 and outcome.infeasible == 0, outcome.errors
    report = _report(tmp_path / "out")
    (decision,) = [d for d in report["feasibility"] if d["device"] == "phone"]
    assert (decision["recipe"], decision["planned"]) == ("qop", "qop.qdq")
    cands = {c["id"]: c for c in report["candidates"]}
    assert not any({r["device"] for r in c["results"]} == {"cpu", "phone"} for c in cands.values())

    (search,) = [s for s in report["searches"] if s["strategy"] == "target"]
    target = search["target"]
    assert target is not None and target["id"] is not None
    parts = {p["recipe"]: p for p in target["parts"]}
    assert set(parts) == {"qop", "qop.qdq"}
    assert parts["qop"]["devices"] == ["cpu"] and parts["qop.qdq"]["devices"] == ["phone"]
    for p in parts.values():
        (r,) = cands[p["id"]]["results"]
        assert r["device"] == p["devices"][0] and 1.0 - r["agreement"] <= 0.25 + 1e-9
    assert target["size_bytes"] == max(p["size_bytes"] for p in parts.values())
    by_device = {d["device"]: d for d in target["devices"]}
    assert by_device["cpu"]["recipe"] == "qop" and by_device["phone"]["recipe"] == "qop.qdq"

    (cross,) = [p for p in report["answer"]["picks"] if p["scope"] == "cross-device"]
    assert cross["candidate"] is not None and cross["met"] is True
    assert {p["recipe"]: p["devices"] for p in cross["parts"]} == {"qop": ["cpu"], "qop.qdq": ["phone"]}
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert all(p["file"] in html and p["export_command"] in html for p in cross["parts"])
    assert f"cpu: {parts['qop']['label']} [qop]" in html and f"phone: {parts['qop.qdq']['label']} [qop.qdq]" in html
    # one file per part: export names them instead of writing one; each part's command writes its file
    assert main(["export", str(tmp_path / "out"), "--best", "--cross-device", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "one file per device group" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()
    part = parts["qop.qdq"]["id"]
    assert main(["export", str(tmp_path / "out"), "--candidate", part, "-o", str(tmp_path / "phone.onnx")]) == 0
    assert (tmp_path / "phone.onnx").exists()
