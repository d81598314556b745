"""Candidates by graph edits (controller/quantize/edits.py): the same bytes as ONNX Runtime's quantizer, exact sizes.

The proof: for many random exclusion sets, the derived candidate is byte for byte what
``quantize_static(..., nodes_to_exclude=...)`` writes with the same calibration cache, on a model with every
op kind the QDQ quantizer treats differently (tests/onnx_models.py: qdq_zoo), for the default recipes'
settings (per tensor, per channel, percentile calibration) and symmetric activations (no Relu removal).
"""

from __future__ import annotations

import random
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import write_study
from onnx_models import cnn, qdq_zoo
from ort_graphs import ran_graph

from tuneqn.controller.config import RECIPE_PRESETS, QuantizationSpec, load_config, parse_config
from tuneqn.controller.quantize.edits import QdqIndex, Unsupported, varint_size
from tuneqn.controller.quantize.quantizer import WBQ, QuantSettings, calibrate, quantize_candidate, runtime_options
from tuneqn.controller.study import Study

RECIPES = ["per-tensor", "per-channel", "per-tensor-percentile", "per-channel-symmetric"]
#: Why a candidate may be refused (then the quantizer builds it): an excluded Relu/Clip (ORT then calibrates its
#: producer's output with another range) or a weight shared with an excluded layer.
REFUSALS = ("excluding Relu", "excluding Clip", "weight conv5.W")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[bool, str], tuple[Path, Path, Path, QuantSettings]]:
    """Per (graph output on conv5, recipe): the float model, its calibration cache and fully quantized model."""
    d = tmp_path_factory.mktemp("zoo")
    x = np.random.default_rng(0).normal(0, 1, (16, 3, 16, 16)).astype(np.float32)
    out = {}
    for graph_output in (False, True):
        model = qdq_zoo(d / f"zoo-{graph_output}.onnx", graph_output_conv=graph_output)
        for recipe in RECIPES:
            settings = QuantSettings.from_spec(QuantizationSpec(), recipe)
            cache = calibrate(model, "input", "N", x, settings, d / f"calib-{graph_output}-{recipe}.json")
            fq = d / f"fq-{graph_output}-{recipe}.onnx"
            quantize_candidate(model, fq, settings, [], cache)
            out[(graph_output, recipe)] = (model, cache, fq, settings)
    return out


def _node_names(model: Path) -> list[str]:
    return [n.name for n in onnx.load(str(model)).graph.node]


@pytest.mark.parametrize("graph_output", [False, True])
@pytest.mark.parametrize("recipe", RECIPES)
def test_derived_candidates_are_the_quantizers_bytes(
    zoo: dict, tmp_path: Path, recipe: str, graph_output: bool
) -> None:
    model, cache, fq, settings = zoo[(graph_output, recipe)]
    index = QdqIndex.load(model, fq, cache, settings)
    names = _node_names(model)
    activations = [n for n in names if n.startswith(("relu", "clip"))]
    others = [n for n in names if n not in activations]
    rng = random.Random(f"{recipe}-{graph_output}")
    derived = 0
    for trial in range(16):  # any node but a Relu/Clip: 1 set in 4 with one of those too
        exclude = rng.sample(others, rng.randint(1, 7)) + ([rng.choice(activations)] if trial % 4 == 3 else [])
        ref = tmp_path / f"ref-{trial}.onnx"
        quantize_candidate(model, ref, settings, exclude, cache)
        try:
            cand = index.derive(exclude)
        except Unsupported as exc:
            assert str(exc).startswith(REFUSALS), exc
            continue
        assert cand.to_bytes() == ref.read_bytes(), exclude
        assert index.size(exclude) == cand.size == ref.stat().st_size
        derived += 1
    assert derived >= 5
    # every set of weighted layers that leaves the shared weight alone is derived
    layers = ["conv1", "conv2", "conv3", "conv4", "fc1", "fc2"]
    for trial in range(6):
        exclude = rng.sample(layers, rng.randint(1, len(layers)))
        ref = tmp_path / f"layers-{trial}.onnx"
        quantize_candidate(model, ref, settings, exclude, cache)
        assert index.derive(exclude).to_bytes() == ref.read_bytes(), exclude


def test_derived_candidates_run_like_the_quantizers(zoo: dict, tmp_path: Path) -> None:
    """Identical outputs on a sample (the bytes are identical; this runs them)."""
    model, cache, fq, settings = zoo[(False, "per-channel")]
    index = QdqIndex.load(model, fq, cache, settings)
    x = np.random.default_rng(5).normal(0, 1, (4, 3, 16, 16)).astype(np.float32)
    for exclude in (["conv1"], ["conv3", "fc1"], ["swish", "concat", "pool1"]):
        path = tmp_path / "derived.onnx"
        index.derive(exclude).write(path)
        ref = tmp_path / "ref.onnx"
        quantize_candidate(model, ref, settings, exclude, cache)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        got = ort.InferenceSession(str(path), so, disabled_optimizers=[WBQ]).run(None, {"input": x})[0]
        want = ort.InferenceSession(str(ref), so, disabled_optimizers=[WBQ]).run(None, {"input": x})[0]
        np.testing.assert_array_equal(got, want)


def test_an_index_that_cannot_reproduce_its_fully_quantized_model_refuses(zoo: dict, tmp_path: Path) -> None:
    """The rules are checked against the fully quantized file when the index is built (another ORT version,
    say): a model they do not reproduce byte for byte derives nothing."""
    model, cache, fq, settings = zoo[(False, "per-tensor")]
    altered = onnx.load(str(fq))
    next(n for n in altered.graph.node if n.name == "conv1").doc_string = "written by another quantizer"
    path = tmp_path / "other-fq.onnx"
    onnx.save_model(altered, path)
    with pytest.raises(Unsupported, match="byte for byte"):
        QdqIndex.load(model, path, cache, settings)


def test_varint_sizes() -> None:
    assert [varint_size(n) for n in (0, 127, 128, 16383, 16384, 2**21, 2**28)] == [1, 1, 2, 2, 3, 4, 5]


@pytest.fixture
def study(tmp_path: Path, assets: Path) -> Iterator[Study]:
    model = cnn(tmp_path / "cnn.onnx", wide_layer="conv2")
    cfg = load_config(
        write_study(
            tmp_path,
            model=model,
            images=assets / "images",
            quantization={
                "recipes": [{"name": "per-tensor", "per_channel": False}, {"name": "per-channel", "per_channel": True}]
            },
        )
    )
    s = Study(cfg)
    s.prepare()
    s.analyze_all()
    yield s
    s.close()


def test_study_builds_derived_candidates_with_predicted_sizes(study: Study, tmp_path: Path) -> None:
    """Every prefix of the ranking: the size predicted before the build is the built file's, the file is the
    quantizer's, and the derived candidate's runtime options are what its file needs."""
    needs_option = 0
    for recipe in ("per-tensor", "per-channel"):
        plans = study.plan("cnn", recipe)
        fq = study.build(plans[0])  # the fully quantized model: the quantizer's
        for plan in plans[1:]:
            predicted = study.predicted_size(plan)
            assert predicted is not None and not study.size_needs_build(plan)
            assert study.derive(plan) is not None
            row = study.build(plan)
            assert row["size_bytes"] == predicted == Path(row["path"]).stat().st_size
            ref = tmp_path / "ref.onnx"
            quantize_candidate(
                study.quantizer_input("cnn"),
                ref,
                study.settings(recipe),
                list(plan.excluded),
                study.calibration_cache("cnn", recipe),
            )
            assert Path(row["path"]).read_bytes() == ref.read_bytes(), plan.id
            assert row["build_key"] != fq["build_key"]
            assert row["runtime"] == runtime_options(onnx.load(row["path"]), list(plan.excluded))
            needs_option += row["runtime"]["ort_disabled_optimizers"] == [WBQ]
    assert needs_option  # an excluded Conv reading a DequantizeLinear: WeightBiasQuantization off


def test_a_refused_candidate_is_built_by_the_quantizer(study: Study) -> None:
    plan = study.make_plan("cnn", "per-tensor", ["relu1"], "x")
    assert study.derive(plan) is None  # an excluded Relu changes calibrated ranges
    assert study.predicted_size(plan) is None and study.size_needs_build(plan)
    row = study.build(plan)
    assert row["size_bytes"] == Path(row["path"]).stat().st_size


def test_qoperator_recipes_are_derived_and_dynamic_ones_built_by_the_quantizer(tmp_path: Path, assets: Path) -> None:
    cfg = load_config(
        write_study(
            tmp_path,
            model=assets / "cnn.onnx",
            images=assets / "images",
            quantization={"recipes": [{"name": "qop", "format": "qoperator"}, {"name": "dyn", "mode": "dynamic"}]},
        )
    )
    with Study(cfg) as s:
        s.prepare()
        plan = s.make_plan("cnn", "qop", ["conv1"])
        derived = s.derive(plan)
        assert derived is not None and s.predicted_size(plan) == derived.size
        row = s.build(plan)
        ref = tmp_path / "ref.onnx"
        quantize_candidate(
            s.quantizer_input("cnn"), ref, s.settings("qop"), ["conv1"], s.calibration_cache("cnn", "qop")
        )
        assert Path(row["path"]).read_bytes() == ref.read_bytes()
        plan = s.make_plan("cnn", "dyn", ["conv1"])
        assert s.derive(plan) is None
        assert s.size_needs_build(plan)


def _float_layers(path: Path, disabled: list[str], tmp: Path) -> set[str]:
    """The Conv/Gemm nodes ONNX Runtime runs with float weights (its optimized graph, ``disabled`` optimizers off)."""
    ran = ran_graph(str(path), tmp, disabled)
    floats = {i.name for i in ran.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    return {
        n.name
        for n in ran.graph.node
        if n.op_type in ("Conv", "FusedConv", "Gemm", "FusedGemm") and len(n.input) > 1 and n.input[1] in floats
    }


@pytest.mark.slow
def test_lite0_derived_candidates_are_the_quantizers(example_dir: Path, tmp_path: Path) -> None:
    """EfficientNet-Lite0, per-tensor and per-channel: every k-prefix of the paper's ranking has the predicted size
    of the file the quantizer writes; two prefixes and 4 (per-channel: 2) random exclusion sets derive the
    quantizer's bytes, and their excluded layers run in float (the small zoo above covers every rule on many more
    sets). Both recipes in one study: they share its prepared model, data and calibration
    (QuantSettings.calibration_key), as in a real study; each recipe is checked on its own ranking, fully quantized
    model and candidates."""
    example_dir = example_dir.resolve()  # TUNEQN_EXAMPLE_DIR may be relative (make test)
    data = tomllib.loads((Path(__file__).parents[2] / "examples/lite0/study.toml").read_text())
    data["out_dir"] = str(tmp_path / "out")
    data["models"][0]["path"] = str(example_dir / "model.onnx")
    data["dataset"].update(images=str(example_dir / "images"), labels={"csv": str(example_dir / "labels.csv")})
    recipes = ["per-tensor", "per-channel"]
    data["quantization"]["recipes"] = [{"name": recipe, **RECIPE_PRESETS[recipe]} for recipe in recipes]
    with Study(parse_config(data, example_dir)) as study:
        study.prepare()
        model = next(iter(study.models))
        for recipe in recipes:
            src, settings, cache = (
                study.quantizer_input(model),
                study.settings(recipe),
                study.calibration_cache(model, recipe),
            )
            order = study.ranking(model, recipe)
            study.build(study.make_plan(model, recipe, ()))
            ref = tmp_path / f"ref-{recipe}.onnx"
            for k in range(1, len(order) + 1):  # every prefix: the prediction is the built file's size ...
                plan = study.make_plan(model, recipe, order[:k])
                predicted = study.predicted_size(plan)
                row = study.build(plan)
                assert predicted == row["size_bytes"] == Path(row["path"]).stat().st_size, (recipe, k)
                if k in (1, len(order)):  # ... and that file is the quantizer's (these k, and the random sets below)
                    quantize_candidate(src, ref, settings, order[:k], cache)
                    assert Path(row["path"]).read_bytes() == ref.read_bytes(), (recipe, k)
            rng = random.Random(recipe)
            for i in range(4 if recipe == "per-tensor" else 2):  # a per-channel quantizer run: ~2.5 s
                plan = study.make_plan(model, recipe, rng.sample(order, rng.randint(1, len(order))), f"random {i}")
                assert study.derive(plan) is not None
                row = study.build(plan)
                quantize_candidate(src, ref, settings, list(plan.excluded), cache)
                assert Path(row["path"]).read_bytes() == ref.read_bytes(), (recipe, plan.excluded)
                if i < 2:
                    ran_float = _float_layers(Path(row["path"]), row["runtime"]["ort_disabled_optimizers"], tmp_path)
                    assert len(ran_float) == len(plan.excluded)  # (ORT renames the Conv it fuses with its Clip)
