"""Pareto fronts: pymoo-backed top_fronts against a brute-force dominance check."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tuneqn.controller.report.pareto import latency_ties, select_compromise, to_minimization, top_fronts


def _dominates(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(a <= b) and np.any(a < b))


def brute_force_fronts(F: np.ndarray, n_fronts: int) -> list[list[int]]:
    """Front 1 = rows nobody dominates; front 2 = the same once front 1 is removed; ..."""
    remaining = list(range(len(F)))
    fronts: list[list[int]] = []
    while remaining and len(fronts) < n_fronts:
        front = [i for i in remaining if not any(_dominates(F[j], F[i]) for j in remaining if j != i)]
        fronts.append(sorted(front))
        remaining = [i for i in remaining if i not in front]
    return fronts


@st.composite
def objective_tables(draw: st.DrawFn) -> np.ndarray:
    n = draw(st.integers(min_value=0, max_value=14))
    m = draw(st.integers(min_value=1, max_value=4))
    grid = draw(st.integers(min_value=1, max_value=4))  # tiny grids force ties and duplicates
    cells = draw(st.lists(st.integers(min_value=0, max_value=grid), min_size=n * m, max_size=n * m))
    F = np.array(cells, dtype=float).reshape(n, m)
    if n and draw(st.booleans()):  # append exact copies of existing rows
        rows = draw(st.lists(st.integers(min_value=0, max_value=n - 1), min_size=1, max_size=3))
        F = np.vstack([F, F[rows]])
    return F


@settings(max_examples=400, deadline=None)
@given(F=objective_tables(), n_fronts=st.integers(min_value=1, max_value=4))
def test_top_fronts_matches_brute_force(F: np.ndarray, n_fronts: int) -> None:
    assert top_fronts(F, n_fronts) == brute_force_fronts(F, n_fronts)


@settings(max_examples=200, deadline=None)
@given(F=objective_tables())
def test_duplicates_share_a_front(F: np.ndarray) -> None:
    fronts = top_fronts(F, n_fronts=len(F) + 1)
    front_of = {i: n for n, front in enumerate(fronts) for i in front}
    assert sorted(front_of) == list(range(len(F)))  # every row ranked when enough fronts are asked for
    for i in range(len(F)):
        for j in range(i + 1, len(F)):
            if np.array_equal(F[i], F[j]):
                assert front_of[i] == front_of[j]


def test_top_fronts_known_case() -> None:
    F = np.array([[1, 1], [1, 1], [2, 0], [2, 2], [2, 2], [3, 3], [4, 4]], dtype=float)
    assert top_fronts(F) == [[0, 1, 2], [3, 4], [5]]
    assert top_fronts(F, n_fronts=1) == [[0, 1, 2]]
    assert top_fronts(F, n_fronts=5) == [[0, 1, 2], [3, 4], [5], [6]]


def test_top_fronts_edge_cases() -> None:
    assert top_fronts(np.zeros((0, 2))) == []
    assert top_fronts(np.array([[5.0, 1.0]])) == [[0]]
    assert top_fronts(np.array([[3.0], [1.0], [1.0], [2.0]])) == [[1, 2], [3], [0]]
    with pytest.raises(ValueError, match="NaN"):
        top_fronts(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="2-D"):
        top_fronts(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="n_fronts"):
        top_fronts(np.zeros((2, 2)), n_fronts=0)


def test_to_minimization_negates_max_objectives_in_direction_order() -> None:
    F = to_minimization(
        {"size": np.array([3.0, 1.0]), "accuracy": np.array([0.5, 0.9])},
        {"accuracy": "max", "size": "min"},
    )
    np.testing.assert_array_equal(F, np.array([[-0.5, 3.0], [-0.9, 1.0]]))
    with pytest.raises(ValueError, match="direction"):
        to_minimization({"size": np.array([1.0])}, {"size": "up"})
    with pytest.raises(ValueError, match="mismatch"):
        to_minimization({"size": np.array([1.0])}, {"latency": "min"})
    with pytest.raises(ValueError, match="expected 2"):
        to_minimization({"a": np.array([1.0, 2.0]), "b": np.array([1.0])}, {"a": "min", "b": "min"})


def test_select_compromise_known_case() -> None:
    # Front of (loss, size MB): normalized over the front, row 2 is closest to (0, 0).
    F = np.array([[0.25, 3.0], [0.9, 9.0], [0.10, 5.0], [0.08, 6.0]])
    # loss: (0.25, 0.10, 0.08) -> (1, 2/17, 0); size: (3, 5, 6) -> (0, 2/3, 1)
    assert select_compromise(F, [0, 2, 3]) == 2
    # Symmetric extremes tie at distance 1: the lowest index wins, whatever the order given.
    G = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert select_compromise(G, [1, 0]) == 0
    # A single member, and constant objectives (normalized to 0), pick the lowest index.
    assert select_compromise(F, [3]) == 3
    assert select_compromise(np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]), [2, 1]) == 1
    with pytest.raises(ValueError, match="empty"):
        select_compromise(F, [])
    with pytest.raises(ValueError, match="out of range"):
        select_compromise(F, [7])


# --------------------------------------------------------------------------- latency within the noise


def test_latency_ties_known_case() -> None:
    # rows:      0     1     2     3     4
    median = [10.0, 10.9, 11.5, 30.0, 9.0]
    p10 = [9.5, 10.0, 11.0, 29.0, 8.9]
    p90 = [11.0, 12.0, 12.5, 31.0, 9.1]
    # by median: 4 (9.0, [8.9, 9.1]) leads; 0 (10.0) is outside 9.1 -> new group led by 0 ([9.5, 11.0]);
    # 1 (10.9) joins 0; 2 (11.5) is outside 0's p90 11.0 although inside 1's interval -> new group; 3 alone.
    assert latency_ties(median, p10, p90) == [10.0, 10.0, 11.5, 30.0, 9.0]


def test_latency_ties_without_dispersion_only_equal_medians_tie() -> None:
    assert latency_ties([5.0, 5.0, 5.1], [None, None, None], [None, None, None]) == [5.0, 5.0, 5.1]
    assert latency_ties([], [], []) == []
    with pytest.raises(ValueError, match="p10"):
        latency_ties([1.0], [], [1.0])
    with pytest.raises(ValueError, match="finite"):
        latency_ties([float("nan")], [None], [None])


@st.composite
def latency_rows(draw: st.DrawFn) -> tuple[list[float], list[float | None], list[float | None]]:
    n = draw(st.integers(min_value=0, max_value=12))
    med = draw(st.lists(st.integers(min_value=0, max_value=20), min_size=n, max_size=n))
    lo = draw(st.lists(st.one_of(st.none(), st.integers(min_value=0, max_value=4)), min_size=n, max_size=n))
    hi = draw(st.lists(st.one_of(st.none(), st.integers(min_value=0, max_value=4)), min_size=n, max_size=n))
    return (
        [float(m) for m in med],
        [None if d is None else float(m - d) for m, d in zip(med, lo, strict=True)],
        [None if d is None else float(m + d) for m, d in zip(med, hi, strict=True)],
    )


@settings(max_examples=300, deadline=None)
@given(rows=latency_rows())
def test_latency_ties_properties(rows: tuple[list[float], list[float | None], list[float | None]]) -> None:
    med, p10, p90 = rows
    tied = latency_ties(med, p10, p90)
    n = len(med)
    for i in range(n):
        assert tied[i] <= med[i] and tied[i] in med  # a group's value is its lowest measured median
        lead = min(j for j in range(n) if med[j] == tied[i])  # the group's fastest member
        hi = med[lead] if p90[lead] is None else p90[lead]
        assert med[i] <= hi  # every member lies inside the leader's noise
    # groups are contiguous in median order, and a faster median never gets a slower value
    order = sorted(range(n), key=lambda j: med[j])
    assert [tied[j] for j in order] == sorted(tied)
    # without dispersion nothing changes
    assert latency_ties(med, [None] * n, [None] * n) == med
