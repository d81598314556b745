"""QOperator candidates by graph edits equal ONNX Runtime's own ``nodes_to_exclude`` output."""

from __future__ import annotations

import random
import tomllib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from ort_graphs import op_counts, ran_graph

from tuneqn.controller.config import DatasetSpec, ModelSpec
from tuneqn.controller.prepare.dataset import prepare_data
from tuneqn.controller.prepare.modelio import prepare_model
from tuneqn.controller.quantize.edits import Unsupported
from tuneqn.controller.quantize.edits_qop import QOperatorEditor, derive_qoperator
from tuneqn.controller.quantize.quantizer import (
    QuantSettings,
    calibrate,
    default_op_types,
    quantize_candidate,
    runtime_options,
)

PER_TENSOR = QuantSettings(format="qoperator")  # otherwise the defaults: static, per tensor, u8/s8, min/max
#: Layers (what tuneqn excludes) and other quantized nodes of :func:`_zoo`.
LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc", "proj"]
OTHERS = ["add3", "mul4", "sigmoid4", "cat", "avgpool", "gap", "pool", "flat", "reshape"]


def _zoo(path: Path, seed: int = 0) -> Path:
    """Conv+Relu → MaxPool → Conv+Clip → Conv + residual Add; Conv → Sigmoid·x (Mul); Concat → Conv →
    AveragePool → GlobalAveragePool → Flatten → Gemm+Relu → Reshape → MatMul (10 logits)."""
    rng = np.random.default_rng(seed)
    inits: list[TensorProto] = []

    def w(name: str, *shape: int, scale: float = 0.3) -> str:
        inits.append(numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name))
        return name

    def conv(name: str, cin: int, cout: int, inp: str) -> onnx.NodeProto:
        return helper.make_node(
            "Conv",
            [inp, w(f"{name}.W", cout, cin, 3, 3), w(f"{name}.B", cout, scale=0.1)],
            [f"{name}_out"],
            name=name,
            pads=[1, 1, 1, 1],
        )

    inits += [
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(6.0, np.float32), "six"),
        numpy_helper.from_array(np.array([-1, 16], np.int64), "shape"),
    ]
    nodes = [
        conv("conv1", 3, 8, "input"),
        helper.make_node("Relu", ["conv1_out"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        conv("conv2", 8, 8, "p1"),
        helper.make_node("Clip", ["conv2_out", "zero", "six"], ["c2"], name="clip2"),
        conv("conv3", 8, 8, "c2"),
        helper.make_node("Add", ["c2", "conv3_out"], ["a3"], name="add3"),
        conv("conv4", 8, 8, "a3"),
        helper.make_node("Sigmoid", ["conv4_out"], ["s4"], name="sigmoid4"),
        helper.make_node("Mul", ["conv4_out", "s4"], ["m4"], name="mul4"),
        helper.make_node("Concat", ["a3", "m4"], ["cat_out"], name="cat", axis=1),
        conv("conv5", 16, 8, "cat_out"),
        helper.make_node("AveragePool", ["conv5_out"], ["ap5"], name="avgpool", kernel_shape=[2, 2]),
        helper.make_node("GlobalAveragePool", ["ap5"], ["g5"], name="gap"),
        helper.make_node("Flatten", ["g5"], ["f5"], name="flat"),
        helper.make_node("Gemm", ["f5", w("fc.W", 16, 8), w("fc.B", 16, scale=0.1)], ["fc_out"], name="fc", transB=1),
        helper.make_node("Relu", ["fc_out"], ["fr"], name="relu_fc"),
        helper.make_node("Reshape", ["fr", "shape"], ["rs"], name="reshape"),
        helper.make_node("MatMul", ["rs", w("proj.W", 16, 10)], ["logits"], name="proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "zoo",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The zoo model, its calibration caches and its fully quantized QOperator models (per-tensor, per-channel)."""
    d = tmp_path_factory.mktemp("zoo")
    path = _zoo(d / "zoo.onnx")
    calib = np.random.default_rng(1).uniform(-1, 1, (16, 3, 8, 8)).astype(np.float32)
    out: dict = {"path": path, "data": calib[:4], "recipes": {}}
    for per_channel in (False, True):
        settings = PER_TENSOR.model_copy(update={"per_channel": per_channel})
        cache = calibrate(path, "input", "N", calib, settings, d / f"calib-{per_channel}.json")
        quantize_candidate(path, d / f"fq-{per_channel}.onnx", settings, [], cache)
        out["recipes"][per_channel] = (settings, cache, onnx.load(str(d / f"fq-{per_channel}.onnx")))
    return out


def _ort_candidate(zoo: dict, per_channel: bool, exclude: list[str], tmp: Path) -> bytes:
    """The file ONNX Runtime's quantizer writes for this candidate (tuneqn's names restored)."""
    settings, cache, _ = zoo["recipes"][per_channel]
    out = tmp / "ort.onnx"
    quantize_candidate(zoo["path"], out, settings, exclude, cache)
    return out.read_bytes()


def _bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def _run(model: onnx.ModelProto, x: np.ndarray, exclude: list[str], batch: int | None = None) -> np.ndarray:
    """The model's first output on ``x``, ``batch`` rows per run (all at once by default), in one session."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1  # the same outputs; a second thread only spins on a busy two-core machine
    disabled = runtime_options(model, exclude)["ort_disabled_optimizers"]
    sess = ort.InferenceSession(
        model.SerializeToString(), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled
    )
    name, step = sess.get_inputs()[0].name, batch or len(x)
    return np.concatenate([sess.run(None, {name: x[i : i + step]})[0] for i in range(0, len(x), step)])


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_random_exclusions_are_bit_identical(zoo: dict, per_channel: bool, tmp_path: Path) -> None:
    """Many seeded exclusion sets of layers and other quantized nodes: the derived candidate is ORT's, byte for byte."""
    settings, cache, fq = zoo["recipes"][per_channel]
    # every rule is exercised: these are what ORT made of the zoo (Relu/Clip fused, 8-bit MaxPool/Flatten/Reshape)
    assert {n.op_type for n in fq.graph.node} == {
        "QuantizeLinear",
        "QLinearConv",
        "MaxPool",
        "QLinearAdd",
        "QLinearSigmoid",
        "QLinearMul",
        "QLinearConcat",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "Flatten",
        "QGemm",
        "Reshape",
        "QLinearMatMul",
        "DequantizeLinear",
    }
    float_model = onnx.load(str(zoo["path"]))
    editor = QOperatorEditor(fq, float_model, cache, settings)
    rng = random.Random(18 + per_channel)
    sets = [
        [],
        list(LAYERS),
        LAYERS + OTHERS,
        ["conv1"],
        ["conv5"],
        ["conv2", "conv4"],
        ["fc"],
        ["proj"],
        ["conv5", "fc"],
        ["cat"],
        ["gap"],
        ["add3", "conv4"],
    ]
    sets += [rng.sample(LAYERS, rng.randint(1, len(LAYERS))) for _ in range(14)]
    sets += [rng.sample(LAYERS + OTHERS, rng.randint(1, 8)) for _ in range(10)]
    for exclude in sets:
        derived = editor.derive_bytes(exclude)
        assert derived == _ort_candidate(zoo, per_channel, exclude, tmp_path), exclude
        assert editor.derive_bytes(exclude) == derived  # run to run
    assert _bytes(derive_qoperator(fq, float_model, ["conv5"])) == editor.derive_bytes(["conv5"])
    # what the Study writes: serialized once, its size and graph known without parsing the file back
    candidate, model = editor.derive(["conv5", "fc"]), editor.derive_model(["conv5", "fc"])
    assert candidate.to_bytes() == _bytes(model) and candidate.size == model.ByteSize()
    assert [n.name for n in candidate.nodes] == [n.name for n in model.graph.node]
    assert candidate.initializer_names == {t.name for t in model.graph.initializer}


@pytest.mark.parametrize(
    "op_types",
    [
        sorted(set(default_op_types("static")) - {"Conv"}),  # feasibility's `<recipe>.float-Conv` variant
        ["Conv", "Gemm", "MatMul"],
    ],
    ids=["float-Conv", "layers-only"],
)
def test_recipes_with_fewer_op_types(zoo: dict, op_types: list[str], tmp_path: Path) -> None:
    """Op types a recipe leaves in float stay float in every candidate, as in ONNX Runtime's own output."""
    settings = PER_TENSOR.model_copy(update={"op_types": tuple(op_types)})
    calib = np.random.default_rng(1).uniform(-1, 1, (16, 3, 8, 8)).astype(np.float32)
    cache = calibrate(zoo["path"], "input", "N", calib, settings, tmp_path / "calib.json")
    quantize_candidate(zoo["path"], tmp_path / "fq.onnx", settings, [], cache)
    editor = QOperatorEditor(onnx.load(str(tmp_path / "fq.onnx")), onnx.load(str(zoo["path"])), cache, settings)
    rng = random.Random(7)
    for _ in range(8):
        exclude = rng.sample(LAYERS, rng.randint(1, 4)) + rng.sample(OTHERS, rng.randint(0, 2))
        quantize_candidate(zoo["path"], tmp_path / "ort.onnx", settings, exclude, cache)
        assert editor.derive_bytes(exclude) == (tmp_path / "ort.onnx").read_bytes(), exclude


def test_scale_missing_from_the_quantized_model_needs_the_calibration_cache(zoo: dict, tmp_path: Path) -> None:
    """conv1 float leaves MaxPool float; conv2 then quantizes MaxPool's output, whose scale ONNX Runtime computes
    from its calibrated range and the fully quantized model does not hold: refused without the cache, exact with it."""
    settings, cache, fq = zoo["recipes"][False]
    float_model = onnx.load(str(zoo["path"]))
    with pytest.raises(Unsupported, match="no scale for p1"):
        derive_qoperator(fq, float_model, ["conv1"])
    derived = QOperatorEditor(fq, float_model, cache, settings).derive_model(["conv1"])
    assert "p1_scale" in {t.name for t in derived.graph.initializer}
    assert _bytes(derived) == _ort_candidate(zoo, False, ["conv1"], tmp_path)


def test_excluded_fused_activation_is_refused_not_guessed(zoo: dict, tmp_path: Path) -> None:
    """Excluding a Relu/Clip ONNX Runtime fused into a quantized Conv changes that Conv's output range,
    which the fully quantized model does not hold: the edit refuses; with the Conv float too it is exact."""
    settings, cache, fq = zoo["recipes"][False]
    editor = QOperatorEditor(fq, onnx.load(str(zoo["path"])), cache, settings)
    with pytest.raises(Unsupported, match="conv2: its fused Clip is excluded"):
        editor.derive_bytes(["clip2"])
    exclude = ["conv2", "clip2"]
    assert editor.derive_bytes(exclude) == _ort_candidate(zoo, False, exclude, tmp_path)
    assert editor.derive_bytes(["no-such-layer"]) == _bytes(fq)  # ORT ignores names that are not nodes


def test_editor_refuses_a_model_it_cannot_replay(zoo: dict) -> None:
    """A float model that is not the one the fully quantized model came from (a node renamed) is refused."""
    _, _, fq = zoo["recipes"][False]
    other = onnx.load(str(zoo["path"]))
    other.graph.node[0].name = "renamed"
    with pytest.raises(Unsupported):
        QOperatorEditor(fq, other)


def test_excluded_layers_run_in_float(zoo: dict, tmp_path: Path) -> None:
    """What ONNX Runtime really runs for a derived candidate, with its runtime options: the excluded
    Conv/Gemm/MatMul in float (weights float), the others quantized; outputs equal ORT's own candidate's."""
    settings, cache, fq = zoo["recipes"][True]
    editor = QOperatorEditor(fq, onnx.load(str(zoo["path"])), cache, settings)
    exclude = ["conv2", "conv4", "fc"]
    derived = editor.derive_model(exclude)
    path = tmp_path / "derived.onnx"
    onnx.save(derived, str(path))
    ran = op_counts(ran_graph(str(path), tmp_path, runtime_options(derived, exclude)["ort_disabled_optimizers"]))
    assert ran == {"float_conv": 2, "float_gemm": 1, "QLinearConv": 3, "QGemm": 0}
    ref = onnx.load_from_string(_ort_candidate(zoo, True, exclude, tmp_path))
    np.testing.assert_array_equal(_run(derived, zoo["data"], exclude), _run(ref, zoo["data"], exclude))


@pytest.mark.slow
def test_lite0_derived_candidates_match_the_quantizer(example_dir: Path, tmp_path: Path) -> None:
    """EfficientNet-Lite0, per-tensor and per-channel QOperator: random exclusion sets of its 50 layers give
    ORT's own candidate byte for byte, and a derived candidate runs (top-1 mostly FP32's on 32 photos)."""
    cfg = tomllib.loads((example_dir.parent / "study.toml").read_text())
    pm = prepare_model(ModelSpec(path=example_dir / "model.onnx", input_shape=[1, 3, 224, 224]), tmp_path / "models")
    spec = DatasetSpec(**{**cfg["dataset"], "images": example_dir / "images", "labels": {}, "eval": 32})
    data = prepare_data(spec, pm.input_shape, tmp_path / "data")
    x = data.eval.load()
    float_model = onnx.load(str(pm.path))
    layers = [n.name for n in float_model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(layers) == 50
    fp32_top1 = _run(float_model, x, [], batch=1).argmax(1)
    rng = random.Random(18)
    # per-tensor and per-channel share their calibration (QuantSettings.calibration_key)
    cache = calibrate(
        pm.path, pm.input_name, pm.input_shape[0], data.calibration.load(), PER_TENSOR, tmp_path / "calib.json"
    )
    for per_channel, n_sets in ((False, 5), (True, 2)):
        settings = PER_TENSOR.model_copy(update={"per_channel": per_channel})
        quantize_candidate(pm.path, tmp_path / "fq.onnx", settings, [], cache)
        editor = QOperatorEditor(onnx.load(str(tmp_path / "fq.onnx")), float_model, cache, settings)
        sets = [["/_conv_head/Conv", "/_fc/Gemm"]] + [rng.sample(layers, rng.randint(1, 12)) for _ in range(n_sets)]
        for exclude in sets:
            quantize_candidate(pm.path, tmp_path / "ort.onnx", settings, exclude, cache)
            assert editor.derive_bytes(exclude) == (tmp_path / "ort.onnx").read_bytes(), exclude
        # the same bytes predict the same (running ORT's candidate too would show nothing more): the last set's
        # derived model runs, and as a quantized Lite0 does
        derived = editor.derive_model(exclude)
        assert derived.SerializeToString() == (tmp_path / "ort.onnx").read_bytes()
        top1 = _run(derived, x, exclude, batch=1).argmax(1)
        assert np.mean(top1 == fp32_top1) >= 0.75, (per_channel, np.mean(top1 == fp32_top1))
