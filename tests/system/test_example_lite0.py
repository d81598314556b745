"""The real example: EfficientNet-Lite0 with ImageNet weights on real photos (slow)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tuneqn.controller.cli import main

pytestmark = pytest.mark.slow


def test_lite0_static_ranking(example_dir: Path, tmp_path: Path) -> None:
    rc = main(
        [
            "analyze",
            "--model",
            str(example_dir / "model.onnx"),
            "--images",
            str(example_dir / "images"),
            "--out",
            str(tmp_path / "out"),
            "--calibration",
            "16",
            "--eval",
            "40",
            "--analysis",
            "4",
            "--mode",
            "static",
        ]
    )
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
    # The paper's score ranks the stem and the first depthwise conv among the last ten (measured: 50th and 49th);
    # the measured ranking puts one of them in its top six (test_lite0_measured_search_beats_the_paper_ranking)
    paper = [layer["name"] for layer in layers]
    assert paper.index("/_conv_stem/Conv") >= 40 and paper.index("/_blocks.0/_depthwise_conv/Conv") >= 40


def test_lite0_measured_search_beats_the_paper_ranking(example_dir: Path, tmp_path: Path) -> None:
    """Greedy on the measured ranking (per-tensor recipe) finds a small model the paper's sweep cannot.

    The paper's score ranks the stem and the first depthwise conv last (test_lite0_static_ranking); excluding
    exactly those layers is what gives agreement back. Measured here: 0.99 agreement at 4.83 MB (the fully
    quantized model: 0.93 at 4.81 MB; the paper's sweep reaches 0.99 only at k = 50, 18.6 MB).
    """
    study = tmp_path / "study.toml"
    example_dir = example_dir.resolve()
    # Greedy reaches >= 0.98 agreement at its third step (measured: 0.93, 0.95, 0.97, 0.98, 0.99 at k = 0 … 4;
    # without a cap it stops after a fourth round): three rounds say all this test asserts, a fourth adds 47 screens.
    # Screens on 16 photos instead of 32 (a third less CPU): the same ranking's top and the same steps (measured).
    text = re.sub(
        r"^\[search\].*$",
        "[search]\nmax_k = 3\nscreen_samples = 16",
        (example_dir.parent / "study.toml").read_text(),
        flags=re.M,
    )
    study.write_text(
        text.replace('"work/', f'"{example_dir}/').replace(
            'out_dir = "../../out/lite0"', f'out_dir = "{tmp_path / "out"}"'
        )
        # latency is not what this test checks: one timed run per evaluation instead of 3 + 20, on one
        # ONNX Runtime thread (a second one only spins on a two-core machine running two tests)
        + "\n[evaluation]\nlatency_warmup = 0\nlatency_repeats = 1\nintra_op_threads = 1\n"
    )
    assert (
        main(
            [
                "tune",
                str(study),
                "--recipe",
                "per-tensor",
                "--strategy",
                "greedy",
                "--ranking",
                "measured",
                "--no-compare",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    # a measured search runs no error analysis (the paper's ranks of these layers: test_lite0_static_ranking)
    assert not (tmp_path / "out" / "layers.json").exists()
    measured = next(r for r in report["rankings"] if r["name"] == "measured")["layers"]
    top = [layer["name"] for layer in measured[:6]]
    assert {"/_conv_stem/Conv", "/_blocks.0/_depthwise_conv/Conv"} & set(top)
    fq = next(c for c in report["candidates"] if c["k"] == 0)
    full = [
        (c["size_bytes"], c["results"][0]["agreement"])
        for c in report["candidates"]
        if c["level"] == "full" and c["results"] and c["results"][0]["agreement"] is not None
    ]
    best = min(size for size, agreement in full if agreement >= 0.98)
    assert best <= fq["size_bytes"] * 1.01  # ≥ 0.98 agreement for at most 1 % more bytes than fully quantized
