"""Pareto fronts over candidate objective tables (paper, section IV-E).

All functions here work on an ``n x m`` array ``F`` whose rows are candidates and
whose columns are objectives to be MINIMIZED (use :func:`to_minimization` to turn
"max" objectives around).  Fronts are computed with pymoo's ``NonDominatedSorting``;
exact duplicate rows never dominate each other, so they always share a front.

"The best top-front candidate" of the report (paper, Tables I/II) is chosen by
:func:`select_compromise`: every objective is min-max normalized over the members
of front 1, and the member closest (Euclidean distance) to the ideal point (all
zeros after normalization) wins; ties go to the lowest row index.

Latency differences within the measured noise are ties: given each row's latency measurement,
:func:`top_fronts` sorts with the pairwise dominance of :mod:`tuneqn.controller.search.ties` (two latencies
tie when their p10–p90 intervals overlap), through pymoo's ``NonDominatedSorting`` with a custom
dominator (its fast non-dominated sort over that domination matrix).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from tuneqn.controller.search.ties import Latency, TieDominator

logger = logging.getLogger(__name__)

#: Relative tolerance under which two compromise distances count as a tie.
_TIE_RTOL = 1e-12


def _as_objective_table(F: np.ndarray, *, allow_inf: bool = True) -> np.ndarray:
    """Return ``F`` as a float 2-D array, or raise ``ValueError``."""
    arr = np.asarray(F, dtype=float)
    if arr.ndim != 2:
        raise ValueError(f"objective table must be 2-D (n x m), got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError("objective table contains NaN; drop or repair those rows first")
    if not allow_inf and np.isinf(arr).any():
        raise ValueError("objective table contains infinite values")
    return arr


def top_fronts(
    F: np.ndarray, n_fronts: int = 3, latency: tuple[int, Sequence[Latency | None]] | None = None
) -> list[list[int]]:
    """Return the first ``n_fronts`` non-dominated fronts of ``F`` (all objectives minimized).

    Each front is a sorted list of row indices; front 1 is the Pareto front,
    front 2 the Pareto front once front 1 is removed, and so on.  Exact duplicate
    rows share a front.  An empty table gives ``[]``.  ``latency`` = (column, one measurement
    per row): that column compares by the tie rule of :mod:`tuneqn.controller.search.ties` (a row
    without a measurement compares its value exactly).
    """
    if isinstance(n_fronts, bool) or not isinstance(n_fronts, (int, np.integer)) or n_fronts < 1:
        raise ValueError(f"n_fronts must be a positive integer, got {n_fronts!r}")
    arr = _as_objective_table(F)
    n, m = arr.shape
    if n == 0:
        return []
    if m == 0:
        return [list(range(n))]
    if latency is not None:
        col, measured = latency
        if not 0 <= col < m or len(measured) != n:
            raise ValueError(f"latency column {col} and {len(measured)} measurements for a {n} x {m} table")
        raw = NonDominatedSorting(dominator=TieDominator(col, measured)).do(arr, n_fronts=int(n_fronts))
        fronts: list[list[int]] = [sorted(int(i) for i in f) for f in list(raw)[: int(n_fronts)] if len(f)]
        logger.debug("top_fronts (latency ties): %d rows -> front sizes %s", n, [len(f) for f in fronts])
        return fronts
    # Sort the distinct rows only, then map every row back to its distinct row: this
    # guarantees that exact duplicates share a front whatever the sorter's tie rules.
    uniq, inverse = np.unique(arr, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    raw = NonDominatedSorting().do(uniq, n_fronts=int(n_fronts))
    fronts = []
    for uniq_front in list(raw)[: int(n_fronts)]:
        members = np.flatnonzero(np.isin(inverse, np.asarray(uniq_front, dtype=int)))
        if members.size:
            fronts.append(sorted(int(i) for i in members))
    logger.debug("top_fronts: %d rows, %d objectives -> front sizes %s", n, m, [len(f) for f in fronts])
    return fronts


def to_minimization(values: Mapping[str, np.ndarray], directions: Mapping[str, str]) -> np.ndarray:
    """Stack objective columns into an ``n x m`` minimization table.

    Columns follow the order of ``directions``; a ``"max"`` objective is negated.
    ``values`` must hold one equally long 1-D array per objective in ``directions``.
    """
    missing = [name for name in directions if name not in values]
    extra = [name for name in values if name not in directions]
    if missing or extra:
        raise ValueError(f"values/directions mismatch: missing {missing}, without direction {extra}")
    columns: list[np.ndarray] = []
    length: int | None = None
    for name, direction in directions.items():
        if direction not in ("min", "max"):
            raise ValueError(f"objective {name!r}: direction must be 'min' or 'max', got {direction!r}")
        col = np.asarray(values[name], dtype=float)
        if col.ndim != 1:
            raise ValueError(f"objective {name!r}: values must be 1-D, got shape {col.shape}")
        if length is None:
            length = col.shape[0]
        elif col.shape[0] != length:
            raise ValueError(f"objective {name!r}: {col.shape[0]} values, expected {length}")
        columns.append(-col if direction == "max" else col)
    if not columns:
        return np.zeros((0, 0), dtype=float)
    return np.column_stack(columns)


def select_compromise(F: np.ndarray, front: Sequence[int]) -> int:
    """Pick the front member closest to the ideal point after min-max normalization.

    Each objective (column of the minimization table ``F``) is scaled to [0, 1]
    over the members of ``front`` (a constant objective scales to 0); the member
    with the smallest Euclidean norm wins, ties going to the lowest row index.
    """
    arr = _as_objective_table(F, allow_inf=False)
    idx = [int(i) for i in front]
    if not idx:
        raise ValueError("cannot select from an empty front")
    bad = [i for i in idx if i < 0 or i >= arr.shape[0]]
    if bad:
        raise ValueError(f"front indices {bad} out of range for {arr.shape[0]} rows")
    idx = sorted(set(idx))
    sub = arr[idx]
    lo = sub.min(axis=0)
    span = sub.max(axis=0) - lo
    safe = np.where(span > 0, span, 1.0)
    norm = np.where(span > 0, (sub - lo) / safe, 0.0)
    dist = np.sqrt((norm**2).sum(axis=1))
    best = float(dist.min())
    for pos, i in enumerate(idx):  # idx is sorted, so the first hit is the lowest index
        if dist[pos] <= best * (1.0 + _TIE_RTOL) + _TIE_RTOL:
            return i
    return idx[int(np.argmin(dist))]  # unreachable; keeps type checkers content
