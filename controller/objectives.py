"""The one table of objectives: name, direction, unit, label, how to read and show a value.

Config validation (``[[objectives]] name``), the fronts, the plots and the HTML page all
read :data:`OBJECTIVES`; no other list of objective names exists in the controller.

Values are read from one (candidate, device result) pair of the report: the candidate
dict gives ``size_bytes``, the result dict gives ``agreement``, ``accuracy``,
``accuracy_top5`` and ``latency_ms`` (metrics stored with the result, see
:mod:`tuneqn.controller.accuracy`). A missing or non-finite value reads as None.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Direction = Literal["min", "max"]


def finite(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, boolean, non-numeric or non-finite)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


@dataclass(frozen=True)
class Objective:
    """One objective of the Pareto analysis."""

    name: str
    #: Natural direction (a study may override it, with a warning).
    direction: Direction
    #: Unit of the stored value: ``fraction`` (0.25 = 25 %), ``bytes`` or ``ms``.
    unit: str
    #: Human label, e.g. "accuracy loss".
    label: str
    #: Unit shown in tables and plots, and the factor from the stored value to it.
    display_unit: str
    scale: float
    #: Why a value can be missing (the report's reason for an infeasible result).
    missing: str
    getter: Callable[[Mapping[str, Any], Mapping[str, Any]], Any]

    def value(self, candidate: Mapping[str, Any], result: Mapping[str, Any]) -> float | None:
        """The objective's value for one (candidate, device result), or None when missing."""
        return finite(self.getter(candidate, result))

    def display(self, value: float | None) -> float | None:
        """``value`` in the display unit (a fraction as a percentage, bytes as MB)."""
        v = finite(value)
        return None if v is None else v * self.scale

    def fmt(self, value: float | None, digits: int = 2, *, unit: bool = True) -> str:
        """``value`` in the display unit as text ("12.50 %", "3.20 MB", "7.10 ms"), "–" when missing."""
        v = self.display(value)
        if v is None:
            return "–"
        text = f"{v:.{digits}f}"
        return f"{text} {self.display_unit}" if unit else text

    @property
    def heading(self) -> str:
        """Column heading: ``name (display unit)``."""
        return f"{self.name} ({self.display_unit})"


def _loss(candidate: Mapping[str, Any], result: Mapping[str, Any]) -> float | None:
    agreement = finite(result.get("agreement"))
    return None if agreement is None else 1.0 - agreement


#: Every objective a study may name, in the order documented in docs/reference.md (Report).
OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective(
            "accuracy_loss",
            "min",
            "fraction",
            "accuracy loss (1 − top-1 agreement with FP32)",
            "%",
            100.0,
            "accuracy_loss not available (no agreement with FP32 measured)",
            _loss,
        ),
        Objective(
            "accuracy",
            "max",
            "fraction",
            "top-1 accuracy",
            "%",
            100.0,
            "accuracy not available (no labels)",
            lambda c, r: r.get("accuracy"),
        ),
        Objective(
            "accuracy_top5",
            "max",
            "fraction",
            "top-5 accuracy",
            "%",
            100.0,
            "accuracy_top5 not available (no labels or top-5 not measured)",
            lambda c, r: r.get("accuracy_top5"),
        ),
        Objective(
            "size", "min", "bytes", "model size", "MB", 1e-6, "size not available", lambda c, r: c.get("size_bytes")
        ),
        Objective(
            "latency",
            "min",
            "ms",
            "median latency",
            "ms",
            1.0,
            "latency not measured",
            lambda c, r: r.get("latency_ms"),
        ),
    )
}


def objective(name: str) -> Objective:
    """The objective called ``name``; ValueError naming the known ones otherwise."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}") from None
