"""The real example: EfficientNet-Lite0 with ImageNet weights on real photos (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneqn.controller.cli import main

pytestmark = pytest.mark.slow


def test_lite0_static_ranking(example_dir: Path, tmp_path: Path) -> None:
    rc = main(["analyze", "--model", str(example_dir / "model.onnx"), "--images", str(example_dir / "images"),
               "--out", str(tmp_path / "out"), "--calibration", "16", "--eval", "40", "--analysis", "4"])
    assert rc == 0
    layers = json.loads((tmp_path / "out" / "layers.json").read_text())
    assert len(layers) == 50  # 49 Conv + 1 Gemm
    assert {layer["op_type"] for layer in layers} == {"Conv", "Gemm"}
    assert [layer["rank"] for layer in layers] == list(range(1, 51))
    fused = [layer for layer in layers if layer["fused_activation"] == "Clip"]
    assert len(fused) == 33
    # like with like: a fused Conv+Clip's own 8-bit error is small (naively it is ~0.4-1.0)
    assert max(layer["qdq_err"] for layer in fused) < 0.1
    assert (tmp_path / "out" / "layer_errors.png").stat().st_size > 30_000
