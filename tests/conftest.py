"""Shared fixtures: small ONNX models, image folders and study configs in tmp dirs."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from onnx_models import cnn, mlp, write_images

# Without torch, here and in every process the tests start (tests/no_torch/sitecustomize.py says why).
sys.modules.setdefault("torch", None)
_NO_TORCH = str(Path(__file__).parent / "no_torch")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_NO_TORCH, os.environ.get("PYTHONPATH")) if p)

# Fixtures of the agent tests (agent processes, clients) and, with the tuneqn[tvm] extra, of the TVM tests (one
# RPC tracker per session, servers per test); without TVM the TVM test modules skip themselves.
pytest_plugins = ["agent_fixtures", *(["tvm_rpc"] if importlib.util.find_spec("tvm") else [])]


@pytest.fixture(scope="session", autouse=True)
def _no_user_lab_file(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Tests never pick up the user's default lab file (``$TUNEQN_LAB``, ``~/.config/tuneqn/lab.toml``)."""
    saved = {k: os.environ.get(k) for k in ("TUNEQN_LAB", "XDG_CONFIG_HOME")}
    os.environ.pop("TUNEQN_LAB", None)
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("xdg-config"))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Models and images shared by many tests (read-only)."""
    d = tmp_path_factory.mktemp("assets")
    cnn(d / "cnn.onnx")
    cnn(d / "wide.onnx", wide_layer="conv2")
    mlp(d / "mlp.onnx")
    write_images(d / "images", 40)
    write_images(d / "labelled", 24, labelled=True)
    return d


@pytest.fixture
def example_dir() -> Path:
    """The prepared EfficientNet-Lite0 example (``make example``); skips when absent."""
    d = Path(os.environ.get("TUNEQN_EXAMPLE_DIR", Path(__file__).parent.parent / "examples/lite0/work"))
    if not (d / "model.onnx").is_file() or not (d / "images").is_dir():
        pytest.skip(f"real example not prepared in {d} (run `make example`)")
    return d


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist the longest tests start first on every worker: the real-model ones, then the heavy ones,
    then the rest, dealt round-robin into one contiguous run per worker (``--dist worksteal`` hands each worker
    one such run and steals from the tails, where the short tests are). Each worker collects the same order; a
    run without workers keeps the file order."""
    if not hasattr(config, "workerinput"):
        return
    workers = max(1, int(config.workerinput.get("workercount", 1)))
    items.sort(key=lambda item: 0 if item.get_closest_marker("slow") else 1 if item.get_closest_marker("heavy") else 2)
    sizes, left = [], len(items)
    for w in range(workers):  # the chunks worksteal cuts: len(pending) // workers left, the larger ones last
        sizes.append(left // (workers - w))
        left -= sizes[-1]
    chunks: list[list[pytest.Item]] = [[] for _ in sizes]
    for i, item in enumerate(items):
        free = [c for c, size in zip(chunks, sizes, strict=True) if len(c) < size]
        free[i % len(free)].append(item)
    items[:] = [item for chunk in chunks for item in chunk]
