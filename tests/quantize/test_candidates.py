"""Selective quantization candidates: exclusions, float execution, export, calibration reuse."""

from __future__ import annotations

import contextlib
import importlib
import json
import sqlite3
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import exported_sha256, write_study
from ort_graphs import ran_graph

from tuneqn.controller.cli import main
from tuneqn.controller.common.files import file_sha256
from tuneqn.controller.study import Study

WEIGHTED = {"Conv", "Gemm", "MatMul", "ConvTranspose"}


def _dq_fed_weight(model: onnx.ModelProto) -> dict[str, bool]:
    """Per weighted node: is its weight input produced by a DequantizeLinear?"""
    producers = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for node in model.graph.node:
        if node.op_type in WEIGHTED:
            p = producers.get(node.input[1])
            out[node.name] = p is not None and p.op_type == "DequantizeLinear"
    return out


def _candidates(out: Path) -> list[dict]:
    con = sqlite3.connect(out / "tuneqn.db")
    con.row_factory = sqlite3.Row
    return [dict(r) for r in con.execute("select * from candidates order by kind desc, k")]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Path:
    """One study's candidates, built once for the module's tests (read-only: they write to their own tmp_path)."""
    tmp_path = tmp_path_factory.mktemp("built-candidates")
    study = write_study(
        tmp_path,
        model=assets / "wide.onnx",
        images=assets / "images",
        search={"exclusion_sets": [{"name": "head", "layers": ["fc", "conv4"]}]},
    )
    assert main(["analyze", str(study), "--candidates"]) == 0
    return tmp_path / "out"


def test_candidate_k_leaves_exactly_top_k_float(built: Path) -> None:
    ranking = [layer["name"] for layer in json.loads((built / "layers.json").read_text())]
    cands = [c for c in _candidates(built) if c["kind"] == "set"]
    assert [c["k"] for c in cands] == list(range(len(ranking) + 1))
    for c in cands:
        fed = _dq_fed_weight(onnx.load(c["path"]))
        float_layers = {name for name, q in fed.items() if not q}
        assert float_layers == set(ranking[: c["k"]]), c["id"]
        assert json.loads(c["excluded"]) == sorted(ranking[: c["k"]])
        assert c["size_bytes"] == Path(c["path"]).stat().st_size
    sizes = [c["size_bytes"] for c in cands]
    assert sizes[-1] > sizes[0]  # leaving layers in float costs bytes
    explicit = [c for c in _candidates(built) if c["kind"] == "explicit"]
    assert len(explicit) == 1 and explicit[0]["label"] == "head"
    fed = _dq_fed_weight(onnx.load(explicit[0]["path"]))
    assert {n for n, q in fed.items() if not q} == {"fc", "conv4"}


def _float_convs(model: onnx.ModelProto) -> int:
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    return sum(1 for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in floats)


def test_excluded_layer_really_runs_float(built: Path, tmp_path: Path) -> None:
    """Read the graph ONNX Runtime actually runs: the excluded Conv keeps float weights."""
    cand = next(c for c in _candidates(built) if c["k"] == 1)
    assert json.loads(cand["excluded"]) == ["conv2"]
    runtime = json.loads(cand["runtime"])
    assert runtime["ort_disabled_optimizers"] == ["WeightBiasQuantization"]
    ran = ran_graph(cand["path"], tmp_path, runtime["ort_disabled_optimizers"])
    assert _float_convs(ran) == 1
    assert sum(1 for n in ran.graph.node if n.op_type == "QLinearConv") == 3
    # Without the carried setting this ORT quantizes the excluded Conv's weights at load time.
    default = ran_graph(cand["path"], tmp_path, [])
    if _float_convs(default) == 0:
        assert sum(1 for n in default.graph.node if n.op_type == "QLinearConv") == 4
    # k = 0 needs nothing special
    fq = next(c for c in _candidates(built) if c["k"] == 0)
    assert json.loads(fq["runtime"])["ort_disabled_optimizers"] == []


def test_excluded_layer_changes_outputs_towards_float(built: Path, tmp_path: Path, assets: Path) -> None:
    x = np.load(built / "data" / "wide" / "eval.npy")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref = ort.InferenceSession(str(assets / "wide.onnx"), so).run(None, {"input": x})[0]
    cands = {c["k"]: c for c in _candidates(built) if c["kind"] == "set"}

    def err(c: dict) -> float:
        rt = json.loads(c["runtime"])["ort_disabled_optimizers"]
        y = ort.InferenceSession(c["path"], so, disabled_optimizers=rt).run(None, {"input": x})[0]
        return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))

    assert err(cands[1]) < 0.5 * err(cands[0])  # conv2 (rank 1) back in float removes most of the error
    # with every ranked layer in float only the unranked ops (input, pooling) stay quantized
    assert err(cands[5]) < 0.2 * err(cands[0])


def test_export_reproduces_sha256(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stored = {c["k"]: c for c in _candidates(built) if c["kind"] == "set"}
    for k in (0, 2):
        out = tmp_path / f"exported-{k}.onnx"
        args = ["export", str(built), "--model", "wide", "--mode", "static", "--candidate", str(k), "-o", str(out)]
        assert main(args) == 0
        assert exported_sha256(out) == stored[k]["sha256"]
    out = tmp_path / "head.onnx"
    assert main(["export", str(built), "--candidate", "head", "-o", str(out)]) == 0
    assert "sha256=" in capsys.readouterr().out


@pytest.fixture
def calibrations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per calibrator ONNX Runtime's quantizer creates from now on."""
    q = importlib.import_module("onnxruntime.quantization.quantize")  # the module, not the function it exports
    calls: list[int] = []
    real = q.create_calibrator

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(q, "create_calibrator", counting)
    return calls


def test_calibration_runs_once_for_all_candidates(tmp_path: Path, assets: Path, calibrations: list[int]) -> None:
    study = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images")
    assert main(["analyze", str(study), "--candidates"]) == 0
    assert len(_candidates(tmp_path / "out")) == 6
    assert len(calibrations) == 1


@pytest.mark.parametrize("child", [False, True], ids=["in-process", "in a yielding child"])
def test_a_calibration_builds_the_fully_quantized_models_of_the_recipes_sharing_it(
    tmp_path: Path, assets: Path, monkeypatch: pytest.MonkeyPatch, child: bool
) -> None:
    """Where the calibration runs (a child process for a large model), it also builds the fully quantized model of
    every recipe that shares it: the builder then reuses them, and they are the files it would have built."""
    from tuneqn.controller import study as study_module
    from tuneqn.controller.config import load_config
    from tuneqn.controller.farm.local import SharedQuietLock

    toml = write_study(
        tmp_path,
        model=assets / "cnn.onnx",
        images=assets / "images",
        quantization={
            "recipes": [
                {"name": "pt", "mode": "static", "per_channel": False},
                {"name": "pc", "mode": "static", "per_channel": True},
                {"name": "pct", "mode": "static", "calibration_method": "percentile"},
            ]
        },
    )
    study = Study(load_config(toml))
    study.prepare()
    if child:
        monkeypatch.setattr(study_module, "_YIELDING_WORK", 0)
    with SharedQuietLock(tmp_path / "quiet.lock").shared() if child else contextlib.nullcontext():
        study.calibration_cache("cnn", "pc")
    plans = {r: study.make_plan("cnn", r, (), label="k=0") for r in ("pt", "pc", "pct")}
    assert {study.candidate_path(p) for p in plans.values()} - set(study._prebuilt) == {
        study.candidate_path(plans["pct"])
    }  # another calibration: built with that one
    alone = {r: study.build(plans[r], out=tmp_path / f"{r}.onnx") for r in ("pt", "pc")}  # what the builder writes

    def no_quantizer(*args: object) -> None:
        raise AssertionError("built again")

    monkeypatch.setattr(study_module, "quantize_candidate", no_quantizer)
    for recipe in ("pt", "pc"):
        row = study.build(plans[recipe])
        assert study.store.candidate(plans[recipe].id)["label"] == row["label"] == "k=0"  # the builder's plan's
        assert row["build_key"] == study.build_key(plans[recipe])
        assert row["sha256"] == alone[recipe]["sha256"] == file_sha256(Path(row["path"]))
        assert (row["size_bytes"], row["runtime"]) == (alone[recipe]["size_bytes"], alone[recipe]["runtime"])
    study.close()


def test_dynamic_candidates_keep_node_names(tmp_path: Path, assets: Path) -> None:
    study = write_study(
        tmp_path, model=assets / "cnn.onnx", images=assets / "images", quantization={"modes": ["dynamic"]}
    )
    assert main(["analyze", str(study), "--candidates"]) == 0
    cands = [c for c in _candidates(tmp_path / "out") if c["mode"] == "dynamic"]
    for c in cands:
        model = onnx.load(c["path"])
        names = {n.name for n in model.graph.node}
        assert {"conv1", "conv2", "conv3", "conv4"} <= names
        integer = {n.name for n in model.graph.node if n.op_type in ("ConvInteger", "MatMulInteger")}
        excluded = set(json.loads(c["excluded"]))
        assert not (integer & excluded)
        assert len(integer) + len(excluded & {"conv1", "conv2", "conv3", "conv4", "fc"}) == 5


def test_per_tensor_and_per_channel_share_one_calibration(
    tmp_path: Path, assets: Path, calibrations: list[int]
) -> None:
    """The ranges do not depend on the weights' granularity: one calibration serves both recipes, and its
    content is what calibrating for the per-channel recipe alone gives."""
    from tuneqn.controller.quantize.quantizer import QuantSettings, calibrate

    study = write_study(
        tmp_path,
        model=assets / "cnn.onnx",
        images=assets / "images",
        quantization={
            "recipes": [
                {"name": "pt", "mode": "static", "per_channel": False},
                {"name": "pc", "mode": "static", "per_channel": True},
            ]
        },
    )
    assert main(["analyze", str(study), "--candidates"]) == 0
    assert len(calibrations) == 1
    caches = list((tmp_path / "out" / "calibration").glob("*.json"))
    assert len(caches) == 1
    cands = _candidates(tmp_path / "out")
    assert {c["mode"] for c in cands} == {"pt", "pc"}

    pt, pc = QuantSettings(per_channel=False), QuantSettings(per_channel=True)  # the recipes' other settings
    assert pt.calibration_key() == pc.calibration_key() and pt.key() != pc.key()
    data = np.load(tmp_path / "out" / "data" / "cnn" / "calibration.npy")
    alone = calibrate(assets / "cnn.onnx", "input", 1, data, pc, tmp_path / "alone.json")
    assert json.loads(alone.read_text()) == json.loads(caches[0].read_text())
