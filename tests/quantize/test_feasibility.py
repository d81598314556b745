"""Device feasibility: variant recipes, infeasible jobs on the board and in the report, TVM job options,
compile-ahead leasing. Real SQLite stores, real quantizer builds, real JobResult protos."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import onnx
import pytest
from helpers import write_study

from tuneqn.controller.common.errors import UserError
from tuneqn.controller.config import QuantizationSpec, load_config, variant_name
from tuneqn.controller.farm.board import JobBoard
from tuneqn.controller.farm.jobs import FarmSettings, JobPlan, make_job
from tuneqn.controller.quantize.feasibility import (
    QUANTIZED_TO_FLOAT,
    float_ops_of,
    model_op_types,
    next_recipe,
    unsupported,
)
from tuneqn.controller.quantize.quantizer import QuantSettings, default_op_types
from tuneqn.controller.report import compute_report, write_full_report
from tuneqn.controller.report.base import is_partial
from tuneqn.controller.store import FINAL_JOB_STATES, Store
from tuneqn.controller.study import Study
from tuneqn.v1 import agent_pb2 as pb

#: Every op type of the standard ONNX domain: what the test devices start from.
STANDARD_OPS = frozenset(s.name for s in onnx.defs.get_all_schemas() if s.domain == "")

RECIPES = [{"name": "qop", "format": "qoperator"}, {"name": "dyn", "mode": "dynamic"}]


def _study(tmp: Path, assets: Path, **extra: Any) -> Path:
    return write_study(
        tmp, model=assets / "cnn.onnx", images=assets / "images", quantization={"recipes": RECIPES}, **extra
    )


# ---------------------------------------------------------------------------- config and recipes


def test_variant_recipe_names_resolve_to_the_changed_settings() -> None:
    q = QuantizationSpec(recipes=[{"name": "qop", "format": "qoperator"}, {"name": "dyn", "mode": "dynamic"}])
    assert variant_name("qop", qdq=True) == "qop.qdq"
    assert variant_name("dyn", float_ops=["MatMul", "Conv"]) == "dyn.float-Conv-MatMul"
    qdq = q.resolve("qop.qdq")
    assert (qdq.name, qdq.mode, qdq.format) == ("qop.qdq", "static", "qdq")
    chained = QuantSettings.from_spec(q, "qop.qdq.float-Conv")
    assert chained.format == "qdq" and "Conv" not in (chained.op_types or ())
    assert set(chained.op_types or ()) == set(default_op_types("static")) - {"Conv"}
    dyn = QuantSettings.from_spec(q, "dyn.float-Conv")
    assert dyn.mode == "dynamic" and set(dyn.op_types or ()) == set(default_op_types("dynamic")) - {"Conv"}
    # the base recipe's settings (and so its calibration and candidates) do not change
    assert QuantSettings.from_spec(q, "qop").op_types is None
    for bad, says in (
        ("dyn.qdq", "only static recipes"),
        ("qop.bogus", "variants end in"),
        ("nope.qdq", "unknown recipe 'nope'"),
    ):
        with pytest.raises(ValueError, match=says):
            q.resolve(bad)


def test_feasibility_option_is_validated_in_one_line(tmp_path: Path, assets: Path) -> None:
    study = write_study(
        tmp_path, model=assets / "cnn.onnx", images=assets / "images", evaluation={"feasibility": "sometimes"}
    )
    with pytest.raises(UserError) as err:
        load_config(study)
    assert str(err.value) == "evaluation.feasibility: expected one of 'adapt', 'report'"
    study = write_study(
        tmp_path, model=assets / "cnn.onnx", images=assets / "images", evaluation={"tvm_latency_number": 0}
    )
    with pytest.raises(UserError, match=r"^evaluation.tvm_latency_number: "):
        load_config(study)
    assert load_config(_study(tmp_path, assets)).evaluation.feasibility == "adapt"


def test_tvm_study_options_fill_the_job_spec(tmp_path: Path, assets: Path) -> None:
    cfg = load_config(
        write_study(
            tmp_path,
            model=assets / "cnn.onnx",
            images=assets / "images",
            evaluation={
                "tvm_tuning_trials": 64,
                "tvm_latency_number": 5,
                "tvm_min_repeat_ms": 200,
                "tvm_cooldown_ms": 10,
            },
        )
    )
    settings = FarmSettings.from_config(cfg.evaluation)
    plan = make_job(
        "m:static:fq",
        "phone",
        tmp_path / "m.onnx",
        "c" * 64,
        tmp_path / "d.npy",
        "d" * 64,
        "x",
        {"ort_disabled_optimizers": ["WeightBiasQuantization"]},
        settings,
        tuning_group="f" * 64,
    )
    tvm = plan.spec.backend_options.tvm
    assert (
        tvm.tuning_trials,
        tvm.tuning_group,
        tvm.latency_number,
        tvm.latency_min_repeat_ms,
        tvm.latency_cooldown_ms,
    ) == (64, "f" * 64, 5, 200, 10)
    assert list(plan.spec.backend_options.ort.disabled_optimizers) == ["WeightBiasQuantization"]
    default = FarmSettings.from_config(load_config(_study(tmp_path, assets)).evaluation)
    other = make_job(
        "m:static:fq",
        "phone",
        tmp_path / "m.onnx",
        "c" * 64,
        tmp_path / "d.npy",
        "d" * 64,
        "x",
        {"ort_disabled_optimizers": ["WeightBiasQuantization"]},
        default,
        tuning_group="f" * 64,
    )
    assert other.spec.backend_options.tvm.latency_number == 1 and other.id != plan.id  # the id covers the spec


def test_variants_for_devices_without_qlinearconv_or_convinteger(tmp_path: Path, assets: Path) -> None:
    """QOperator → QDQ where QuantizeLinear/DequantizeLinear run; dynamic → Conv left in float; and giving up
    when nothing left to change helps. Each step checks the built fully quantized candidate's op types."""
    study = Study(load_config(_study(tmp_path, assets)))
    try:
        study.prepare()
        fp32 = study.models["cnn"].path

        def fq(recipe: str) -> Path:
            return Path(study.build(study.make_plan("cnn", recipe, ()))["path"])

        no_qlinearconv = STANDARD_OPS - {"QLinearConv"}
        ops = model_op_types(fq("qop"))
        bad = unsupported(ops, no_qlinearconv)
        assert "QLinearConv" in bad and "QuantizeLinear" in ops
        nxt = next_recipe(study.cfg.quantization, "qop", bad, no_qlinearconv, fq("qop"), fp32)
        assert nxt == "qop.qdq"
        assert unsupported(model_op_types(fq(nxt)), no_qlinearconv) == []

        no_convinteger = STANDARD_OPS - {"ConvInteger"}
        bad = unsupported(model_op_types(fq("dyn")), no_convinteger)
        assert bad == ["ConvInteger"]
        floats, unfixable = float_ops_of(bad, fq("dyn"), fp32)
        assert floats == {"Conv"} and unfixable == []
        nxt = next_recipe(study.cfg.quantization, "dyn", bad, no_convinteger, fq("dyn"), fp32)
        assert nxt == "dyn.float-Conv"
        variant_ops = model_op_types(fq(nxt))
        assert unsupported(variant_ops, no_convinteger) == [] and "MatMulInteger" in variant_ops

        # no QDQ form (no DequantizeLinear): the quantized ops' float op types stay float, checked again
        neither = STANDARD_OPS - {"QLinearConv", "DequantizeLinear"}
        bad = unsupported(model_op_types(fq("qop")), neither)
        assert bad == ["DequantizeLinear", "QGemm", "QLinearConv", "QLinearGlobalAveragePool"]
        nxt = next_recipe(study.cfg.quantization, "qop", bad, neither, fq("qop"), fp32)
        assert nxt == "qop.float-Conv-Gemm-GlobalAveragePool"
        assert unsupported(model_op_types(fq(nxt)), neither) == []
        # an unsupported op that is no quantized layer (DynamicQuantizeLinear) leaves nothing to change: give up
        no_dql = STANDARD_OPS - {"DynamicQuantizeLinear"}
        bad = unsupported(model_op_types(fq("dyn")), no_dql)
        assert bad == ["DynamicQuantizeLinear"]
        assert float_ops_of(bad, fq("dyn"), fp32) == (set(), ["DynamicQuantizeLinear"])
        assert next_recipe(study.cfg.quantization, "dyn", bad, no_dql, fq("dyn"), fp32) is None
    finally:
        study.close()
    assert set(QUANTIZED_TO_FLOAT.values()) <= {
        "Conv",
        "MatMul",
        "Gemm",
        "Add",
        "Mul",
        "Concat",
        "GlobalAveragePool",
        "AveragePool",
        "Sigmoid",
        "LeakyRelu",
        "Softmax",
        "Where",
        "Attention",
    }


# ---------------------------------------------------------------------------- infeasible jobs


def _plan(tmp: Path, cid: str = "net:static:fq", device: str = "phone") -> JobPlan:
    sha = hashlib.sha256(cid.encode()).hexdigest()  # each candidate its own file
    return make_job(cid, device, tmp / "c.onnx", sha, tmp / "d.npy", "d" * 64, "x", {}, FarmSettings())


def _infeasible_result(plan: JobPlan) -> pb.JobResult:
    return pb.JobResult(
        job_id=plan.id,
        device="phone.0",
        device_class="phone",
        agent_id="a",
        state=pb.FAILED,
        error="TVM cannot import the model: QLinearConv, QGemm",
        infeasible=True,
        unsupported_ops=["QLinearConv", "QGemm"],
        attempt=1,
    )


def test_an_infeasible_result_ends_the_job_for_good(tmp_path: Path) -> None:
    store = Store(tmp_path / "tuneqn.db")
    finals: list[str] = []
    board = JobBoard(store, FarmSettings(max_attempts=3), on_final=finals.append)
    plan = _plan(tmp_path)
    assert board.add(plan) == "pending"
    job = board.take("phone", "127.0.0.1:1#phone.0", timeout=0)
    assert job is not None and job[0].id == plan.id
    assert board.record(plan, "127.0.0.1:1#phone.0", _infeasible_result(plan), "tvm") == "infeasible"
    row = store.job(plan.id)
    assert row is not None and row["state"] == "infeasible" and "infeasible" in FINAL_JOB_STATES
    assert json.loads(row["unsupported_ops"]) == ["QGemm", "QLinearConv"]
    assert row["error"] == "TVM cannot import the model: QLinearConv, QGemm"
    assert finals == [plan.id] and board.counts() == {"infeasible": 1}
    board.close()
    assert board.finished() and not is_partial(store)
    # a rerun of the study (same job id) does not retry it, unlike a failed job
    failed = _plan(tmp_path, "net:static:x0123456789")
    again = JobBoard(store, FarmSettings(max_attempts=1))
    again.add(failed)
    assert again.take("phone", "h#d", timeout=0) is not None
    assert again.record(failed, "h#d", pb.JobResult(job_id=failed.id, state=pb.FAILED, error="boom"), "ort") == "failed"
    rerun = JobBoard(store, FarmSettings())
    assert rerun.add(plan) == "infeasible"
    assert rerun.add(failed) == "pending"
    assert rerun.take("phone", "h#d", timeout=0)[0].id == failed.id  # type: ignore[index]
    assert rerun.take("phone", "h#d", timeout=0) is None
    store.close()


def test_a_result_for_a_job_leased_elsewhere_changes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "tuneqn.db")
    board = JobBoard(store, FarmSettings())
    plan = _plan(tmp_path)
    board.add(plan)
    board.take("phone", "a#1", timeout=0)
    assert board.record(plan, "b#2", _infeasible_result(plan)) == "submitted"
    assert store.job(plan.id)["state"] == "submitted"  # type: ignore[index]
    store.close()


# ---------------------------------------------------------------------------- compile-ahead leasing


def test_take_ahead_only_when_more_jobs_wait_than_idle_slots(tmp_path: Path) -> None:
    store = Store(tmp_path / "tuneqn.db")
    board = JobBoard(store, FarmSettings())
    taken: list[Any] = []
    idle = threading.Thread(target=lambda: taken.append(board.take("phone", "agent#idle", timeout=30)))
    idle.start()
    deadline = time.monotonic() + 30
    while board.waiting("phone") < 1:
        assert time.monotonic() < deadline, "the idle slot never waited"
        time.sleep(0.01)  # waiting for the other thread to block in take()
    first, second = _plan(tmp_path, "net:static:xa"), _plan(tmp_path, "net:static:xb")
    with board.cond:  # the idle slot cannot take anything while we hold the board
        board.add(first)
        assert board.take_ahead("phone", "agent#busy") is None  # one job, one idle slot: it is the slot's
        board.add(second)
        ahead = board.take_ahead("phone", "agent#busy")
        assert ahead is not None and ahead[0].id == first.id and ahead[1] == 1
    idle.join(30)
    assert taken and taken[0] is not None and taken[0][0].id == second.id
    assert {r["id"]: r["agent"] for r in store.jobs()} == {first.id: "agent#busy", second.id: "agent#idle"}
    assert board.take_ahead("phone", "agent#busy") is None  # nothing pending
    store.close()


# ---------------------------------------------------------------------------- report


def test_report_lists_infeasible_candidates_per_device_and_keeps_them_off_fronts(tmp_path: Path) -> None:
    import numpy as np
    from report_store import add_candidate, add_device, add_eval_split, add_model, add_result, open_store, predictions

    store = open_store(tmp_path, objectives=[{"name": "accuracy_loss"}, {"name": "size"}, {"name": "latency"}])
    add_model(store)
    add_eval_split(store, [1, 2, 3, 4])
    add_device(store, "cpu")
    store.put_device(
        "phone",
        "phone",
        {
            "backend": "tvm",
            "target": '{"kind": "llvm"}',
            "rpc_key": "pixel",
            "remote": "tracker 127.0.0.1:9190",
            "remote_servers": 2,
            "tvm_version": "0.27.0",
            "supported_ops": 164,
        },
    )
    rng = np.random.default_rng(0)
    base = predictions(4, rng)
    fq, k1 = add_candidate(store, k=0), add_candidate(store, k=1)
    for dev in ("cpu", "phone"):
        add_result(store, "net:fp32", dev, base)
    add_result(store, fq, "cpu", base)
    add_result(store, k1, "cpu", base)
    tvm = {
        "backend": "tvm",
        "tuned": False,
        "compile_seconds": 4.25,
        "tuning_seconds": 0.0,
        "compile_cache_hit": False,
        "executed_on": "127.0.0.1:9091",
    }
    add_result(store, k1, "phone", base, latency=(230.0, 229.0, 235.0), seconds=10.0, info=tvm)
    board = JobBoard(store, FarmSettings())
    plan = make_job(fq, "phone", tmp_path / "c.onnx", "c" * 64, tmp_path / "d.npy", "d" * 64, "x", {}, FarmSettings())
    board.add(plan)
    board.take("phone", "a#phone.0", timeout=0)
    board.record(plan, "a#phone.0", _infeasible_result(plan), "tvm")
    from tuneqn.controller import accuracy

    accuracy.backfill(store)
    report = compute_report(store)
    (entry,) = report["infeasible_by_device"]
    assert entry["device"] == "phone"
    assert entry["candidates"] == [
        {
            "candidate": fq,
            "model": "net",
            "recipe": "static",
            "label": "k=0",
            "unsupported_ops": ["QGemm", "QLinearConv"],
            "error": "TVM cannot import the model: QLinearConv, QGemm",
        }
    ]
    res = next(r for c in report["candidates"] if c["id"] == fq for r in c["results"] if r["device"] == "phone")
    assert res["status"] == "infeasible" and res["front"] is None and res["feasible"] is False
    assert res["reason"] == "infeasible on this device: unsupported QGemm, QLinearConv"
    on_fronts = {cid for f in report["fronts"] for front in f["fronts"] for cid in front}
    on_phone = {cid for f in report["fronts"] if f["device"] == "phone" for front in f["fronts"] for cid in front}
    assert fq in on_fronts and fq not in on_phone  # on the cpu front, never on the phone's
    # how the TVM result was produced: compile time apart from device time, untuned latency
    tvm_res = next(r for c in report["candidates"] if c["id"] == k1 for r in c["results"] if r["device"] == "phone")
    assert (
        tvm_res["backend"],
        tvm_res["untuned"],
        tvm_res["compile_seconds"],
        tvm_res["device_seconds"],
        tvm_res["executed_on"],
    ) == ("tvm", True, 4.25, 5.75, "127.0.0.1:9091")
    cpu_res = next(r for c in report["candidates"] if c["id"] == k1 for r in c["results"] if r["device"] == "cpu")
    assert cpu_res["untuned"] is False
    paths = write_full_report(store, tmp_path / "out")
    html = paths["html"].read_text()
    assert "Infeasible on a device" in html and "QGemm, QLinearConv" in html
    assert "tracker 127.0.0.1:9190" in html and "pixel" in html and "0.27.0" in html  # the devices table
    assert "230.00 (untuned)" in html and "5.00 (untuned)" not in html  # only the TVM latency is marked
    assert "<th>compile (s)</th>" in html and "4.2" in html
    from tuneqn.controller.report.plots import UNTUNED_LABEL, objectives_figure

    def legend(device: str) -> list[str]:
        figure = objectives_figure(report, "net", "static", device)
        return [t.get_text() for t in figure.axes[0].get_legend().get_texts()]

    assert any(t.startswith("latency") and UNTUNED_LABEL in t for t in legend("phone"))
    cpu_labels = legend("cpu")
    assert not any(UNTUNED_LABEL in t for t in cpu_labels)
    store.close()
