"""Static QOperator format: analysis, candidates that keep the float names, export, tune."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import analyze_quick, exported_sha256, write_study
from onnx import numpy_helper
from ort_graphs import op_counts, ran_graph

from tuneqn.controller.cli import main
from tuneqn.controller.quantize.quantizer import WBQ, QuantSettings, quantize_candidate

LAYERS = {"conv1", "conv2", "conv3", "conv4", "fc"}
QOPS = {"QLinearConv", "QGemm", "QLinearMatMul"}


def _candidates(out: Path) -> list[dict]:
    con = sqlite3.connect(out / "tuneqn.db")
    con.row_factory = sqlite3.Row
    return [dict(r) for r in con.execute("select * from candidates order by kind desc, k")]


def _no_opt() -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return so


def test_qoperator_analysis_ranks_wide_layer_first(tmp_path: Path, assets: Path) -> None:
    """Fails before the fix: analyze --format qoperator exited 2 ("no quantized layer")."""
    layers = analyze_quick(tmp_path, assets / "wide.onnx", assets / "images", "--format", "qoperator")
    assert {layer["name"] for layer in layers} == LAYERS
    assert [layer["rank"] for layer in layers] == [1, 2, 3, 4, 5]
    assert layers[0]["name"] == "conv2"
    assert layers[0]["score"] == pytest.approx(1.0)
    others = [layer["qdq_err"] for layer in layers[1:]]
    assert layers[0]["qdq_err"] > 3 * max(others)
    for layer in layers:
        assert np.isfinite(layer["qdq_err"]) and np.isfinite(layer["xmodel_err"]) and layer["xmodel_err"] > 0


def test_qoperator_errors_are_the_qdq_quantities(tmp_path: Path, assets: Path) -> None:
    """qdq_err equals the QDQ format's (same scales); xmodel_err is measured on the real QOperator model."""
    qdq = {r["name"]: r for r in analyze_quick(tmp_path / "qdq", assets / "cnn.onnx", assets / "images")}
    qop_rows = analyze_quick(tmp_path / "qop", assets / "cnn.onnx", assets / "images", "--format", "qoperator")
    qop = {r["name"]: r for r in qop_rows}
    assert set(qop) == set(qdq) == LAYERS
    for name in LAYERS:
        assert qop[name]["qdq_err"] == pytest.approx(qdq[name]["qdq_err"], rel=1e-9)
        assert qop[name]["fused_activation"] == qdq[name]["fused_activation"]

    # Every quantized layer has the same output scale / zero point and weight scale in both formats.
    out = tmp_path / "qop" / "out"
    (cache,) = (out / "calibration").glob("*.json")
    settings = QuantSettings(format="qoperator")  # otherwise the defaults: static, per tensor, u8/s8, min/max
    model = out / "models" / "cnn.onnx"
    quantize_candidate(model, tmp_path / "fq-qop.onnx", settings, [], cache)
    quantize_candidate(model, tmp_path / "fq-qdq.onnx", settings.model_copy(update={"format": "qdq"}), [], cache)
    mqop, mqdq = onnx.load(str(tmp_path / "fq-qop.onnx")), onnx.load(str(tmp_path / "fq-qdq.onnx"))
    iop = {i.name: numpy_helper.to_array(i) for i in mqop.graph.initializer}
    idq = {i.name: numpy_helper.to_array(i) for i in mqdq.graph.initializer}
    consumers = {i: n for n in mqdq.graph.node for i in n.input}
    producers = {o: n for n in mqdq.graph.node for o in n.output}
    qdq_nodes = {n.name: n for n in mqdq.graph.node}
    positions = {"QLinearConv": (6, 7, 4), "QGemm": (7, 8, 4)}
    for node in mqop.graph.node:
        if node.op_type not in positions:
            continue
        ys, yz, ws = positions[node.op_type]
        float_node = qdq_nodes[node.name]  # QDQ keeps names; QOperator now does too
        q = consumers[float_node.output[0]]
        assert q.op_type == "QuantizeLinear"
        np.testing.assert_array_equal(iop[node.input[ys]], idq[q.input[1]])
        np.testing.assert_array_equal(iop[node.input[yz]], idq[q.input[2]])
        wdq = producers[float_node.input[1]]
        np.testing.assert_array_equal(iop[node.input[ws]], idq[wdq.input[1]])

    # fc is the last layer: its xmodel_err is the relative error of the QOperator model's own
    # logits, computed here independently with two plain sessions.
    x = np.load(out / "data" / "cnn" / "analysis.npy")
    ref = ort.InferenceSession(str(model), _no_opt()).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(tmp_path / "fq-qop.onnx"), _no_opt()).run(None, {"input": x})[0]
    expected = float(np.linalg.norm((ref - got).astype(np.float64)) / np.linalg.norm(ref.astype(np.float64)))
    assert qop["fc"]["xmodel_err"] == pytest.approx(expected, rel=1e-4)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Path:
    """One study's candidates, built once for the module's tests (read-only: they write to their own tmp_path)."""
    tmp_path = tmp_path_factory.mktemp("built-qoperator")
    study = write_study(
        tmp_path,
        model=assets / "wide.onnx",
        images=assets / "images",
        quantization={"format": "qoperator"},
        search={"exclusion_sets": [{"name": "head", "layers": ["fc", "conv4"]}]},
    )
    assert main(["analyze", str(study), "--candidates"]) == 0
    return tmp_path / "out"


def test_candidate_k_leaves_exactly_top_k_float(built: Path, tmp_path: Path) -> None:
    ranking = [layer["name"] for layer in json.loads((built / "layers.json").read_text())]
    assert ranking[0] == "conv2"
    cands = [c for c in _candidates(built) if c["kind"] == "set"]
    assert [c["k"] for c in cands] == list(range(len(ranking) + 1))
    for c in cands:
        top = set(ranking[: c["k"]])
        model = onnx.load(c["path"])
        by_name = {n.name: n for n in model.graph.node}
        # names preserved: every layer is present under its float name, quantized or not
        assert LAYERS <= set(by_name), c["id"]
        assert not [n for n in by_name if n.endswith("_quant")], c["id"]
        assert {n for n in LAYERS if by_name[n].op_type in QOPS} == LAYERS - top, c["id"]
        assert {n for n in LAYERS if by_name[n].op_type in ("Conv", "Gemm")} == top, c["id"]
        # what ONNX Runtime really runs, with the options recorded for the candidate
        runtime = json.loads(c["runtime"])
        ran = op_counts(ran_graph(c["path"], tmp_path, runtime["ort_disabled_optimizers"]))
        float_convs = len(top - {"fc"})
        assert ran == {
            "float_conv": float_convs,
            "float_gemm": int("fc" in top),
            "QLinearConv": 4 - float_convs,
            "QGemm": int("fc" not in top),
        }, c["id"]
    explicit = next(c for c in _candidates(built) if c["kind"] == "explicit")
    by_name = {n.name: n for n in onnx.load(explicit["path"]).graph.node}
    assert by_name["fc"].op_type == "Gemm" and by_name["conv4"].op_type == "Conv"
    assert {by_name[n].op_type for n in ("conv1", "conv2", "conv3")} == {"QLinearConv"}


def test_weight_bias_quantization_disabled_where_needed(built: Path, tmp_path: Path) -> None:
    """An excluded Conv between a DequantizeLinear and a QuantizeLinear needs WeightBiasQuantization off."""
    cands = {c["k"]: c for c in _candidates(built) if c["kind"] == "set"}
    assert json.loads(cands[1]["excluded"]) == ["conv2"]
    assert json.loads(cands[1]["runtime"])["ort_disabled_optimizers"] == [WBQ]
    assert json.loads(cands[0]["runtime"])["ort_disabled_optimizers"] == []
    ran = op_counts(ran_graph(cands[1]["path"], tmp_path, [WBQ]))
    assert ran["float_conv"] == 1 and ran["QLinearConv"] == 3
    # Without the recorded setting this ORT quantizes the excluded Conv again at load time.
    default = op_counts(ran_graph(cands[1]["path"], tmp_path, []))
    assert default["float_conv"] == 0


def test_excluding_the_wide_layer_moves_outputs_towards_float(built: Path, assets: Path) -> None:
    x = np.load(built / "data" / "wide" / "eval.npy")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref = ort.InferenceSession(str(assets / "wide.onnx"), so).run(None, {"input": x})[0]
    cands = {c["k"]: c for c in _candidates(built) if c["kind"] == "set"}

    def err(c: dict) -> float:
        rt = json.loads(c["runtime"])["ort_disabled_optimizers"]
        y = ort.InferenceSession(c["path"], so, disabled_optimizers=rt).run(None, {"input": x})[0]
        return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))

    assert err(cands[1]) < 0.5 * err(cands[0])


def test_export_reproduces_sha256(built: Path, tmp_path: Path) -> None:
    stored = {c["label"]: c for c in _candidates(built)}
    for cand in ("0", "2", "head"):
        out = tmp_path / f"exported-{cand}.onnx"
        assert (
            main(["export", str(built), "--model", "wide", "--mode", "static", "--candidate", cand, "-o", str(out)])
            == 0
        )
        label = cand if cand == "head" else f"k={cand}"
        assert exported_sha256(out) == stored[label]["sha256"]


@pytest.mark.heavy
def test_tune_qoperator_quick_form(tmp_path: Path, assets: Path) -> None:
    """The whole study in QOperator format on a local agent (the CLI starts it)."""
    out = tmp_path / "out"
    assert (
        main(
            [
                "tune",
                "--model",
                str(assets / "cnn.onnx"),
                "--images",
                str(assets / "images"),
                "--out",
                str(out),
                "--format",
                "qoperator",
                "--mode",
                "static",
                "--eval",
                "12",
                "--calibration",
                "12",
                "--analysis",
                "6",
                "--strategy",
                "sweep",
                "--ranking",
                "paper",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    cands = [c for c in report["candidates"] if c["mode"] == "static"]
    assert len(cands) == 6
    for c in cands:
        (res,) = c["results"]
        assert res["status"] == "done" and 0.0 <= res["agreement"] <= 1.0
    assert cands[-1]["results"][0]["agreement"] == pytest.approx(1.0)  # every ranked layer back in float
