"""Devices as a TVM agent reports them, with real ORT agents doing the work: feasibility planning
(supported op types), devices joining and leaving, unhealthy devices, compile-ahead, ``tuneqn agents``.

A real gRPC proxy (``agent_proxy.DeviceProxy``) in front of a real ORT agent changes only what
``GetInfo`` says about the devices (what an ORT agent cannot report); every job really runs on
the agent; the controller's store is a real SQLite file.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import onnx
import pytest
from agent_proxy import DeviceProxy, with_fields
from helpers import exported_sha256, write_study
from studies import FAST, agent_executions, local_agent, run_bounded

from tuneqn.controller.farm.jobs import Endpoint
from tuneqn.v1 import agent_pb2 as pb

STANDARD_OPS = frozenset(s.name for s in onnx.defs.get_all_schemas() if s.domain == "")
#: Like TVM 0.27's ONNX frontend: no QLinearConv, no ConvInteger (nor any com.microsoft op).
NO_QLINEARCONV_NO_CONVINTEGER = STANDARD_OPS - {"QLinearConv", "ConvInteger"}
RECIPES = [{"name": "qop", "format": "qoperator"}, {"name": "dyn", "mode": "dynamic"}]


def _rows(db: Path, sql: str, args: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as con:
        return con.execute(sql, args or []).fetchall()


def _restricted(devices: list[pb.Device]) -> list[pb.Device]:
    return [with_fields(d, supported_ops=NO_QLINEARCONV_NO_CONVINTEGER) for d in devices]


@pytest.mark.heavy
def test_adapt_plans_a_variant_per_device_and_sweeps_it_completely(tmp_path: Path, assets: Path) -> None:
    """A device without QLinearConv gets the QOperator recipe as QDQ, one without ConvInteger the dynamic
    recipe with Conv left in float; the other device runs the recipes themselves; the sweep over each
    variant is complete on its device; a rerun reuses the decisions and runs nothing again."""
    study = write_study(
        tmp_path,
        model=assets / "cnn.onnx",
        images=assets / "images",
        evaluation=FAST,
        quantization={"recipes": RECIPES},
    )
    db = tmp_path / "out" / "tuneqn.db"
    with (
        local_agent(tmp_path, "cpu", "cpu", "0") as cpu,
        local_agent(tmp_path, "phone", "phone", "0") as phone,
        DeviceProxy(phone.address, _restricted) as proxy,
    ):
        endpoints = [Endpoint(address=cpu.address), Endpoint(address=proxy.address)]
        outcome = run_bounded(240, study, endpoints)
        assert outcome.failed == outcome.infeasible == outcome.unreachable == 0
        assert outcome.done == outcome.total
        runs = (len(agent_executions(cpu)), len(agent_executions(phone)))
        decisions = _rows(
            db,
            "select model, recipe, device_class, planned, status, unsupported, created_at "
            "from feasibility order by recipe",
        )
        # resumed: same decisions (not decided again), nothing runs again
        again = run_bounded(240, study, endpoints)
        assert again.done == outcome.done and again.failed == 0
        assert (len(agent_executions(cpu)), len(agent_executions(phone))) == runs
        assert (
            _rows(
                db,
                "select model, recipe, device_class, planned, status, unsupported, created_at "
                "from feasibility order by recipe",
            )
            == decisions
        )
    assert [(r[1], r[2], r[3], r[4]) for r in decisions] == [
        ("dyn", "phone", "dyn.float-Conv", "adapted"),
        ("qop", "phone", "qop.qdq", "adapted"),
    ]
    assert json.loads(decisions[0][5]) == ["ConvInteger"]
    assert "QLinearConv" in json.loads(decisions[1][5])
    recipes_on = {
        dev: {
            r[0]
            for r in _rows(
                db, "select c.mode from jobs j join candidates c on c.id = j.candidate_id where j.device = ?", [dev]
            )
        }
        for dev in ("cpu", "phone")
    }
    assert recipes_on == {"cpu": {"fp32", "qop", "dyn"}, "phone": {"fp32", "qop.qdq", "dyn.float-Conv"}}
    # the sweep of every recipe is complete on the devices it runs on: every k of its ranking, done there
    for recipe, device, layers in (
        ("qop", "cpu", 5),
        ("dyn", "cpu", 5),
        ("qop.qdq", "phone", 5),
        ("dyn.float-Conv", "phone", 1),
    ):
        proposed = {
            r[0]
            for r in _rows(
                db,
                "select candidate_id from proposals where search = 'sweep/paper' and mode = ? and level = 'full'",
                [recipe],
            )
        }
        done = {r[0] for r in _rows(db, "select candidate_id from jobs where device = ? and state = 'done'", [device])}
        assert len(proposed) == layers + 1 and proposed <= done, recipe
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    texts = [f["text"] for f in report["feasibility"]]
    assert "phone: dyn → dyn.float-Conv: ConvInteger unsupported" in texts
    assert any(t.startswith("phone: qop → qop.qdq: ") and "QLinearConv" in t for t in texts)
    for c in report["candidates"]:
        assert {r["device"] for r in c["results"]} == ({"phone"} if "." in c["recipe"] else {"cpu"})
    assert {(f["recipe"], f["device"]) for f in report["fronts"] if f["fronts"]} == {
        ("qop", "cpu"),
        ("dyn", "cpu"),
        ("qop.qdq", "phone"),
        ("dyn.float-Conv", "phone"),
    }
    assert {(a["recipe"], a["device"]) for a in report["ablation"] if a["model"]} == {
        ("qop", "cpu"),
        ("dyn", "cpu"),
        ("qop.qdq", "phone"),
        ("dyn.float-Conv", "phone"),
    }
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Feasibility planning" in html and "qop → qop.qdq" in html
    # a variant's candidates export like any recipe's (bit-identical to the stored one)
    from tuneqn.controller.cli import main

    out = tmp_path / "variant-fq.onnx"
    assert (
        main(["export", str(tmp_path / "out"), "--recipe", "dyn.float-Conv", "--candidate", "1", "-o", str(out)]) == 0
    )
    stored = _rows(db, "select sha256 from candidates where mode = 'dyn.float-Conv' and k = 1")
    assert stored == [(exported_sha256(out),)]


@pytest.mark.heavy
def test_the_default_search_screens_and_evaluates_variants_on_their_device_only(tmp_path: Path, assets: Path) -> None:
    """budget/measured: screens (whose sample is chosen from the fully quantized model's results on the classes
    the recipe runs on) and full evaluations of a variant run on its device; the base recipe's on the other."""
    study = write_study(
        tmp_path,
        model=assets / "cnn.onnx",
        images=assets / "images",
        evaluation=FAST,
        quantization={"recipes": RECIPES},
        search={"strategy": "budget", "ranking": "measured"},
    )
    with (
        local_agent(tmp_path, "cpu", "cpu", "0") as cpu,
        local_agent(tmp_path, "phone", "phone", "0") as phone,
        DeviceProxy(phone.address, _restricted) as proxy,
    ):
        outcome = run_bounded(240, study, [Endpoint(address=cpu.address), Endpoint(address=proxy.address)])
    assert outcome.failed == 0 and outcome.done == outcome.total
    db = tmp_path / "out" / "tuneqn.db"
    rows = _rows(
        db,
        "select c.mode, j.level, group_concat(distinct j.device) from jobs j "
        "join candidates c on c.id = j.candidate_id group by 1, 2",
    )
    where = {(r[0], r[1]): r[2] for r in rows}
    assert where == {
        ("fp32", "full"): "cpu,phone" if where[("fp32", "full")].startswith("cpu") else "phone,cpu",
        ("qop", "full"): "cpu",
        ("qop", "screen"): "cpu",
        ("dyn", "full"): "cpu",
        ("dyn", "screen"): "cpu",
        ("qop.qdq", "full"): "phone",
        ("qop.qdq", "screen"): "phone",
        ("dyn.float-Conv", "full"): "phone",
        ("dyn.float-Conv", "screen"): "phone",
    }
    splits = {r[0] for r in _rows(db, "select split from datasets")}
    assert splits >= {"cnn/screen/qop.qdq", "cnn/screen/dyn.float-Conv"}


@pytest.mark.heavy
def test_a_recipe_no_variant_fixes_is_kept_and_the_report_says_so(tmp_path: Path, assets: Path) -> None:
    """No DynamicQuantizeLinear on the device: nothing can be left in float to avoid it, so the dynamic
    recipe stays planned there (a TVM agent then answers infeasible; this ORT agent runs it)."""

    def no_dql(devices: list[pb.Device]) -> list[pb.Device]:
        return [with_fields(d, supported_ops=STANDARD_OPS - {"DynamicQuantizeLinear"}) for d in devices]

    study = write_study(
        tmp_path,
        model=assets / "cnn.onnx",
        images=assets / "images",
        evaluation=FAST,
        quantization={"recipes": RECIPES[1:]},
    )
    with local_agent(tmp_path, "phone", "phone", "0") as phone, DeviceProxy(phone.address, no_dql) as proxy:
        outcome = run_bounded(240, study, [Endpoint(address=proxy.address)])
    assert outcome.failed == 0 and outcome.done == outcome.total == 7
    db = tmp_path / "out" / "tuneqn.db"
    assert _rows(db, "select recipe, planned, status, unsupported from feasibility") == [
        ("dyn", "dyn", "gave-up", '["DynamicQuantizeLinear"]')
    ]
    (entry,) = json.loads((tmp_path / "out" / "report.json").read_text())["feasibility"]
    assert entry["text"].startswith("phone: dyn kept, no variant runs there")
    assert "DynamicQuantizeLinear" in entry["text"]


@pytest.mark.heavy
def test_report_mode_dispatches_everything(tmp_path: Path, assets: Path) -> None:
    study = write_study(
        tmp_path,
        model=assets / "cnn.onnx",
        images=assets / "images",
        evaluation={**FAST, "feasibility": "report"},
        quantization={"recipes": RECIPES[:1]},
    )
    db = tmp_path / "out" / "tuneqn.db"
    with local_agent(tmp_path, "phone", "phone", "0") as phone, DeviceProxy(phone.address, _restricted) as proxy:
        outcome = run_bounded(240, study, [Endpoint(address=proxy.address)])
    # an ORT agent runs QLinearConv fine; a TVM agent would have answered infeasible (the lead's test)
    assert outcome.failed == 0 and outcome.done == outcome.total == 7
    assert _rows(db, "select count(*) from feasibility") == [(0,)]
    assert {r[0] for r in _rows(db, "select c.mode from jobs j join candidates c on c.id = j.candidate_id")} == {
        "fp32",
        "qop",
    }


def _two_device_agent(tmp: Path, sim_ms: float) -> Any:
    from tuneqn.agent.backends.ort import OrtBackend
    from tuneqn.agent.config import AgentConfig
    from tuneqn.agent.server import AgentServer

    backends = [OrtBackend(f"phone{i}", "phones", simulated_latency_ms_per_sample=sim_ms) for i in (1, 2)]
    server = AgentServer(AgentConfig(state_dir=tmp / "agent"), backends)
    server.start()
    return server


@pytest.mark.heavy
def test_unhealthy_device_takes_no_job(tmp_path: Path, assets: Path) -> None:
    def phone1_unhealthy(devices: list[pb.Device]) -> list[pb.Device]:
        return [
            with_fields(d, healthy=False, status="waiting for a free device of key pixel") if d.name == "phone1" else d
            for d in devices
        ]

    server = _two_device_agent(tmp_path, 0.0)
    try:
        with DeviceProxy(server.address, phone1_unhealthy) as proxy:
            study = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images", evaluation=FAST)
            outcome = run_bounded(120, study, [Endpoint(address=proxy.address)], info_poll_s=0.2)
    finally:
        server.stop()
    assert outcome.failed == 0 and outcome.done == outcome.total == 7
    holders = {r[0] for r in _rows(tmp_path / "out" / "tuneqn.db", "select agent from results")}
    assert holders == {f"{proxy.address}#phone2"}


@pytest.mark.heavy
def test_devices_that_appear_get_slots_and_vanished_ones_take_no_more_jobs(tmp_path: Path, assets: Path) -> None:
    """Phones joining and leaving a tracker: GetInfo (polled) first lists phone1 only; after the first result
    phone2 appears and phone1 is gone: phone2 gets a slot, phone1 takes no job after the controller saw it."""
    shown = {"phone1"}
    server = _two_device_agent(tmp_path, 40.0)
    db = tmp_path / "out" / "tuneqn.db"
    seen_gone: list[set[str]] = []

    def switch(counts: dict[str, int], total: int) -> None:
        if not seen_gone and counts.get("done", 0) >= 1:
            shown.clear()
            shown.add("phone2")
            start = proxy.info_calls
            proxy.wait_info_calls(start + 2)  # the controller has applied a GetInfo without phone1
            seen_gone.append(
                {r[0] for r in _rows(db, "select id from jobs where agent = ?", [f"{proxy.address}#phone1"])}
            )

    try:
        with DeviceProxy(server.address, lambda devices: [d for d in devices if d.name in shown]) as proxy:
            outcome = run_bounded(
                120,
                write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images", evaluation=FAST),
                [Endpoint(address=proxy.address)],
                switch,
                info_poll_s=0.2,
            )
    finally:
        server.stop()
    assert seen_gone and outcome.failed == 0 and outcome.done == outcome.total == 7
    by_holder: dict[str, set[str]] = {}
    for jid, holder in _rows(db, "select job_id, agent from results"):
        by_holder.setdefault(holder.rsplit("#", 1)[1], set()).add(jid)
    assert by_holder.get("phone2") and by_holder.get("phone1")
    assert by_holder["phone1"] <= seen_gone[0]  # nothing leased to phone1 once it was gone


@pytest.mark.heavy
def test_compile_ahead_submits_the_next_job_while_one_runs(tmp_path: Path, assets: Path) -> None:
    """A device with the compile-ahead capability is handed its next job while the current one runs; the
    queued job's lease is renewed meanwhile (a lease shorter than a job), and every job runs once."""

    def compile_ahead(devices: list[pb.Device]) -> list[pb.Device]:
        return [with_fields(d, capabilities=[*d.capabilities, "compile-ahead"]) for d in devices]

    study = write_study(
        tmp_path,
        model=assets / "cnn.onnx",
        images=assets / "images",
        evaluation={**FAST, "lease_timeout_s": 1.0, "heartbeat_s": 0.25},
    )
    with local_agent(tmp_path, "phone", "phone", "120") as agent, DeviceProxy(agent.address, compile_ahead) as proxy:
        outcome = run_bounded(180, study, [Endpoint(address=proxy.address)])
        runs = agent_executions(agent)
    assert outcome.failed == 0 and outcome.done == outcome.total == 7
    assert len(runs) == len(set(runs)) == 7  # each job executed once
    db = tmp_path / "out" / "tuneqn.db"
    assert _rows(db, "select max(attempts), count(error) from jobs") == [(1, 0)]  # no lease ran out
    # the agent received some job while another one was running on the device
    agent_db = agent.state_dir / "agent.db"
    overlaps = _rows(
        agent_db,
        "select count(*) from jobs b join executions a on a.job_id != b.job_id "
        "where a.started < b.created and b.created < a.finished",
    )
    assert overlaps[0][0] >= 1


def test_agents_command_shows_device_backend_target_key_remote_and_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tuneqn.controller.cli import main

    def tvm_like(devices: list[pb.Device]) -> list[pb.Device]:
        return [
            with_fields(
                d,
                backend="tvm",
                target='{"kind": "llvm"}',
                rpc_key="pixel",
                remote="tracker 127.0.0.1:9190",
                remote_servers=2,
                healthy=False,
                status="waiting for a free device",
            )
            for d in devices
        ]

    with local_agent(tmp_path, "phone", "phone", "0") as agent, DeviceProxy(agent.address, tvm_like) as proxy:
        rc = main(["agents", "--agent", proxy.address])
    out = capsys.readouterr().out
    assert rc == 0
    for text in ("phone", "tvm", "llvm", "pixel", "tracker", "9190", "UNHEALTHY", "waiting for a free", "serving"):
        assert text in out, text


@pytest.mark.heavy
@pytest.mark.parametrize("strategy", ["budget", "greedy", "target"])
def test_a_class_whose_fp32_reference_failed_for_good_does_not_stall_a_search(
    tmp_path: Path, assets: Path, strategy: str
) -> None:
    """The FP32 job of one class ends failed (the agent refuses it): its candidates can never get an agreement
    there, so the searches treat that class as failed for them and the study ends instead of waiting."""
    import grpc

    from tuneqn.controller.config import load_config
    from tuneqn.controller.study import Study

    search: dict[str, Any] = {"strategy": strategy, "ranking": "paper"}
    search.update({"budget": {"budget": 3}, "target": {"max_loss": 0.05}}.get(strategy, {}))
    study = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images", evaluation=FAST, search=search)
    prepared = Study(load_config(study))
    try:
        prepared.prepare()
        fp32 = next(iter(prepared.models.values())).sha256
    finally:
        prepared.close()
    with (
        local_agent(tmp_path, "cpu", "cpu", "0") as cpu,
        local_agent(tmp_path, "phone", "phone", "0") as phone,
        DeviceProxy(phone.address) as proxy,
    ):
        proxy.refuse_submit = lambda spec: (
            (grpc.StatusCode.INVALID_ARGUMENT, "refused by the test") if spec.model_sha256 == fp32 else None
        )
        outcome = run_bounded(120, study, [Endpoint(address=cpu.address), Endpoint(address=proxy.address)])
    assert outcome.failed == 1 and outcome.done >= 3  # FP32 on the phone only; the cpu's search ran
    searches = {s["name"]: s for s in json.loads((tmp_path / "out" / "report.json").read_text())["searches"]}
    assert searches and all(s["finished_at"] is not None for s in searches.values())
