"""docs/ARCHITECTURE.md stays true: every code name it cites exists."""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel

from tuneqn.controller.config import StudyConfig
from tuneqn.v1 import agent_pb2

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
#: Other projects' names the document cites (``tvm.compile``, ``onnxruntime.quantization.qdq_loss_debug``).
EXTERNAL = {"onnxruntime", "onnx", "tvm", "numpy", "grpc", "pymoo", "sqlite_utils"}
#: Names of output files and folders, not code.
OUTPUT = re.compile(r"\.(json|png|db|lock|md|toml|html|npy|onnx|csv|gate)$")


def _cited() -> set[str]:
    """Every backticked dotted name (``module.name``, ``Class.method``, ``file.py``; a call's arguments dropped)."""
    names = set()
    for quoted in re.findall(r"`([^`\n]+)`", DOC.read_text()):
        dotted = re.match(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(\(.*\))?$", quoted)
        if dotted:
            names.add(dotted.group(1))
    return names


@functools.cache
def _modules() -> dict[str, ModuleType]:
    mods: dict[str, ModuleType] = {}
    for package in ("tuneqn.controller", "tuneqn.agent"):
        root = importlib.import_module(package)
        mods[package] = root
        for info in pkgutil.walk_packages(root.__path__, package + "."):
            if not info.name.endswith("__main__"):  # the CLI entry point parses arguments when imported
                mods[info.name] = importlib.import_module(info.name)
    return mods


def _has(obj: Any, parts: list[str]) -> bool:
    """``obj.a.b`` exists: attributes, or an instance attribute a class sets (``self.a``) or annotates."""
    for part in parts:
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        if inspect.isclass(obj):
            try:
                source = inspect.getsource(obj)
            except (OSError, TypeError):
                source = ""
            return part in getattr(obj, "__annotations__", {}) or bool(re.search(rf"self\.{part}\b", source))
        return False
    return True


def _classes_of(module: ModuleType) -> list[type]:
    return [v for v in vars(module).values() if inspect.isclass(v) and v.__module__ == module.__name__]


def _config_key(parts: list[str]) -> bool:
    """``search.layer_op_types``: a key of the study TOML (the pydantic models of ``config.py``)."""
    model: Any = StudyConfig
    for part in parts:
        if not (inspect.isclass(model) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return False
        model = model.model_fields[part].annotation
    return True


def _missing(name: str, mods: dict[str, ModuleType], classes: dict[str, list[type]]) -> bool:
    parts = name.split(".")
    if name.endswith(".py"):
        return not any(p for p in ROOT.glob(f"**/{name}") if ".venv" not in p.parts)
    if OUTPUT.search(name) or parts[0] in EXTERNAL:
        return False
    messages = agent_pb2.DESCRIPTOR.message_types_by_name
    if parts[0] in messages:  # the contract: Message.field
        return len(parts) != 2 or parts[1] not in messages[parts[0]].fields_by_name
    if parts[0][0].isupper():  # Class.member
        return not any(_has(cls, parts[1:]) for cls in classes.get(parts[0], []))
    if _config_key(parts):
        return False
    for i in range(len(parts), 0, -1):  # module.name, with the module's path shortened from the left
        prefix = ".".join(parts[:i])
        found = [m for n, m in mods.items() if n == prefix or n.endswith("." + prefix)]
        if found:  # the module's name, or an instance of one of its classes (``store.put_result``)
            return not any(_has(m, parts[i:]) or any(_has(c, parts[i:]) for c in _classes_of(m)) for m in found)
    return False  # not code: a store column (results.baseline_job), a result's info key, ...


def test_every_code_name_the_architecture_document_cites_exists() -> None:
    mods = _modules()
    classes: dict[str, list[type]] = {}
    for name, module in mods.items():
        for attr, value in vars(module).items():
            if inspect.isclass(value) and value.__module__ == name:
                classes.setdefault(attr, []).append(value)
    cited = _cited()
    assert len(cited) > 50
    assert sorted(n for n in cited if _missing(n, mods, classes)) == []


def test_the_check_catches_a_wrong_name() -> None:
    mods = _modules()
    classes = {"StudyRun": [vars(mods["tuneqn.controller.orchestrator"])["StudyRun"]]}
    for wrong in (
        "Orchestrator._priority",
        "StudyRun._no_such_method",
        "metrics.no_such_function",
        "farm.board.no_such_name",
        "search.no_such_key",
        "JobSpec.no_such_field",
        "no_such_module.py",
    ):
        assert _missing(wrong, mods, classes), wrong
    for right in (
        "StudyRun._priority",
        "accuracy.on_result",
        "search.layer_op_types",
        "JobSpec.backend_options",
        "study.py",
        "store.put_result",
    ):
        assert not _missing(right, mods, classes), right
