"""Precision levels per layer: each level's candidate runs as labelled, is named by its content, exports the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import exported_sha256, write_study
from onnx import TensorProto, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.quant_utils import compute_data_quant_params, quantize_onnx_initializer
from ort_graphs import ran_graph

from tuneqn.controller.cli import main
from tuneqn.controller.config import load_config
from tuneqn.controller.quantize.edits import Unsupported
from tuneqn.controller.quantize.levels import int4_per_channel, int4_tensor, normalize_levels
from tuneqn.controller.study import Study

LEVELS = {"conv1": "int4", "conv2": "fp32", "conv4": "fp16", "fc": "int4"}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Study:
    """A prepared study of the small CNN (per-tensor recipe), shared by the module's tests (read-only)."""
    tmp = tmp_path_factory.mktemp("levels")
    s = Study(load_config(write_study(tmp, model=assets / "cnn.onnx", images=assets / "images")))
    s.prepare()
    yield s
    s.close()


@pytest.mark.parametrize(("shape", "axis"), [((16, 8, 3, 3), 0), ((40, 24), 1), ((6, 4), 0)])
def test_int4_weights_are_onnxruntimes_own(shape: tuple[int, ...], axis: int) -> None:
    """All channels at once give ORT's per-channel symmetric int4 scales and packed values, byte for byte."""
    rng = np.random.default_rng(len(shape))
    w = rng.normal(0, 1, shape).astype(np.float32) * rng.uniform(1e-3, 2, shape[axis]).reshape(
        [-1 if i == axis else 1 for i in range(len(shape))]
    ).astype(np.float32)
    w.take(indices=[1], axis=axis).fill(0)  # a channel of zeros (scale 1 by ORT's rule)
    zps, scales = zip(
        *(compute_data_quant_params(w.take(c, axis).ravel(), TensorProto.INT4, True) for c in range(shape[axis])),
        strict=True,
    )
    ref = quantize_onnx_initializer(
        numpy_helper.from_array(w, "w"), TensorProto.INT4, np.asarray(zps), np.asarray(scales, np.float32), axis, "q"
    )
    ours_scale, values = int4_per_channel(w, axis)
    ours = int4_tensor(values, "q")
    assert np.array_equal(ours_scale, np.asarray(scales, np.float32))
    assert (ours.raw_data, list(ours.dims), ours.data_type) == (ref.raw_data, list(ref.dims), ref.data_type)


def test_levels_name_the_candidate(study: Study) -> None:
    """An exclusion set keeps its id; levels make another candidate; fp32 given as a level is an exclusion."""
    plain = study.make_plan("cnn", "static", ["conv2"])
    assert plain.id == study.make_plan("cnn", "static", [], levels={"conv2": "fp32"}).id
    assert plain.levels == () and plain.id.endswith(":x" + plain.id.rsplit(":x", 1)[1])
    mixed = study.make_plan("cnn", "static", [], levels=LEVELS)
    assert mixed.excluded == ("conv2", "conv4") and mixed.k == 2
    assert mixed.levels == (("conv1", "int4"), ("conv4", "fp16"), ("fc", "int4"))
    assert mixed.label == "k=2 +1 fp16 +2 int4"
    assert len({plain.id, mixed.id, study.make_plan("cnn", "static", [], levels={"fc": "int4"}).id}) == 3
    assert study.make_plan("cnn", "static", [], levels={"fc": "int4"}).id != study.make_plan("cnn", "static", ()).id
    assert study.build_key(mixed) != study.build_key(plain)
    with pytest.raises(ValueError, match="unknown precision level 'int2'"):
        normalize_levels({"fc": "int2"})


def _weight_source(model: onnx.ModelProto, layer: str) -> tuple[str, int | None, str]:
    """(op type of the producer of the layer's weight, data type of that producer's input initializer, domain)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == layer)
    p = producers.get(node.input[1])
    if p is None:
        return "initializer", inits[node.input[1]].data_type, ""
    src = inits.get(p.input[0])
    return p.op_type, None if src is None else src.data_type, p.domain


def test_each_level_runs_as_labelled(study: Study, tmp_path: Path) -> None:
    """The file says what each layer is, and the graph ONNX Runtime runs does it: fp16 and fp32 layers as float
    convolutions, int4 layers in float on their 4-bit weights dequantized, the int8 one as a QLinearConv."""
    plan = study.make_plan("cnn", "static", [], levels=LEVELS)
    row = study.build(plan, out=tmp_path / "mixed.onnx")
    model = onnx.load(row["path"])
    assert _weight_source(model, "conv4") == ("Cast", TensorProto.FLOAT16, "")
    assert _weight_source(model, "conv2") == ("initializer", TensorProto.FLOAT, "")
    inits = {i.name: i for i in model.graph.initializer}
    for layer, weights in (("conv1", 8 * 3 * 3 * 3), ("fc", 10 * 8)):  # 4-bit values, two to a byte
        assert _weight_source(model, layer)[0] == "Mul"
        packed = inits[f"{layer}_int4_packed"]
        assert packed.data_type == TensorProto.UINT8 and list(packed.dims) == [(weights + 1) // 2]
    assert _weight_source(model, "conv3") == ("DequantizeLinear", TensorProto.INT8, "")
    assert row["runtime"]["ort_disabled_optimizers"] == ["WeightBiasQuantization"]

    ran = ran_graph(row["path"], tmp_path, row["runtime"]["ort_disabled_optimizers"])
    producers = {o: n for n in ran.graph.node for o in n.output}
    inits = {i.name: i for i in ran.graph.initializer}
    kinds: dict[str, str] = {}
    for n in ran.graph.node:
        if n.op_type in ("QLinearConv", "QGemm"):
            kinds[n.op_type] = kinds.get(n.op_type, "") + "q"
        elif n.op_type in ("Conv", "FusedConv", "Gemm", "FusedGemm"):
            w = producers.get(n.input[1])
            if w is None:
                kinds.setdefault("float", "")
                kinds["float"] += "f" if inits[n.input[1]].data_type == TensorProto.FLOAT else "?"
            else:
                kinds[w.op_type] = kinds.get(w.op_type, "") + "?"
    # conv4 (fp16: its Cast folded at load), conv2 (fp32) and conv1, fc (int4: their unpacking folded at load, so
    # nothing is dequantized per run) run as float layers on their weights; conv3 (int8) as a QLinearConv
    assert kinds == {"float": "ffff", "QLinearConv": "q"}, kinds
    assert not {"BitShift", "Slice", "Cast"} & {n.op_type for n in ran.graph.node}

    # the bytes: conv4's weight at half its fp32 size; the int4 weights two to a byte (checked above)
    fp16 = next(i for i in model.graph.initializer if i.name.endswith("_fp16"))
    assert fp16.data_type == TensorProto.FLOAT16 and len(fp16.raw_data) == 2 * 8 * 8 * 3 * 3


class _Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray) -> None:
        self.x, self.i = x, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        self.i += 1
        return {"input": self.x[self.i - 1 : self.i]} if self.i <= len(self.x) else None


def _orts(study: Study, out: Path, x: np.ndarray, overrides: dict[str, list[dict[str, object]]]) -> None:
    """The oracle: ONNX Runtime's quantizer on the study's model, same recipe and calibration, with overrides."""
    quantize_static(
        str(study.quantizer_input("cnn")),
        str(out),
        _Reader(x),
        quant_format=QuantFormat.QDQ,
        per_channel=False,
        extra_options={"TensorQuantOverrides": overrides},
        calibration_cache_path=str(study.calibration_cache("cnn", "static")),
    )


def test_int4_layers_compute_what_onnxruntimes_int4_quantization_does(study: Study, tmp_path: Path) -> None:
    """The oracle: ONNX Runtime's own quantizer told to quantize those weights to int4 per channel
    (``TensorQuantOverrides``) from the same calibration gives the very same outputs."""
    plan = study.make_plan("cnn", "static", [], levels={"conv3": "int4", "fc": "int4"})
    ours = study.build(plan, out=tmp_path / "ours.onnx")
    x = np.load(study.eval_split("cnn").path)
    int4 = [{"quant_type": QuantType.QInt4, "axis": 0, "symmetric": True}]
    _orts(study, tmp_path / "orts.onnx", x, {"conv3.W": int4, "fc.W": int4})
    so = ort.SessionOptions()
    so.log_severity_level = 3

    def run(path: Path | str) -> np.ndarray:
        return ort.InferenceSession(str(path), so).run(None, {"input": x})[0]

    assert np.array_equal(run(ours["path"]), run(tmp_path / "orts.onnx"))
    assert not np.array_equal(run(ours["path"]), run(study.build(study.make_plan("cnn", "static", ()))["path"]))


def test_a_level_that_does_not_fit_is_refused(study: Study, tmp_path: Path) -> None:
    """int4 on a layer left in float, or on a node that is no layer, says so (the build is refused)."""
    with pytest.raises(Unsupported, match="relu1"):
        study.build(study.make_plan("cnn", "static", [], levels={"relu1": "int4"}), out=tmp_path / "x.onnx")


def test_level_candidates_export_bit_identical(
    tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stored level candidate exports with its sha256, twice the same, and a plain session keeps its fp16, fp32
    and int4 layers float (export rewrites what WeightBiasQuantization would quantize)."""
    s = Study(load_config(write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images")))
    s.prepare()
    row = s.build(s.make_plan("cnn", "static", [], levels=LEVELS))
    s.close()
    files = []
    for n in (1, 2):
        out = tmp_path / f"exported-{n}.onnx"
        assert main(["export", str(tmp_path / "out"), "--candidate", row["id"], "-o", str(out)]) == 0
        files.append(out)
    capsys.readouterr()
    assert files[0].read_bytes() == files[1].read_bytes()
    assert exported_sha256(files[0]) == row["sha256"]
    plain = ran_graph(str(files[0]), tmp_path, [])
    floats = {i.name for i in plain.graph.initializer if i.data_type == TensorProto.FLOAT}
    # conv2 (fp32), conv4 (fp16) and conv1 (int4, unpacked at load) run as float convolutions; conv3 quantized
    assert sum(1 for n in plain.graph.node if n.op_type in ("Conv", "FusedConv") and n.input[1] in floats) == 3


def test_an_explicit_set_takes_levels_where_its_recipe_can(
    tmp_path: Path, assets: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``[[search.exclusion_sets]] levels``: an explicit candidate with fp16 and int4 layers on a static QDQ recipe;
    left out, with one warning, on a recipe that cannot take them (dynamic)."""
    toml = write_study(
        tmp_path,
        model=assets / "cnn.onnx",
        images=assets / "images",
        quantization={"recipes": [{"name": "q", "mode": "static"}, {"name": "d", "mode": "dynamic"}]},
        search={"exclusion_sets": [{"name": "mixed", "layers": ["conv2"], "levels": {"conv4": "fp16", "fc": "int4"}}]},
    )
    s = Study(load_config(toml))
    s.prepare()
    try:
        (plan,) = s.explicit_plans("cnn", "q")
        assert (plan.label, plan.excluded, plan.levels) == (
            "mixed",
            ("conv2", "conv4"),
            (("conv4", "fp16"), ("fc", "int4")),
        )
        assert s.build(plan)["levels"] == {"conv4": "fp16", "fc": "int4"}
        assert s.explicit_plans("cnn", "d") == [] and s.explicit_plans("cnn", "d") == []
        assert sum("exclusion set mixed left out" in r.getMessage() for r in caplog.records) == 1
    finally:
        s.close()


def test_a16_reads_the_layers_input_at_16_bits(study: Study, tmp_path: Path) -> None:
    """``a16``: the layer reads its input through a 16-bit QuantizeLinear/DequantizeLinear pair of its own (the
    8-bit pair gone when it was the only reader), ONNX Runtime runs it as a float convolution on that input, and
    its outputs are those of ONNX Runtime's quantizer told to quantize that activation to uint16
    (``TensorQuantOverrides``; the bias then differs by its rounding only)."""
    row = study.build(study.make_plan("cnn", "static", [], levels={"conv3": "a16"}), out=tmp_path / "a16.onnx")
    model = onnx.load(row["path"])
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    conv3 = next(n for n in model.graph.node if n.name == "conv3")
    dq = producers[conv3.input[0]]
    assert dq.op_type == "DequantizeLinear" and inits[dq.input[2]].data_type == TensorProto.UINT16
    assert producers[dq.input[0]].op_type == "QuantizeLinear" and dq.domain == "com.microsoft"
    assert [n.name for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "r2"] == [dq.input[0]]
    ran = ran_graph(row["path"], tmp_path, row["runtime"]["ort_disabled_optimizers"])
    # conv1 and conv4 stay QLinearConv; conv3 runs float on its 16-bit input, and so does conv2, whose output is
    # now quantized at 16 bits only (ONNX Runtime has no 16-bit convolution kernel on the CPU)
    assert sum(1 for n in ran.graph.node if n.op_type == "QLinearConv") == 2
    assert any(n.op_type in ("Conv", "FusedConv") for n in ran.graph.node)

    x = np.load(study.eval_split("cnn").path)
    _orts(study, tmp_path / "orts.onnx", x, {"r2": [{"quant_type": QuantType.QUInt16}]})
    so = ort.SessionOptions()
    so.log_severity_level = 3

    def run(path: Path | str) -> np.ndarray:
        return ort.InferenceSession(str(path), so).run(None, {"input": x})[0]

    ours, orts, fp32 = run(row["path"]), run(tmp_path / "orts.onnx"), run(study.quantizer_input("cnn"))
    fq = run(study.build(study.make_plan("cnn", "static", ()))["path"])
    assert np.abs(ours - orts).max() < 0.05 * np.abs(fq - fp32).max()
    assert np.abs(ours - fp32).mean() < np.abs(fq - fp32).mean()
