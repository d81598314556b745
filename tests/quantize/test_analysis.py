"""Layer activation analysis and ranking on small real models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import analyze_quick, write_study

from tuneqn.controller.cli import main


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_wide_activation_layer_ranks_first(tmp_path: Path, assets: Path, mode: str) -> None:
    layers = analyze_quick(tmp_path, assets / "wide.onnx", assets / "images", "--mode", mode)
    assert [layer["rank"] for layer in layers] == [1, 2, 3, 4, 5]
    assert layers[0]["name"] == "conv2"
    assert layers[0]["score"] == pytest.approx(1.0)
    # conv2's own quantization error dominates: far above every other layer's
    others = [layer["qdq_err"] for layer in layers[1:]]
    assert layers[0]["qdq_err"] > 3 * max(others)


def test_plain_cnn_ranking_fields_and_normalization(tmp_path: Path, assets: Path) -> None:
    layers = analyze_quick(tmp_path, assets / "cnn.onnx", assets / "images")
    assert {layer["name"] for layer in layers} == {"conv1", "conv2", "conv3", "conv4", "fc"}
    for layer in layers:
        for key in ("model", "mode", "name", "op_type", "qdq_err", "xmodel_err", "score", "rank"):
            assert key in layer
        assert layer["model"] == "cnn" and layer["mode"] == "static"
        assert 0.0 <= layer["norm_qdq"] <= 1.0 and 0.0 <= layer["norm_xmodel"] <= 1.0
        assert layer["score"] == pytest.approx(0.5 * layer["norm_qdq"] + 0.5 * layer["norm_xmodel"])
    assert max(layer["norm_qdq"] for layer in layers) == pytest.approx(1.0)
    assert min(layer["norm_xmodel"] for layer in layers) == pytest.approx(0.0)
    scores = [layer["score"] for layer in layers]
    assert scores == sorted(scores, reverse=True)
    assert (tmp_path / "out" / "layer_errors.png").stat().st_size > 10_000


def test_fused_activation_compared_like_with_like(tmp_path: Path, assets: Path) -> None:
    """The quantizer fuses Relu/Clip into the Conv; qdq_err must not charge the activation itself."""
    layers = {layer["name"]: layer for layer in analyze_quick(tmp_path, assets / "cnn.onnx", assets / "images")}
    assert layers["conv1"]["fused_activation"] == "Relu"
    assert layers["conv3"]["fused_activation"] == "Clip"
    assert layers["conv4"]["fused_activation"] is None
    # 8-bit quantization of a tensor alone costs ~1e-3..1e-2; comparing pre-activation with
    # post-activation values would give ~0.3..1.0 for the fused layers.
    for name in ("conv1", "conv2", "conv3"):
        assert layers[name]["qdq_err"] < 0.05, (name, layers[name]["qdq_err"])


def test_matmul_model_both_modes(tmp_path: Path, assets: Path) -> None:
    import numpy as np

    x = np.random.default_rng(0).normal(size=(40, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    study = write_study(
        tmp_path, model=assets / "mlp.onnx", images=tmp_path, quantization={"modes": ["static", "dynamic"]}
    )
    text = study.read_text().replace(f'images = "{tmp_path}"', f'tensors = "{tmp_path / "x.npy"}"')
    study.write_text(text)
    assert main(["analyze", str(study)]) == 0
    layers = json.loads((tmp_path / "out" / "layers.json").read_text())
    for mode in ("static", "dynamic"):
        names = [layer["name"] for layer in layers if layer["mode"] == mode]
        assert sorted(names) == ["matmul0", "matmul1", "matmul2"]
        assert all(layer["xmodel_err"] > 0 for layer in layers if layer["mode"] == mode)


def test_rerun_reuses_stored_analysis(tmp_path: Path, assets: Path) -> None:
    import sqlite3

    first = analyze_quick(tmp_path, assets / "cnn.onnx", assets / "images")
    db = tmp_path / "out" / "tuneqn.db"
    created = sqlite3.connect(db).execute("select created_at from analyses").fetchone()[0]
    second = analyze_quick(tmp_path, assets / "cnn.onnx", assets / "images")
    assert second == first
    assert sqlite3.connect(db).execute("select created_at from analyses").fetchone()[0] == created
    analyze_quick(tmp_path, assets / "cnn.onnx", assets / "images", "--fresh")
    assert sqlite3.connect(db).execute("select created_at from analyses").fetchone()[0] > created
