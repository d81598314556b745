"""TVM's frontend keeps process-wide builder state: compiles in several threads must not mix."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

pytest.importorskip("tvm", reason="Apache TVM (the tuneqn[tvm] extra) is not installed")

from onnx_models import cnn, mlp  # noqa: E402

from tuneqn.agent.backends.tvm_build import BuildSpec, CompileCache  # noqa: E402


@pytest.mark.heavy
def test_concurrent_builds_of_different_models_all_succeed(tmp_path: Path) -> None:
    models = [cnn(tmp_path / f"cnn{i}.onnx", seed=i) for i in range(3)] + [mlp(tmp_path / "mlp.onnx")]
    cache = CompileCache(tmp_path / "cache", 2**30)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(models))

    def build(path: Path) -> None:
        barrier.wait()
        try:
            cache.get_or_build(path, hashlib.sha256(path.read_bytes()).hexdigest(), BuildSpec({"kind": "llvm"}))
        except Exception as exc:  # noqa: BLE001 - collected and reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, [repr(e) for e in errors]
