"""Metrics are computed once when a result arrives (controller/accuracy.py), stored, and read by the report."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from report_store import MODEL, add_candidate, add_eval_split, add_model, add_result, cand_id, open_store, predictions

from tuneqn.controller import accuracy
from tuneqn.controller.report import compute_report
from tuneqn.controller.store import Store

N = 40
DEVICES = ("cpu", "phone")
CANDIDATES = (cand_id(0), cand_id(1), cand_id(2))


def _plan(seed: int = 0) -> tuple[list[int], dict[tuple[str, str], np.ndarray]]:
    """Labels (some unlabelled) and predictions per (candidate, device); candidates agree partly with FP32."""
    rng = np.random.default_rng(seed)
    labels = [int(x) for x in rng.integers(0, 10, N)]
    labels[3] = labels[7] = -1  # unlabelled samples are left out of accuracy
    preds: dict[tuple[str, str], np.ndarray] = {}
    for dev in DEVICES:
        base = predictions(N, rng)
        base[: N // 2, 0] = np.asarray(labels[: N // 2]).clip(0)  # FP32 gets half of them right
        preds[(f"{MODEL}:fp32", dev)] = base
        for i, cid in enumerate(CANDIDATES):
            t = base.copy()
            flip = rng.random(N) < 0.15 * (3 - i)  # fewer changes the more layers stay float
            t[flip] = predictions(int(flip.sum()), rng)
            preds[(cid, dev)] = t
    return labels, preds


def _fill(tmp: Path, order: list[tuple[str, str]], call_on_result: bool = True) -> Store:
    labels, preds = _plan()
    store = open_store(tmp)
    add_model(store)
    for i, cid in enumerate(CANDIDATES):
        add_candidate(store, cid, k=i)
    add_eval_split(store, labels)
    for key in order:
        job = add_result(store, key[0], key[1], preds[key])
        if call_on_result:
            accuracy.on_result(store, job)
    return store


def _stored(store: Store) -> dict[tuple[str, str], tuple[Any, Any, Any]]:
    return {
        (r["candidate_id"], r["device"]): (r["agreement"], r["accuracy"], r["accuracy_top5"]) for r in store.results()
    }


def _independent(
    labels: list[int], preds: dict[tuple[str, str], np.ndarray]
) -> dict[tuple[str, str], tuple[float, ...]]:
    """The metrics written out by hand with plain loops (not through accuracy.py)."""
    out = {}
    for (cid, dev), t in preds.items():
        base = preds[(f"{MODEL}:fp32", dev)]
        agree = sum(int(t[i, 0] == base[i, 0]) for i in range(N)) / N
        lab = [(i, y) for i, y in enumerate(labels) if y >= 0]
        top1 = sum(int(t[i, 0] == y) for i, y in lab) / len(lab)
        top5 = sum(int(y in t[i, :5]) for i, y in lab) / len(lab)
        out[(cid, dev)] = (agree, top1, top5)
    return out


ALL = [(f"{MODEL}:fp32", d) for d in DEVICES] + [(c, d) for c in CANDIDATES for d in DEVICES]


def test_stored_metrics_equal_a_recomputation_from_stored_predictions(tmp_path: Path) -> None:
    store = _fill(tmp_path, ALL)
    labels, preds = _plan()
    expected = _independent(labels, preds)
    got = _stored(store)
    assert set(got) == set(expected)
    for key, values in expected.items():
        assert got[key] == pytest.approx(values), key
    # and from the stored bytes, through the module's helpers
    split = store.dataset(f"{MODEL}/eval")
    assert split is not None
    for r in store.results():
        t = accuracy.topk_of(r)
        (base,) = store.results(candidate_id=f"{MODEL}:fp32", device=r["device"])
        assert r["agreement"] == accuracy.agreement(t, accuracy.topk_of(base))
        assert r["accuracy"] == accuracy.accuracy(t, split["labels"], 1)
        assert r["accuracy_top5"] == accuracy.accuracy(t, split["labels"], 5)
    assert {v[0] for k, v in got.items() if k[0].endswith(":fp32")} == {1.0}


@pytest.mark.parametrize("order", ["baseline_first", "baseline_last", "interleaved"])
def test_order_of_arrival_gives_the_same_numbers(tmp_path: Path, order: str) -> None:
    reference = _stored(_fill(tmp_path / "ref", ALL))
    if order == "baseline_first":
        seq = ALL
    elif order == "baseline_last":
        seq = ALL[len(DEVICES) :] + ALL[: len(DEVICES)]
    else:  # one device's baseline in the middle, the other's last
        cands = ALL[len(DEVICES) :]
        seq = cands[:3] + [ALL[0]] + cands[3:] + [ALL[1]]
    assert sorted(seq) == sorted(ALL)
    store = _fill(tmp_path / order, seq)
    assert _stored(store) == reference
    assert all(v[0] is not None for v in reference.values())


def test_results_without_a_baseline_wait_for_it(tmp_path: Path) -> None:
    store = _fill(tmp_path, [(CANDIDATES[0], "cpu"), (CANDIDATES[1], "cpu"), (CANDIDATES[0], "phone")])
    got = _stored(store)
    assert {k: v[0] for k, v in got.items()} == dict.fromkeys(got, None)  # no agreement yet
    assert all(v[1] is not None and v[2] is not None for v in got.values())  # accuracy needs no baseline
    labels, preds = _plan()
    accuracy.on_result(store, add_result(store, f"{MODEL}:fp32", "cpu", preds[(f"{MODEL}:fp32", "cpu")]))
    got = _stored(store)
    assert got[(CANDIDATES[0], "cpu")][0] is not None and got[(CANDIDATES[1], "cpu")][0] is not None
    assert got[(CANDIDATES[0], "phone")][0] is None  # another device's baseline is not this one's


def test_backfill_fills_results_stored_without_metrics(tmp_path: Path) -> None:
    reference = _stored(_fill(tmp_path / "ref", ALL))
    store = _fill(tmp_path / "old", ALL, call_on_result=False)
    assert all(v == (None, None, None) for v in _stored(store).values())
    assert accuracy.backfill(store) == len(ALL)
    assert _stored(store) == reference
    assert accuracy.backfill(store) == 0  # nothing left to compute


def test_report_reads_the_stored_metrics(tmp_path: Path) -> None:
    store = _fill(tmp_path, ALL)
    (row,) = store.results(candidate_id=CANDIDATES[1], device="phone")
    # A value no recomputation would give: the report must show what is stored.
    store.set_result_metrics(row["job_id"], {"agreement": 0.125, "accuracy": 0.25, "accuracy_top5": 0.5})
    report = compute_report(store)
    (cand,) = [c for c in report["candidates"] if c["id"] == CANDIDATES[1]]
    (res,) = [r for r in cand["results"] if r["device"] == "phone"]
    assert (res["agreement"], res["accuracy"], res["accuracy_top5"]) == (0.125, 0.25, 0.5)
    assert res["objectives"]["accuracy_loss"] == pytest.approx(0.875)


def test_metrics_helpers_edge_cases() -> None:
    t = np.array([[1, 2, 3], [4, 5, 6]], dtype="<i4")
    assert accuracy.agreement(t, t) == 1.0
    assert accuracy.agreement(t, t[:1]) is None  # different sample counts
    assert accuracy.accuracy(t, None) is None and accuracy.accuracy(t, []) is None
    assert accuracy.accuracy(t, [-1, -1]) is None  # nothing labelled
    assert accuracy.accuracy(t, [2, 4], 1) == 0.5 and accuracy.accuracy(t, [2, 4], 3) == 1.0
    assert accuracy.accuracy(t, [2, 4], 5) is None  # only 3 classes kept per sample
    assert accuracy.accuracy(t, [1, 2, 3], 1) is None  # another sample count
    row = {"job_id": "j", "topk": t.tobytes(), "num_samples": 4, "top_k": 2}
    with pytest.raises(ValueError, match="expected 4 x 2"):
        accuracy.topk_of(row)


def test_on_result_of_an_unknown_job_is_an_error(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    with pytest.raises(ValueError, match="no result stored"):
        accuracy.on_result(store, "tq-missing")


def test_order_property_over_random_sequences(tmp_path: Path) -> None:
    """Every permutation of a small set of arrivals stores the same metrics."""
    keys = [(f"{MODEL}:fp32", "cpu"), (CANDIDATES[0], "cpu"), (CANDIDATES[1], "cpu")]
    seen = set()
    for n, perm in enumerate(itertools.permutations(keys)):
        store = _fill(tmp_path / f"p{n}", list(perm))
        seen.add(tuple(sorted(_stored(store).items())))
        store.close()
    assert len(seen) == 1


def test_baseline_and_result_arriving_on_two_threads(tmp_path: Path) -> None:
    """Whatever the interleaving, the candidate ends up with its agreement (on_result is one transaction)."""
    import threading

    labels, preds = _plan()
    for n in range(20):
        store = open_store(tmp_path / f"r{n}")
        add_model(store)
        add_candidate(store, CANDIDATES[0], k=0)
        add_eval_split(store, labels)
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def arrive(cid: str, barrier: threading.Barrier, store: Any, errors: list[BaseException]) -> None:
            try:
                barrier.wait(timeout=30)
                accuracy.on_result(store, add_result(store, cid, "cpu", preds[(cid, "cpu")]))
            except BaseException as exc:  # noqa: BLE001 - thread boundary: handed to the test thread
                errors.append(exc)

        threads = [
            threading.Thread(target=arrive, args=(cid, barrier, store, errors))
            for cid in (f"{MODEL}:fp32", CANDIDATES[0])
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors and not any(t.is_alive() for t in threads)
        (row,) = store.results(candidate_id=CANDIDATES[0])
        assert row["agreement"] is not None
        store.close()
