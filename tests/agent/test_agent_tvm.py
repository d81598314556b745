"""The TVM backend on the agent's own CPU: predictions, compile cache, compile-ahead, feasibility, CLI.

Real TVM compiles, real ONNX Runtime as the reference, gRPC on 127.0.0.1:0. The tracker and
RPC tests are in ``test_agent_tvm_rpc.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from agent_fixtures import job_spec, npy_bytes
from tvm_rpc import cnn_samples, ort_scores

from tuneqn.agent import cli
from tuneqn.agent.backends import tvm_build
from tuneqn.agent.backends.tvm_build import BuildSpec, CompileCache, Infeasible
from tuneqn.agent.config import TvmSettings
from tuneqn.controller.farm.client import decode_topk
from tuneqn.v1 import agent_pb2 as pb

QOPERATOR_OPS = ["QGemm", "QLinearConv", "QLinearGlobalAveragePool"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def topk(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int32)


@pytest.mark.heavy
def test_local_predictions_cache_hit_and_compile_ahead(tvm_agent, client_factory, tvm_models, tmp_path: Path) -> None:
    server = tvm_agent(TvmSettings())
    (lane,) = server.backends.values()
    client = client_factory(server)
    data = cnn_samples(40)
    data_sha = client.upload_bytes(npy_bytes(data))
    fp32 = client.upload_bytes(tvm_models["fp32"].read_bytes())
    qdq = client.upload_bytes(tvm_models["qdq"].read_bytes())
    # submitted together: "second" is queued while "first" runs, so it compiles ahead
    specs = [
        job_spec("first", fp32, data_sha, chunk_size=8, top_k=3),
        job_spec("second", qdq, data_sha, chunk_size=16, top_k=3),
        job_spec("third", fp32, data_sha, chunk_size=40, top_k=3),
    ]
    for spec in specs:
        client.submit(spec)
    results = {s.job_id: client.wait_result(s.job_id, timeout=120) for s in specs}
    for r in results.values():
        assert r.state == pb.SUCCEEDED, r.error
        assert r.runtime_versions["tvm"] and not r.tuned and r.executed_on == ""
        assert r.latency.count == 3 and r.latency.min_ms > 0
    assert np.array_equal(decode_topk(results["first"]), topk(ort_scores(tvm_models["fp32"], data), 3))
    assert np.array_equal(decode_topk(results["third"]), decode_topk(results["first"]))
    qdq_top1 = decode_topk(results["second"])[:, 0]
    assert np.mean(qdq_top1 == topk(ort_scores(tvm_models["qdq"], data), 1)[:, 0]) >= 0.9

    # compiled once per model: the third job (same model as the first) hit the cache
    assert not results["first"].compile_cache_hit and results["first"].compile_seconds > 0
    assert results["third"].compile_cache_hit and results["third"].compile_seconds == 0
    # the second job's build ran ahead, on the compile thread, before the job started
    builds = [b for b in lane.pool.builds() if b.model_sha256 == qdq]
    assert builds[0].reason == "ahead" and not builds[0].cache_hit
    assert builds[0].started < results["second"].started_at
    assert not results["second"].compile_cache_hit and results["second"].compile_seconds > 0
    # GetInfo (tuneqn agents) and the metrics endpoint report the two libraries from one reading
    compiled = {c.name: c for c in client.info().caches}["tvm-compile"]
    assert compiled.entries == 2 and compiled.used_bytes > 0 and compiled.limit_bytes == lane.pool.cache.max_bytes
    registry = server.metrics.registry
    assert registry.get_sample_value("tuneqn_agent_compile_cache_bytes") == compiled.used_bytes
    assert registry.get_sample_value("tuneqn_agent_compile_cache_limit_bytes") == compiled.limit_bytes


def test_device_description_and_infeasible_qoperator(tvm_agent, client_factory, tvm_models) -> None:
    server = tvm_agent(TvmSettings(), name="box")
    client = client_factory(server)
    (device,) = client.info().devices
    assert device.name == "box" and device.device_class == "phone-class" and device.backend == "tvm"
    assert json.loads(device.target) == {"kind": "llvm"}
    assert device.remote == "" and device.rpc_key == "" and device.healthy
    assert {"tvm", "qdq", "compile-ahead", "cpu"} <= set(device.capabilities)
    assert device.runtime_versions["tvm"] == tvm_build.tvm_version()
    ops = list(device.supported_ops)
    assert ops == sorted(ops) and {"Conv", "QuantizeLinear", "DequantizeLinear", "MatMulInteger"} <= set(ops)
    assert not set(QOPERATOR_OPS) & set(ops)

    spec = job_spec(
        "qop", client.upload_bytes(tvm_models["qoperator"].read_bytes()), client.upload_bytes(npy_bytes(cnn_samples(4)))
    )
    client.submit(spec)
    result = client.wait_result("qop", timeout=60)
    assert result.state == pb.FAILED and result.infeasible
    assert list(result.unsupported_ops) == QOPERATOR_OPS
    assert "QLinearConv" in result.error


def test_a_candidate_with_int4_weights_runs_and_4bit_tensors_are_infeasible(
    tvm_agent, client_factory, tvm_models
) -> None:
    """A candidate with a layer at the int4 precision level stores its weight at 4 bits and unpacks it with plain
    operators: TVM runs it and predicts as ONNX Runtime does. A 4-bit tensor itself (ONNX Runtime's own int4
    DequantizeLinear) is answered infeasible, naming it (TVM cannot load one)."""
    from onnx import TensorProto, helper

    from tuneqn.controller.quantize.levels import apply_levels, int4_tensor

    model = apply_levels(onnx.load(tvm_models["qdq"]), onnx.load(tvm_models["fp32"]), {"conv3": "int4"})
    assert tvm_build.unsupported_ops(model) == []
    client = client_factory(tvm_agent(TvmSettings()))
    data = cnn_samples(16)
    data_sha = client.upload_bytes(npy_bytes(data))
    path = tvm_models["qdq"].with_name("int4-level.onnx")
    onnx.save(model, path)
    client.submit(job_spec("int4", client.upload_bytes(path.read_bytes()), data_sha, top_k=1))
    result = client.wait_result("int4", timeout=120)
    assert result.state == pb.SUCCEEDED, result.error
    top1 = decode_topk(result)[:, 0]
    assert np.mean(top1 == topk(ort_scores(path, data), 1)[:, 0]) >= 0.9

    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["w", "s"], ["d"], domain="com.microsoft"),
            helper.make_node("Add", ["x", "d"], ["y"]),
        ],
        "int4",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [int4_tensor(np.array([1, -2, 3, -4], np.int8), "w"), helper.make_tensor("s", TensorProto.FLOAT, [], [0.5])],
    )
    four_bit = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    assert tvm_build.unsupported_ops(four_bit) == ["INT4 tensors"]
    rows = client.upload_bytes(npy_bytes(np.ones((2, 4), np.float32)))
    client.submit(job_spec("four-bit", client.upload_bytes(four_bit.SerializeToString()), rows))
    refused = client.wait_result("four-bit", timeout=60)
    assert refused.state == pb.FAILED and refused.infeasible and list(refused.unsupported_ops) == ["INT4 tensors"]


def test_frontend_failure_is_infeasible_without_ops(tmp_path: Path) -> None:
    """Supported op types that the frontend still cannot import: a Pad with computed pads."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
        helper.make_node("Cast", ["m"], ["mi"], to=TensorProto.INT64),
        helper.make_node("Expand", ["mi", "four"], ["pads"]),
        helper.make_node("Pad", ["x", "pads"], ["y"], mode="constant"),
    ]
    graph = helper.make_graph(
        nodes,
        "dynamic_pad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["A", "B"])],
        [numpy_helper.from_array(np.array([4], np.int64), "four")],
    )
    path = tmp_path / "pad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert tvm_build.unsupported_ops(onnx.load(path)) == []
    cache = CompileCache(tmp_path / "cache", 10**9)
    with pytest.raises(Infeasible) as info:
        cache.get_or_build(path, sha256(path), BuildSpec({"kind": "llvm"}))
    assert info.value.ops == [] and "Dynamic pads are not supported" in str(info.value)


@pytest.mark.heavy
def test_compiler_command_cache_key_and_lru_eviction(tvm_models, tmp_path: Path) -> None:
    log = tmp_path / "cc.log"
    cc = tmp_path / "my-cc"
    cc.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec g++ "$@"\n')
    cc.chmod(cc.stat().st_mode | stat.S_IXUSR)
    fp32, qdq = tvm_models["fp32"], tvm_models["qdq"]
    plain = BuildSpec({"kind": "llvm"})
    custom = BuildSpec({"kind": "llvm"}, compiler=f"{cc} -O2")
    assert tvm_build.cache_key(sha256(fp32), plain) != tvm_build.cache_key(sha256(fp32), custom)

    cache = CompileCache(tmp_path / "cache", 10**9)
    first = cache.get_or_build(fp32, sha256(fp32), custom)
    assert not first.cache_hit and first.batch is None and first.path.is_file()
    assert str(first.path.parent.parent.parent / "tmp") in log.read_text() and "-O2" in log.read_text()
    again = cache.get_or_build(fp32, sha256(fp32), custom)
    assert again.cache_hit and again.path == first.path and again.compile_seconds == 0

    # a cache that holds one library: building a second evicts the least recently used
    small = CompileCache(tmp_path / "cache", first.path.stat().st_size + 4096)
    other = small.get_or_build(qdq, sha256(qdq), custom)
    assert other.path.is_file() and not first.path.exists()
    assert small.usage() == (sum(f.stat().st_size for f in other.path.parent.iterdir() if f.is_file()), 1)
    assert small.lookup(sha256(fp32), custom) is None


@pytest.mark.heavy
def test_compile_cache_pins_the_libraries_jobs_hold(tvm_models, tmp_path: Path) -> None:
    """A cache too small for any library (1 byte) and two jobs: the first job's library, compiled
    ahead while it was queued, is not evicted by the second job's build before the first loads
    it; both stay while their jobs hold them, and each goes once its job releases it (or, for a
    job cancelled while queued, once the agent forgets its compile-ahead build)."""
    from tuneqn.agent.backends.base import LoadOptions
    from tuneqn.agent.backends.tvm import create_lanes

    (lane,) = create_lanes("cpu", "cpu-class", TvmSettings(cache_bytes=1), tmp_path / "state")
    lane.start(lambda backend: None)
    try:
        cache, options = lane.pool.cache, LoadOptions()
        first, second = tvm_models["fp32"], tvm_models["qdq"]
        lane.prepare_ahead(first, options)  # queued: compiled ahead, held for the job
        lane.pool._ahead[lane.pool._ahead_key(sha256(first), options)].result(timeout=120)
        held_second = lane.load(second, options)  # another job builds meanwhile: eviction runs
        held_first = lane.load(first, options)  # the first job loads its library now
        assert held_first.built is not None and held_second.built is not None
        assert not held_second.compile_cache_hit and held_first.compile_seconds > 0  # the ahead build
        assert held_first.built.path.is_file() and held_second.built.path.is_file()
        assert cache.pinned() == {held_first.built.key: 1, held_second.built.key: 1}
        data = cnn_samples(4)
        for handle, model in ((held_first, first), (held_second, second)):
            np.testing.assert_array_equal(topk(lane.predict(handle, data), 3), topk(ort_scores(model, data), 3))

        lane.release(held_second)  # unpinned and over the limit: evicted now
        assert not held_second.built.path.exists() and held_first.built.path.is_file()
        lane.release(held_second)  # a second release changes nothing
        assert cache.pinned() == {held_first.built.key: 1}
        lane.release(held_first)
        assert cache.pinned() == {} and cache.usage() == (0, 0)

        # a queued job cancelled before it ran: its compile-ahead library is unpinned (and evicted)
        lane.prepare_ahead(first, options)
        ahead = lane.pool._ahead[lane.pool._ahead_key(sha256(first), options)].result(timeout=120)
        assert cache.pinned() == {ahead.key: 1} and ahead.path.is_file()
        lane.forget_ahead(first, options)
        assert cache.pinned() == {} and cache.usage() == (0, 0)
    finally:
        lane.close()


def test_a_failed_load_leaves_no_pin(tvm_models, tmp_path: Path) -> None:
    """A job whose library cannot be opened ends without a handle (so no release): its pin goes."""
    from tuneqn.agent.backends.base import LoadOptions
    from tuneqn.agent.backends.tvm import create_lanes

    path = tvm_models["fp32"]
    (lane,) = create_lanes("cpu", "cpu-class", TvmSettings(), tmp_path / "state")
    try:
        built = lane.pool.cache.get_or_build(path, sha256(path), lane.pool.build_spec(LoadOptions(), sha256(path)))
        built.path.write_bytes(b"not a library")  # the cached entry is broken
        with pytest.raises(RuntimeError):  # TVM's error for a file that is no shared library
            lane.load(path, LoadOptions())
        assert lane.pool.cache.pinned() == {}
    finally:
        lane.close()


def test_fixed_batch_model_runs_padded_chunks(tvm_agent, client_factory, tmp_path: Path) -> None:
    from onnx_models import cnn

    model = cnn(tmp_path / "b4.onnx", batch=4)
    server = tvm_agent(TvmSettings())
    client = client_factory(server)
    data = cnn_samples(10)
    spec = job_spec("b4", client.upload_bytes(model.read_bytes()), client.upload_bytes(npy_bytes(data)), top_k=2)
    client.submit(spec)
    result = client.wait_result("b4", timeout=60)
    assert result.state == pb.SUCCEEDED, result.error
    padded = np.concatenate([data, np.zeros((2, 3, 16, 16), np.float32)])
    reference = np.concatenate([ort_scores(model, padded[i : i + 4]) for i in range(0, 12, 4)])[:10]
    assert np.array_equal(decode_topk(result), topk(reference, 2))


# ---------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--tvm-target", "{nope"], "--tvm-target is not valid JSON"),
        (["--tvm-target", '["llvm"]'], '--tvm-target must be a JSON object with a "kind"'),
        (["--tvm-target", '{"kind": "nonsense"}'], 'TVM rejects it: Target kind "nonsense"'),
        (["--tvm-host", "{}"], '--tvm-host must be a JSON object with a "kind"'),
        (["--tvm-tracker", "127.0.0.1:9190"], "--tvm-tracker needs --tvm-key"),
        (
            ["--tvm-tracker", "127.0.0.1:9190", "--tvm-key", "k", "--tvm-rpc", "127.0.0.1:9091"],
            "--tvm-tracker and --tvm-rpc exclude each other",
        ),
        (["--tvm-tracker", "tracker-without-port", "--tvm-key", "k"], "--tvm-tracker must be HOST:PORT"),
        (["--tvm-rpc", "127.0.0.1:99999"], "--tvm-rpc must be HOST:PORT"),
        (["--tvm-request-timeout", "0"], "--tvm-request-timeout must be > 0"),
        (["--tvm-cc", "/nonexistent/clang++"], "--tvm-cc: compiler '/nonexistent/clang++' not found"),
        (["--simulated-latency-ms", "5"], "--simulated-latency-ms is for the ort backend only"),
    ],
)
def test_bad_tvm_flags_are_one_line_and_exit_2(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli.main(["--backend", "tvm", *argv, "--state-dir", str(tmp_path / "s")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("tuneqn-agent: error:") and needle in line, line
    assert not (tmp_path / "s").exists()


def test_tvm_flags_need_the_tvm_backend(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["--tvm-tracker", "127.0.0.1:9190", "--state-dir", str(tmp_path / "s")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--tvm-tracker: only for --backend tvm" in line


def test_backend_tvm_without_apache_tvm_installed(tmp_path: Path) -> None:
    """An environment where ``import tvm`` fails, as without the tuneqn[tvm] extra."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['tvm'] = None  # not installed\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-m", "tuneqn.agent", "--backend", "tvm", "--state-dir", str(tmp_path / "s")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("tuneqn-agent: error: --backend tvm needs Apache TVM") and "tuneqn[tvm]" in line
    assert not (tmp_path / "s").exists()
