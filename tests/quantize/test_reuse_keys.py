"""Reuse keys cover everything that determines the bytes (issue 7, defect 1).

Changing a model's weights (node names kept), the calibration images, a quantization
setting or a tool version makes the stored calibration, ranking and candidates stale:
a re-run rebuilds them and ``tuneqn export`` reproduces the new files bit-identically.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from helpers import exported_sha256, write_study
from onnx_models import cnn, write_images

from tuneqn.controller import study as study_mod
from tuneqn.controller.cli import main
from tuneqn.controller.config import DatasetSpec
from tuneqn.controller.prepare import dataset as dataset_mod


def _candidates(out: Path) -> dict[str, dict[str, Any]]:
    con = sqlite3.connect(out / "tuneqn.db")
    con.row_factory = sqlite3.Row
    try:
        return {r["id"]: dict(r) for r in con.execute("select * from candidates")}
    finally:
        con.close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files_match_store(out: Path) -> None:
    for c in _candidates(out).values():
        assert _sha(Path(c["path"])) == c["sha256"], c["id"]


def _export_matches(out: Path, tmp: Path, k: int) -> None:
    dest = tmp / f"export-k{k}.onnx"
    assert main(["export", str(out), "--candidate", str(k), "-o", str(dest)]) == 0
    stored = next(c for c in _candidates(out).values() if c["k"] == k)
    assert exported_sha256(dest) == stored["sha256"]


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A writable model file and image folder of the test's own."""
    model = cnn(tmp_path / "net.onnx", seed=0)
    images = write_images(tmp_path / "images", 24, seed=0)
    return model, images


@pytest.mark.heavy
def test_changed_weights_rebuild_candidates(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    model, images = inputs
    study = write_study(tmp_path, model=model, images=images)
    out = tmp_path / "out"
    assert main(["analyze", str(study), "--candidates"]) == 0
    before = _candidates(out)

    cnn(model, seed=1)  # other weights, the same node names
    assert main(["analyze", str(study), "--candidates"]) == 0
    after = _candidates(out)
    # Candidates are named by content (model, recipe, exclusion set): one per k before and after,
    # and none of the old files survives (stale rows are forgotten, their files deleted).
    by_k_before = {c["k"]: c for c in before.values()}
    by_k_after = {c["k"]: c for c in after.values()}
    assert by_k_after.keys() == by_k_before.keys() and len(by_k_after) == len(after)
    for k, c in by_k_before.items():
        assert by_k_after[k]["sha256"] != c["sha256"], f"k={k} kept the old model's file"
    _files_match_store(out)
    for k in (0, 2):
        _export_matches(out, tmp_path, k)


@pytest.mark.heavy
def test_changed_calibration_images_rebuild(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    model, images = inputs
    study = write_study(tmp_path, model=model, images=images)
    out = tmp_path / "out"
    assert main(["analyze", str(study), "--candidates"]) == 0
    before = _candidates(out)
    calib_before = _sha(out / "data" / "net" / "calibration.npy")

    write_images(images, 24, seed=5)  # same file names, other pixels
    assert main(["analyze", str(study), "--candidates"]) == 0
    assert _sha(out / "data" / "net" / "calibration.npy") != calib_before
    after = _candidates(out)
    # The calibration ranges changed, so the fully quantized candidate (k=0) did too.
    k0 = next(cid for cid, c in before.items() if c["k"] == 0)
    assert after[k0]["sha256"] != before[k0]["sha256"]
    assert all(after[cid]["build_key"] != before[cid]["build_key"] for cid in before)
    _files_match_store(out)
    _export_matches(out, tmp_path, 0)


def test_changed_quantization_setting_rebuilds(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    model, images = inputs
    study = write_study(tmp_path, model=model, images=images)
    out = tmp_path / "out"
    assert main(["analyze", str(study), "--candidates"]) == 0
    before = _candidates(out)

    write_study(tmp_path, model=model, images=images, quantization={"per_channel": True})
    assert main(["analyze", str(study), "--candidates"]) == 0
    after = _candidates(out)
    k0 = next(cid for cid, c in before.items() if c["k"] == 0)
    assert after[k0]["sha256"] != before[k0]["sha256"]
    assert all(after[cid]["build_key"] != before[cid]["build_key"] for cid in before)
    _files_match_store(out)
    _export_matches(out, tmp_path, 1)


def test_unchanged_inputs_reuse_everything(
    tmp_path: Path, inputs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, images = inputs
    study = write_study(tmp_path, model=model, images=images)
    out = tmp_path / "out"
    assert main(["analyze", str(study), "--candidates"]) == 0
    before = _candidates(out)

    built: list[Path] = []
    real = study_mod.quantize_candidate

    def counting(model_path: Path, dest: Path, *args: Any) -> None:
        built.append(dest)
        real(model_path, dest, *args)

    monkeypatch.setattr(study_mod, "quantize_candidate", counting)
    assert main(["analyze", str(study), "--candidates"]) == 0
    assert built == []
    assert _candidates(out) == before


def test_tool_version_change_rebuilds(
    tmp_path: Path, inputs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, images = inputs
    study = write_study(tmp_path, model=model, images=images)
    out = tmp_path / "out"
    assert main(["analyze", str(study), "--candidates"]) == 0
    before = _candidates(out)
    calibrations = set((out / "calibration").glob("*.json"))

    newer = {**study_mod.tool_versions(), "onnxruntime": "99.0.0"}
    monkeypatch.setattr(study_mod, "tool_versions", lambda: newer)
    monkeypatch.setattr(dataset_mod, "tool_versions", lambda: newer)
    assert main(["analyze", str(study), "--candidates"]) == 0
    after = _candidates(out)
    assert all(after[cid]["build_key"] != before[cid]["build_key"] for cid in before)
    assert set((out / "calibration").glob("*.json")) > calibrations  # calibrated again under the new key
    _files_match_store(out)


def test_stale_store_without_build_key_rebuilds(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    """A candidate row of an older store (no build_key) is never trusted."""
    model, images = inputs
    study = write_study(tmp_path, model=model, images=images)
    out = tmp_path / "out"
    assert main(["analyze", str(study), "--candidates"]) == 0
    con = sqlite3.connect(out / "tuneqn.db")
    con.execute("update candidates set build_key = null")
    con.commit()
    con.close()
    assert main(["analyze", str(study), "--candidates"]) == 0
    assert all(c["build_key"] for c in _candidates(out).values())


def test_export_after_weights_changed_exports_the_evaluated_candidate(
    tmp_path: Path, inputs: tuple[Path, Path]
) -> None:
    """Export copies the candidate as it was built and evaluated (checked by its sha256), whatever happened to
    the model file since: it reads the study folder only and re-quantizes nothing."""
    model, images = inputs
    study = write_study(tmp_path, model=model, images=images)
    out = tmp_path / "out"
    assert main(["analyze", str(study), "--candidates"]) == 0
    cnn(model, seed=1)
    dest = tmp_path / "x.onnx"
    assert main(["export", str(out), "--candidate", "0", "-o", str(dest)]) == 0
    stored = next(c for c in _candidates(out).values() if c["k"] == 0)
    assert exported_sha256(dest) == stored["sha256"]


def test_changed_labels_csv_reprepares_data(tmp_path: Path) -> None:
    """The data sample's key covers the label file's content, not only its path."""
    images = write_images(tmp_path / "labelled", 12, labelled=True)
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\n" + "".join(f"img_{i:03d}_{i % 10}.png,{i % 10}\n" for i in range(12)))
    spec = DatasetSpec(images=images, labels={"csv": csv}, eval=6, calibration=6, analysis=3)
    first = dataset_mod.prepare_data(spec, [1, 3, 8, 8], tmp_path / "o")
    csv.write_text("file,label\n" + "".join(f"img_{i:03d}_{i % 10}.png,{(i + 1) % 10}\n" for i in range(12)))
    second = dataset_mod.prepare_data(spec, [1, 3, 8, 8], tmp_path / "o")
    assert second.eval.labels == [(v + 1) % 10 for v in first.eval.labels or []]
