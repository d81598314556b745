"""The streamed percentile calibration gives ORT's own histograms and ranges (controller/quantize/histograms.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_models import qdq_zoo
from onnxruntime.quantization.calibrate import CalibrationMethod, PercentileCalibrater, create_calibrator

from tuneqn.controller.quantize.quantizer import ArrayReader, QuantSettings, calibrate, histograms


def _calibrator(model: Path, tmp: Path, name: str) -> PercentileCalibrater:
    cal = create_calibrator(
        model, augmented_model_path=str(tmp / f"{name}.onnx"), calibrate_method=CalibrationMethod.Percentile
    )
    assert isinstance(cal, PercentileCalibrater) and cal.symmetric
    return cal


def _both(model: Path, tmp: Path, *readers: tuple[ArrayReader, ArrayReader]) -> tuple[Any, Any]:
    lean, ort = _calibrator(model, tmp, "lean"), _calibrator(model, tmp, "ort")
    for ours, theirs in readers:
        histograms.collect_data(lean, ours)
        histograms._ORT_COLLECT_DATA(ort, theirs)
    return lean, ort


def _assert_same(lean: PercentileCalibrater, ort: PercentileCalibrater) -> None:
    mine, theirs = lean.collector.histogram_dict, ort.collector.histogram_dict
    assert list(mine) == list(theirs) and len(mine) > 10  # the same tensors, in the same order
    for name, (hist, edges, low, high) in theirs.items():
        l_hist, l_edges, l_low, l_high = mine[name]
        assert np.array_equal(l_hist, hist) and l_hist.dtype == hist.dtype, name
        assert np.array_equal(l_edges, edges) and l_edges.dtype == edges.dtype, name
        assert (l_low, l_high) == (low, high), name
        assert np.asarray(l_low).dtype == np.asarray(low).dtype == np.float32, name
    assert _ranges(lean) == _ranges(ort)


def _ranges(cal: PercentileCalibrater) -> dict[str, tuple[float, float]]:
    return {name: (float(t.lowest), float(t.highest)) for name, t in cal.compute_data().data.items()}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return qdq_zoo(tmp_path_factory.mktemp("zoo") / "zoo.onnx")


def _data(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.5, 0.4, (n, 3, 16, 16)).astype(np.float32)


def test_the_histograms_are_orts_bit_for_bit(zoo: Path, tmp_path: Path) -> None:
    """Every op kind of the QDQ quantizer's zoo, batches of 3: the same histograms, edges, minima and maxima."""
    data = _data(0, 12)
    lean, ort = _both(zoo, tmp_path, (ArrayReader("input", data, 3), ArrayReader("input", data.copy(), 3)))
    _assert_same(lean, ort)


def test_what_it_does_not_cover_goes_to_orts_method(zoo: Path, tmp_path: Path) -> None:
    """A second collection merges into the first's histograms (ORT's rebinning); batches of different shapes fail
    as in ORT."""
    first, second = _data(1, 4), _data(2, 4) * 3
    lean, ort = _both(
        zoo,
        tmp_path,
        (ArrayReader("input", first, 2), ArrayReader("input", first, 2)),
        (ArrayReader("input", second, 2), ArrayReader("input", second, 2)),
    )
    _assert_same(lean, ort)
    uneven = _data(3, 5)  # batches of 2, 2 and 1
    with pytest.raises(ValueError) as ours:
        histograms.collect_data(_calibrator(zoo, tmp_path, "a"), ArrayReader("input", uneven, 2))
    with pytest.raises(ValueError) as theirs:
        histograms._ORT_COLLECT_DATA(_calibrator(zoo, tmp_path, "b"), ArrayReader("input", uneven, 2))
    assert str(ours.value) == str(theirs.value)


def test_nan_fails_as_in_ort(tmp_path: Path) -> None:
    """ORT skips NaN in a tensor's minimum and maximum, then np.histogram fails on the range: so does this."""
    graph = helper.make_graph(
        [helper.make_node("Log", ["input"], ["log"], name="log"), helper.make_node("Relu", ["log"], ["out"], name="r")],
        "nan",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])],
    )
    model = tmp_path / "nan.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    data = np.array([[1.0, 2.0, -1.0, 3.0]] * 2, np.float32)
    with pytest.raises(ValueError) as ours:
        histograms.collect_data(_calibrator(model, tmp_path, "a"), ArrayReader("input", data, 1))
    with pytest.raises(ValueError) as theirs:
        histograms._ORT_COLLECT_DATA(_calibrator(model, tmp_path, "b"), ArrayReader("input", data, 1))
    assert str(ours.value) == str(theirs.value) and "range" in str(ours.value)


def test_a_percentile_calibration_gives_orts_ranges(zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole calibration (quantize_static's calibrator): the same cache content with ORT's own method as with
    this one, which ``calibrate`` installs."""
    data = _data(4, 12)
    settings = QuantSettings(calibration_method="percentile")  # per tensor, static, QDQ
    lean = calibrate(zoo, "input", "N", data, settings, tmp_path / "lean.json")
    assert PercentileCalibrater.collect_data is histograms.collect_data
    monkeypatch.setattr(PercentileCalibrater, "collect_data", histograms._ORT_COLLECT_DATA)
    monkeypatch.setattr(histograms, "install", lambda: None)
    ort = calibrate(zoo, "input", "N", data, settings, tmp_path / "ort.json")
    ranges = [json.loads(p.read_text())["data"] for p in (lean, ort)]
    assert len(ranges[0]) > 10 and ranges[0] == ranges[1]
