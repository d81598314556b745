"""Latency ties: the one rule the fronts, the answer pick and the ``budget`` search use.

A latency measurement is its median with the p10–p90 interval of its timed runs (the store keeps
those statistics, not the raw timings). **Two measurements tie when their [p10, p90] intervals
overlap** (closed: touching intervals tie); one is *faster* than the other only when its p90 is
below the other's p10 (the intervals are disjoint). A missing p10 or p90 counts as the median (a
point interval), so without any spread only equal medians tie.

The rule is pairwise and symmetric: whether a and b tie depends on a and b only, never on which
other results exist or on their order. "Faster" is a strict interval order (transitive, never
both ways), "tie" is not transitive (a ~ b and b ~ c while a is faster than c), which is why
nothing here groups results.

Dominance (all objectives minimized; :func:`dominates`): a dominates b when a is no worse than b in
every objective and better in one, where in latency "no worse" means b is not faster than a and
"better" means a is faster than b; every other objective compares exactly. Because a dominance
cycle would need every exact objective equal and then a cycle of "faster", dominance stays
acyclic, so non-dominated sorting (:mod:`tuneqn.controller.report.pareto`) gives well-defined
fronts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tuneqn.controller.objectives import finite


@dataclass(frozen=True)
class Latency:
    """A latency measurement: median and the [lo, hi] = [p10, p90] interval around it (ms)."""

    median: float
    lo: float
    hi: float

    @classmethod
    def of(cls, median: Any, p10: Any = None, p90: Any = None) -> Latency | None:
        """The measurement from a median and its p10/p90 (None when the median is missing or not finite).

        A missing or non-finite p10/p90 counts as the median; the interval always contains the median."""
        m = finite(median)
        if m is None:
            return None
        lo, hi = finite(p10), finite(p90)
        return cls(m, m if lo is None else min(lo, m), m if hi is None else max(hi, m))

    @classmethod
    def of_result(cls, result: Mapping[str, Any]) -> Latency | None:
        """The measurement of a report result (``latency_ms``, ``latency_p10_ms``, ``latency_p90_ms``)."""
        return cls.of(result.get("latency_ms"), result.get("latency_p10_ms"), result.get("latency_p90_ms"))

    def optimistic(self, other: Latency) -> Latency:
        """The best of both (lowest median, lo and hi): what a result between two measured ones could reach."""
        return Latency(min(self.median, other.median), min(self.lo, other.lo), min(self.hi, other.hi))


def compare(a: Latency, b: Latency) -> int:
    """-1 when ``a`` is faster than ``b`` beyond the tie (a.hi < b.lo), 1 when ``b`` is, 0 when they tie."""
    if a.hi < b.lo:
        return -1
    if b.hi < a.lo:
        return 1
    return 0


def ties(a: Latency, b: Latency) -> bool:
    """Whether two measurements tie: their [p10, p90] intervals overlap."""
    return compare(a, b) == 0


def faster(a: Latency, b: Latency) -> bool:
    """Whether ``a`` is faster than ``b`` beyond the tie (a's p90 below b's p10)."""
    return compare(a, b) < 0


def result_latency(row: Mapping[str, Any] | None) -> dict[str, float | None]:
    """``latency_ms`` (median), ``latency_p10_ms`` and ``latency_p90_ms`` of a stored result row (its
    ``latency`` column holds the statistics as JSON); None where missing or not measured (count 0)."""
    if row is None:
        return {"latency_ms": None, "latency_p10_ms": None, "latency_p90_ms": None}
    stats = json.loads(row.get("latency") or "{}")
    measured = row.get("latency_ms") is not None and stats.get("count") != 0
    return {
        "latency_ms": finite(row.get("latency_ms")),
        "latency_p10_ms": finite(stats.get("p10_ms")) if measured else None,
        "latency_p90_ms": finite(stats.get("p90_ms")) if measured else None,
    }


def dominates(
    a: Sequence[float],
    b: Sequence[float],
    latency_col: int | None = None,
    a_latency: Latency | None = None,
    b_latency: Latency | None = None,
) -> bool:
    """Whether row ``a`` dominates row ``b`` (all objectives minimized; see the module docstring).

    Column ``latency_col`` compares ``a_latency`` with ``b_latency`` by the tie rule (both needed,
    else the column compares exactly like the others)."""
    better = False
    for j, (x, y) in enumerate(zip(a, b, strict=True)):
        if j == latency_col and a_latency is not None and b_latency is not None:
            c = compare(a_latency, b_latency)
        else:
            c = -1 if x < y else 1 if x > y else 0
        if c > 0:
            return False
        better = better or c < 0
    return better


class TieDominator:
    """pymoo's dominator interface (``calc_domination_matrix``) with the latency tie rule.

    ``latencies[i]`` is row i's measurement (None: compare that row's latency column exactly)."""

    def __init__(self, latency_col: int, latencies: Sequence[Latency | None]) -> None:
        self.latency_col = latency_col
        self.latencies = list(latencies)

    def calc_domination_matrix(self, F: np.ndarray, _F: np.ndarray | None = None, epsilon: float = 0.0) -> np.ndarray:
        """M[i, j] = 1 when row i dominates row j, -1 when j dominates i, else 0."""
        arr = np.asarray(F, dtype=float)
        n = arr.shape[0]
        if len(self.latencies) != n:
            raise ValueError(f"{n} rows but {len(self.latencies)} latency measurements")
        M = np.zeros((n, n), dtype=int)
        for i in range(n):
            for j in range(i + 1, n):
                col, li, lj = self.latency_col, self.latencies[i], self.latencies[j]
                if dominates(arr[i], arr[j], col, li, lj):
                    M[i, j], M[j, i] = 1, -1
                elif dominates(arr[j], arr[i], col, lj, li):
                    M[i, j], M[j, i] = -1, 1
        return M
