"""Pre-processing as ONNX Runtime advises (issue 8, item 0).

The prepared model is pre-processed by default (constant folding, Pad fused into Conv, …);
layer names stay the original ones, the store's model notes say what changed, the
quantizer no longer advises pre-processing, ``quantization.preprocess = false`` gives the
model as before, and changing the setting rebuilds calibration, ranking and candidates.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import write_study
from onnx import helper
from onnx_models import mlp, padded_cnn, write_images
from onnxruntime.quantization import QuantFormat, quantize_static

from tuneqn.controller.cli import main
from tuneqn.controller.config import ModelSpec
from tuneqn.controller.prepare.modelio import prepare_model, restore_layer_names
from tuneqn.controller.quantize.quantizer import ArrayReader


def _ops(path: Path) -> list[tuple[str, str]]:
    return [(n.op_type, n.name) for n in onnx.load(str(path)).graph.node]


def _layers(path: Path) -> dict[str, str]:
    return {name: op for op, name in _ops(path) if op in ("Conv", "Gemm", "MatMul")}


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_preprocess_folds_fuses_and_keeps_layer_names(tmp_path: Path) -> None:
    src = padded_cnn(tmp_path / "net.onnx")
    pm = prepare_model(ModelSpec(path=src), tmp_path / "models")
    ops = [op for op, _ in _ops(pm.path)]
    assert "Pad" not in ops and "Constant" not in ops and "Mul" not in ops and "Concat" not in ops
    assert _layers(pm.path) == _layers(src) == {"conv1": "Conv", "conv2": "Conv", "fc": "Gemm"}
    assert pm.preprocessed
    note = next(n for n in pm.notes if n.startswith("pre-processed"))
    assert "14 nodes → 7 nodes" in note and "Pad fused into Conv: 1" in note and "size" in note
    x = np.random.default_rng(0).normal(size=(2, 3, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(_run(pm.path, x), _run(src, x), rtol=1e-5, atol=1e-5)


def test_preprocess_off_gives_the_model_as_before(tmp_path: Path) -> None:
    src = padded_cnn(tmp_path / "net.onnx")
    pm = prepare_model(ModelSpec(path=src), tmp_path / "models", preprocess_model=False)
    assert not pm.preprocessed
    assert not any(n.startswith("pre-processed") for n in pm.notes)
    assert _ops(pm.path) == _ops(src)


def test_matmul_layers_stay_matmul_for_the_dynamic_quantizer(tmp_path: Path) -> None:
    src = mlp(tmp_path / "mlp.onnx")
    pm = prepare_model(ModelSpec(path=src, input_shape=[4, 32]), tmp_path / "models")
    assert _layers(pm.path) == {"matmul0": "MatMul", "matmul1": "MatMul", "matmul2": "MatMul"}


def test_renamed_layers_get_their_names_back() -> None:
    before = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
            helper.make_node("Conv", ["y", "k"], ["z"], name="conv"),
        ],
        "g",
        [],
        [],
    )
    after = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["s"], name="mm/MatMulAddFusion"),
            helper.make_node("Conv", ["s", "k"], ["z"], name="Conv_fused_7"),
        ],
        "g",
        [],
        [],
    )
    a = helper.make_model(after)
    assert restore_layer_names(helper.make_model(before), a) == 2
    assert [n.name for n in a.graph.node] == ["mm", "conv"]


def _quantizer_advice(model: Path, tmp: Path, caplog: pytest.LogCaptureFixture) -> list[str]:
    data = np.random.default_rng(0).normal(size=(4, 3, 12, 12)).astype(np.float32)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        quantize_static(
            str(model), str(tmp / "q.onnx"), ArrayReader("input", data, batch=1), quant_format=QuantFormat.QDQ
        )
    return [r.getMessage() for r in caplog.records if "pre-processing" in r.getMessage()]


def test_quantizer_no_longer_advises_preprocessing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = padded_cnn(tmp_path / "net.onnx", batch=1)
    on = prepare_model(ModelSpec(path=src), tmp_path / "on")
    off = prepare_model(ModelSpec(path=src), tmp_path / "off", preprocess_model=False)
    assert _quantizer_advice(off.path, tmp_path, caplog), "the quantizer should advise on a raw model"
    assert _quantizer_advice(on.path, tmp_path, caplog) == []


def _rows(out: Path, sql: str) -> list[sqlite3.Row]:
    con = sqlite3.connect(out / "tuneqn.db")
    con.row_factory = sqlite3.Row
    try:
        return list(con.execute(sql))
    finally:
        con.close()


def test_study_analyzes_preprocessed_model_and_rebuilds_when_setting_changes(tmp_path: Path) -> None:
    src = padded_cnn(tmp_path / "net.onnx")
    images = write_images(tmp_path / "images", 24, seed=0, size=12)
    out = tmp_path / "out"
    study = write_study(tmp_path, model=src, images=images)
    assert main(["analyze", str(study), "--candidates"]) == 0
    layers = {r["name"] for r in _rows(out, "select name from layers")}
    assert layers == {"conv1", "conv2", "fc"}
    notes = _rows(out, "select notes from models")[0]["notes"]
    assert "Pad fused into Conv: 1" in notes
    on = {r["id"]: r["sha256"] for r in _rows(out, "select id, sha256, build_key from candidates")}
    keys_on = {r["id"]: r["build_key"] for r in _rows(out, "select id, build_key from candidates")}
    assert on

    write_study(tmp_path, model=src, images=images, quantization={"preprocess": False})
    assert main(["analyze", str(study), "--candidates"]) == 0
    assert {r["name"] for r in _rows(out, "select name from layers")} == layers
    assert "pre-processed" not in _rows(out, "select notes from models")[0]["notes"]
    keys_off = {r["id"]: r["build_key"] for r in _rows(out, "select id, build_key from candidates")}
    off = {r["id"]: r["sha256"] for r in _rows(out, "select id, sha256 from candidates")}
    assert keys_off.keys() == keys_on.keys()
    for cid in keys_on:
        assert keys_off[cid] != keys_on[cid] and off[cid] != on[cid], cid
    k0 = next(r["path"] for r in _rows(out, "select path, k from candidates") if r["k"] == 0)
    assert "Pad" in [op for op, _ in _ops(Path(k0))]


@pytest.mark.slow
def test_lite0_pads_fused_and_layer_names_kept(example_dir: Path, tmp_path: Path) -> None:
    src = example_dir / "model.onnx"
    pm = prepare_model(ModelSpec(path=src, input_shape=[1, 3, 224, 224]), tmp_path / "models")
    note = next(n for n in pm.notes if n.startswith("pre-processed"))
    assert "456 nodes → 94 nodes" in note and "Pad fused into Conv: 17" in note
    assert "Pad" not in [op for op, _ in _ops(pm.path)]
    assert _layers(pm.path) == _layers(src) and len(_layers(src)) == 50
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)
    np.testing.assert_allclose(_run(pm.path, x), _run(src, x), rtol=1e-3, atol=1e-3)
