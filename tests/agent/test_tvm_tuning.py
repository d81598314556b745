"""MetaSchedule tuning of the TVM backend (agent/backends/tvm_tuning.py) on a tiny real model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.relax.frontend.onnx import from_onnx  # noqa: E402

from tuneqn.agent.backends import tvm_tuning  # noqa: E402

if tvm_tuning.environment_problem():
    pytest.skip(tvm_tuning.environment_problem(), allow_module_level=True)

SHAPE = [1, 3, 8, 8]


def _conv_relu(path: Path) -> Path:
    """Conv(3→4, 3x3, pad 1) + Relu: one fused operator, so one tuning task."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"], name="relu"),
        ],
        "conv_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _records(work_dir: Path) -> int:
    path = work_dir / tvm_tuning.RECORD_FILE
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


@pytest.mark.heavy
def test_tuning_writes_records_reuses_them_and_matches_ort(tmp_path: Path) -> None:
    model_path = _conv_relu(tmp_path / "m.onnx")
    mod = from_onnx(onnx.load(str(model_path)), shape_dict={"x": SHAPE}, keep_params_in_input=False)
    target = tvm.target.Target({"kind": "llvm"})
    db = tmp_path / "db"
    assert tvm_tuning.database_digest(db) == ""

    tuned, seconds = tvm_tuning.tune(mod, target, db, trials=2)
    first = _records(db)
    digest = tvm_tuning.database_digest(db)
    assert 1 <= first <= 2  # the budget bounds the trials
    assert digest != "" and seconds > 0

    # The same task again (another candidate sharing the operator): covered, so no new trial.
    again, _ = tvm_tuning.tune(mod, target, db, trials=2)
    assert _records(db) == first
    assert tvm_tuning.database_digest(db) == digest

    x = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    ref = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for module in (tuned, again):
        vm = relax.VirtualMachine(tvm.compile(module, target=target), tvm.cpu())
        out = vm["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_remote_cpu_target_needs_its_core_count(tmp_path: Path) -> None:
    phone = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon"]})
    mod = from_onnx(
        onnx.load(str(_conv_relu(tmp_path / "m.onnx"))), shape_dict={"x": SHAPE}, keep_params_in_input=False
    )
    with pytest.raises(ValueError, match="RPC runner"):  # no local runner can run phone code
        tvm_tuning.tune(mod, phone, tmp_path / "db", trials=2)
    assert tvm_tuning.database_digest(tmp_path / "db") == ""
    with pytest.raises(ValueError, match="num-cores"):
        tvm_tuning.tuning_target(phone, local=False)
    with_cores = tvm.target.Target({**phone.export(), "num-cores": 4})
    assert tvm_tuning.tuning_target(with_cores, local=False).attrs["num-cores"] == 4
    assert tvm_tuning.tuning_target(tvm.target.Target({"kind": "llvm"}), local=True).attrs["num-cores"] >= 1


@pytest.mark.heavy
def test_tuned_build_through_the_compile_cache(tmp_path: Path) -> None:
    """The agent's path: a tuned build is cached (separately from the untuned one), marked tuned,
    and its tuning time is reported apart from its compile time; a repeat is a cache hit."""
    import hashlib

    from tuneqn.agent.backends.tvm_build import BuildSpec, CompileCache

    model_path = _conv_relu(tmp_path / "m.onnx")
    sha = hashlib.sha256(model_path.read_bytes()).hexdigest()
    cache = CompileCache(tmp_path / "cache", 2**30)
    untuned = cache.get_or_build(model_path, sha, BuildSpec({"kind": "llvm"}))
    spec = BuildSpec({"kind": "llvm"}, tuning_trials=2, tuning_dir=tmp_path / "db")
    tuned = cache.get_or_build(model_path, sha, spec)
    assert not untuned.tuned and tuned.tuned and not tuned.cache_hit
    assert tuned.key != untuned.key and tuned.tuning_seconds > 0 and tuned.compile_seconds > 0
    again = cache.get_or_build(model_path, sha, spec)
    assert again.cache_hit and again.tuned  # filed under the database digest tuning left

    x = np.random.default_rng(3).normal(0, 1, SHAPE).astype(np.float32)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tuned.path)), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()
    ref = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
