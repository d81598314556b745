"""Pareto fronts: pymoo-backed top_fronts against a brute-force dominance check."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuneqn.controller.report.pareto import select_compromise, to_minimization, top_fronts
from tuneqn.controller.search.ties import Latency, TieDominator, compare, dominates, faster, ties


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


def test_tie_rule_overlapping_intervals_tie_disjoint_ones_order() -> None:
    a, b = Latency.of(10.0, 9.5, 11.0), Latency.of(10.9, 10.0, 12.0)
    assert a is not None and b is not None
    assert ties(a, b) and ties(b, a) and compare(a, b) == compare(b, a) == 0
    c = Latency.of(11.5, 11.1, 12.5)  # overlaps b, not a
    assert c is not None and ties(b, c) and faster(a, c) and compare(c, a) == 1
    touching = Latency.of(12.0, 11.0, 13.0)
    assert touching is not None and ties(a, touching)  # closed intervals: touching is a tie
    # no spread: only equal medians tie; a median outside its own p10–p90 widens the interval
    assert ties(Latency.of(5.0), Latency.of(5.0)) and faster(Latency.of(5.0), Latency.of(5.1))  # type: ignore[arg-type]
    assert Latency.of(5.0, 6.0, 7.0) == Latency(5.0, 5.0, 7.0)
    assert Latency.of(None, 1.0, 2.0) is None and Latency.of(float("nan")) is None


@st.composite
def latency_table(draw: st.DrawFn) -> tuple[np.ndarray, list[Latency | None]]:
    """Rows (size, latency median) with a p10–p90 interval per latency, on a small grid (many ties)."""
    n = draw(st.integers(min_value=0, max_value=9))
    size = draw(st.lists(st.integers(min_value=0, max_value=4), min_size=n, max_size=n))
    med = draw(st.lists(st.integers(min_value=0, max_value=12), min_size=n, max_size=n))
    lo = draw(st.lists(st.integers(min_value=0, max_value=4), min_size=n, max_size=n))
    hi = draw(st.lists(st.integers(min_value=0, max_value=4), min_size=n, max_size=n))
    F = np.array([[float(s), float(m)] for s, m in zip(size, med, strict=True)]).reshape(n, 2)
    return F, [Latency.of(m, m - a, m + b) for m, a, b in zip(med, lo, hi, strict=True)]


def _tie_fronts_by_brute_force(F: np.ndarray, lat: list[Latency | None]) -> list[set[int]]:
    remaining, fronts = set(range(len(F))), []
    while remaining and len(fronts) < 3:
        front = {i for i in remaining if not any(dominates(F[j], F[i], 1, lat[j], lat[i]) for j in remaining if j != i)}
        fronts.append(front)
        remaining -= front
    return fronts


@settings(max_examples=300, deadline=None)
@given(table=latency_table(), seed=st.integers(min_value=0, max_value=2**16))
def test_fronts_with_latency_ties_are_pairwise_and_order_independent(
    table: tuple[np.ndarray, list[Latency | None]], seed: int
) -> None:
    F, lat = table
    n = len(F)
    fronts = top_fronts(F, 3, (1, lat))
    assert [set(f) for f in fronts] == _tie_fronts_by_brute_force(F, lat)
    # dominance is never both ways (ties are symmetric), and a shuffled table gives the same fronts
    for i in range(n):
        for j in range(n):
            assert not (dominates(F[i], F[j], 1, lat[i], lat[j]) and dominates(F[j], F[i], 1, lat[j], lat[i]))
    perm = np.random.default_rng(seed).permutation(n)
    shuffled = top_fronts(F[perm], 3, (1, [lat[i] for i in perm]))
    assert [sorted(int(perm[i]) for i in f) for f in shuffled] == fronts
    # a third row changes no pair's relation: the matrix of the first rows is the same with one more
    if n >= 2:
        M = TieDominator(1, lat).calc_domination_matrix(F)
        assert np.array_equal(TieDominator(1, lat[:-1]).calc_domination_matrix(F[:-1]), M[:-1, :-1])
    # without spread the fronts are the exact ones
    points = [Latency.of(float(m)) for m in F[:, 1]] if n else []
    assert top_fronts(F, 3, (1, points)) == top_fronts(F, 3)


def test_latency_measurements_must_match_the_table() -> None:
    F = np.array([[1.0, 2.0]])
    with pytest.raises(ValueError, match="latency column"):
        top_fronts(F, 3, (1, []))
    with pytest.raises(ValueError, match="latency column"):
        top_fronts(F, 3, (2, [None]))
