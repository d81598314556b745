"""The controller's folders are its pipeline: each stage imports only the stages below it.

Stages, bottom up (docs/ARCHITECTURE.md): ``common`` → ``objectives``, ``config`` → ``store`` → ``accuracy`` →
``prepare`` → ``quantize`` → ``study`` → ``search`` → ``farm`` → ``report`` → ``orchestrator`` → ``cli``.
Within a stage modules import each other freely. Imports under ``if TYPE_CHECKING:`` count too (a type is a
dependency). The agent never imports the controller.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGES = [
    "common",
    "objectives",
    "config",
    "store",
    "accuracy",
    "prepare",
    "quantize",
    "study",
    "search",
    "farm",
    "report",
    "orchestrator",
    "cli",
]


def _stage(module: str) -> str | None:
    """The stage of ``tuneqn.controller.<...>`` (None for anything else)."""
    parts = module.split(".")
    if parts[:2] != ["tuneqn", "controller"] or len(parts) < 3:
        return None
    return "cli" if parts[2] == "__main__" else parts[2]


def _imports(path: Path, package: str) -> list[str]:
    """Every module ``path`` imports (absolute, and relative resolved against ``package``)."""
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                out.append(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                out.append(node.module)
                out += [f"{node.module}.{a.name}" for a in node.names]  # `from pkg import module`
    return out


def _module(path: Path) -> tuple[str, str]:
    rel = path.relative_to(ROOT / "controller").with_suffix("")
    parts = ["tuneqn", "controller", *rel.parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def test_every_controller_module_imports_only_its_own_stage_or_below() -> None:
    wrong = []
    for path in sorted((ROOT / "controller").rglob("*.py")):
        module, package = _module(path)
        mine = _stage(module)
        if mine is None:  # tuneqn.controller itself
            continue
        assert mine in STAGES, f"{path}: stage {mine!r} is not in the layering (tests/system/test_layering.py)"
        for imported in _imports(path, package):
            theirs = _stage(imported)
            if theirs is not None and theirs in STAGES and STAGES.index(theirs) > STAGES.index(mine):
                wrong.append(f"{module} ({mine}) imports {imported} ({theirs})")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_the_agent_never_imports_the_controller() -> None:
    for path in sorted((ROOT / "agent").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        package = ".".join(["tuneqn", *rel.parts[:-1]])
        assert not [m for m in _imports(path, package) if m.startswith("tuneqn.controller")], path


def test_figures_are_drawn_only_by_the_report() -> None:
    """matplotlib is imported in ``controller/report/`` only (the pipeline hands it data, not figures)."""
    for path in sorted((ROOT / "controller").rglob("*.py")):
        if "report" in path.relative_to(ROOT / "controller").parts:
            continue
        module, package = _module(path)
        assert not [m for m in _imports(path, package) if m.split(".")[0] == "matplotlib"], path
