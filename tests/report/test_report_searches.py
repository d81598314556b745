"""The report of a study with searches, from a real store: screening results never on a front, fronts across
recipes, the ranking ablation (hypervolume of a hand-computed front, counts, agent seconds, times) and the
smallest candidate a ``target`` search found."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from report_store import (
    MODEL,
    add_candidate,
    add_device,
    add_eval_split,
    add_model,
    add_proposal,
    add_result,
    add_search,
    open_store,
    predictions,
)

from tuneqn.controller import accuracy
from tuneqn.controller.report import compute_report, write_full_report
from tuneqn.controller.report.finalize import HV_REFERENCE, finalize_report, hypervolume
from tuneqn.controller.report.plots import recipe_plot_key

MB = 1_000_000
SWEEP, GREEDY, TARGET = "sweep/paper", "greedy/measured", "target1%/measured"


class _Study:
    """A store filled like the orchestrator fills it; candidates agree with FP32 on a chosen share of samples."""

    def __init__(
        self,
        tmp: Path,
        n: int = 10,
        screen: int = 4,
        devices: tuple[str, ...] = ("cpu",),
        recipes: list[str] | None = None,
    ) -> None:
        self.n, self.screen = n, screen
        self.rng = np.random.default_rng(0)
        self.store = open_store(tmp, recipes=recipes)
        add_model(self.store, size=10 * MB)
        add_eval_split(
            self.store, [int(x) for x in self.rng.integers(0, 10, n)], screen=screen, recipes=recipes or ["static"]
        )
        self.base = predictions(n, self.rng)
        for dev in devices:
            add_device(self.store, dev)
            accuracy.on_result(self.store, add_result(self.store, f"{MODEL}:fp32", dev, self.base, seconds=9.0))

    def _topk(self, agreement: float, n: int) -> np.ndarray:
        t = self.base[:n].copy()
        wrong = n - round(agreement * n)
        t[:wrong, 0] = (t[:wrong, 0] + 1) % 10
        return t

    def full(self, cid: str, device: str, agreement: float, *, seconds: float = 2.0, at: float | None = None) -> None:
        accuracy.on_result(
            self.store,
            add_result(self.store, cid, device, self._topk(agreement, self.n), seconds=seconds, finished_at=at),
        )

    def screened(
        self, cid: str, device: str, agreement: float, *, seconds: float = 0.5, at: float | None = None
    ) -> None:
        accuracy.on_result(
            self.store,
            add_result(
                self.store,
                cid,
                device,
                self._topk(agreement, self.screen),
                level="screen",
                latency=None,
                seconds=seconds,
                finished_at=at,
            ),
        )


def _cand(report: dict[str, Any], cid: str) -> dict[str, Any]:
    return next(c for c in report["candidates"] if c["id"] == cid)


def _row(report: dict[str, Any], search: str, device: str | None = "cpu") -> dict[str, Any]:
    (row,) = [a for a in report["ablation"] if a["search"] == search and a["device"] == device]
    return row


# --------------------------------------------------------------------------- screening


def test_screening_results_are_never_on_a_front(tmp_path: Path) -> None:
    s = _Study(tmp_path)
    t0 = add_search(s.store, GREEDY, strategy="greedy", ranking="measured")
    fq = add_candidate(s.store, k=0, size=2 * MB, label="fq")
    big = add_candidate(s.store, k=3, size=4 * MB, label="greedy step 3")
    tiny = add_candidate(s.store, excluded=["conv_9"], size=1 * MB, label="ranking +conv_9")  # screened only
    built = add_candidate(s.store, excluded=["conv_8"], size=3 * MB, label="size only")  # built only
    for cid, level in [(fq, "screen"), (tiny, "screen"), (fq, "full"), (big, "full"), (built, "build")]:
        add_proposal(s.store, GREEDY, cid, level)
    s.screened(fq, "cpu", 0.5, at=t0 + 1)
    s.screened(tiny, "cpu", 1.0, at=t0 + 2)  # perfect and smallest: it would dominate everything on a front
    s.full(fq, "cpu", 0.6, at=t0 + 3)
    s.full(big, "cpu", 0.9, at=t0 + 4)
    # the FP32 model's newer screening job (pending) must not hide its full result
    s.store.add_job("tq-fp32-screen-again", f"{MODEL}:fp32", "cpu", "screen")
    s.store.put_ranking(
        MODEL,
        "static",
        "measured",
        "",
        [
            {"name": "conv_9", "gain": 0.25, "overlap_gain": 0.1, "bytes": 1000, "rank": 1},
            {"name": "conv_8", "gain": 0.0, "overlap_gain": 0.0, "bytes": 2000, "rank": 2},
        ],
    )

    report = compute_report(s.store)
    assert [b["status"] for b in report["baselines"]] == ["done"]
    assert report["fronts"][0]["fronts"] == [[fq, big]]
    assert report["recipe_fronts"] == [
        {
            "model": MODEL,
            "device": "cpu",
            "recipes": ["static"],
            "fronts": [[fq, big]],
            "selected": report["recipe_fronts"][0]["selected"],
        }
    ]
    listed = {i["candidate"] for i in report["infeasible"]} | {
        c["id"] for x in report["cross_device"] for c in x["candidates"]
    }
    assert tiny not in listed and built not in listed
    assert {x["selected"] for x in report["summary"]} <= {fq, big}
    assert report["summary"][0]["fq_candidate"] == fq

    t, b, f = _cand(report, tiny), _cand(report, built), _cand(report, fq)
    assert (t["level"], t["results"]) == ("screen", [])
    assert t["screening"] == [
        {
            "device": "cpu",
            "status": "done",
            "agreement": 1.0,
            "accuracy": t["screening"][0]["accuracy"],
            "num_samples": s.screen,
            "seconds": 0.5,
            "finished_at": t0 + 2,
            "error": None,
        }
    ]
    assert t["proposed_by"] == [{"search": GREEDY, "label": "ranking +conv_9", "level": "screen"}]
    assert (b["level"], b["results"], b["screening"]) == ("build", [], [])
    assert f["level"] == "full" and f["screening"][0]["agreement"] == 0.5  # vs the FP32 screening result
    (r,) = f["results"]
    assert (r["agreement"], r["num_samples"], r["seconds"], r["finished_at"]) == (0.6, s.n, 2.0, t0 + 3)
    assert [p["level"] for p in f["proposed_by"]] == ["screen", "full"]
    assert f["recipe"] == f["mode"] == "static"
    (ranking,) = report["rankings"]
    assert (ranking["recipe"], ranking["name"], [x["name"] for x in ranking["layers"]]) == (
        "static",
        "measured",
        ["conv_9", "conv_8"],
    )

    paths = write_full_report(s.store, tmp_path / "out")
    html = paths["html"].read_text(encoding="utf-8")
    assert html.count('<span class="badge scr">screened only</span>') == 2  # the note + the tiny candidate
    assert "Screening results (1 candidates screened only)" in html and "1 more candidates were only built" in html
    assert 'title="cpu: agreement 50.00 % on 4 samples"' in html  # the full candidate's screening mark
    assert "Measured rankings" in html and "net · static · measured: top 2 of 2" in html


# --------------------------------------------------------------------------- fronts across recipes


@pytest.mark.heavy
def test_fronts_compare_across_recipes(tmp_path: Path) -> None:
    s = _Study(tmp_path, devices=("cpu", "phone"), recipes=["per-tensor", "per-channel"])  # the study's order
    add_search(s.store, SWEEP, strategy="sweep", ranking="paper")
    t = add_candidate(s.store, k=0, size=2 * MB, mode="per-tensor", label="paper k=0")
    t3 = add_candidate(s.store, k=3, size=4 * MB, mode="per-tensor", label="paper k=3")
    c = add_candidate(s.store, k=0, size=2 * MB + 100_000, mode="per-channel", label="paper k=0")
    c1 = add_candidate(s.store, k=1, size=3 * MB, mode="per-channel", label="paper k=1")
    for cid in (c, c1, t, t3):
        add_proposal(s.store, SWEEP, cid, "full")
    # (loss, MB) on cpu: t (.4, 2) t3 (.1, 4) c (.2, 2.1) c1 (0, 3): per recipe every one is on its front 1;
    # across recipes front 1 = t, c, c1 and t3 is dominated by c1 (front 2).
    for cid, a in [(t, 0.6), (t3, 0.9), (c, 0.8), (c1, 1.0)]:
        s.full(cid, "cpu", a)
    # phone: no loss anywhere, so size decides: t (2) dominates everything, then c (2.1), c1 (3), t3 (4: front 4).
    for cid, a in [(t, 1.0), (t3, 1.0), (c, 1.0), (c1, 1.0)]:
        s.full(cid, "phone", a)
    report = compute_report(s.store)
    assert [(f["recipe"], f["device"], f["fronts"]) for f in report["fronts"]] == [
        ("per-tensor", "cpu", [[t, t3]]),
        ("per-tensor", "phone", [[t], [t3]]),
        ("per-channel", "cpu", [[c, c1]]),
        ("per-channel", "phone", [[c], [c1]]),
    ]
    cpu, phone = report["recipe_fronts"]
    assert (cpu["model"], cpu["device"], cpu["recipes"]) == (MODEL, "cpu", ["per-tensor", "per-channel"])
    assert cpu["fronts"] == [[t, c, c1], [t3]]
    assert phone["fronts"] == [[t], [c], [c1]]
    assert {
        cid: next(r["recipe_front"] for r in _cand(report, cid)["results"] if r["device"] == "cpu")
        for cid in (t, t3, c, c1)
    } == {t: 1, t3: 2, c: 1, c1: 1}
    assert [x["fq_candidate"] for x in report["summary"]] == [t, t, c, c]  # each recipe's own k = 0

    paths = write_full_report(s.store, tmp_path / "out")
    assert paths[recipe_plot_key(MODEL, "cpu")].stat().st_size > 10_000
    assert paths[recipe_plot_key(MODEL, "phone")].is_file()
    html = paths["html"].read_text(encoding="utf-8")
    assert "Recipes compared" in html and html.count('class="recipe-fronts"') == 2
    assert "net · cpu · recipes: per-tensor, per-channel" in html


# --------------------------------------------------------------------------- ablation


def _ablation_study(tmp: Path) -> tuple[_Study, dict[str, str], dict[str, float]]:
    """cpu only; objectives accuracy_loss and size. (loss, MB) of the full results:
    fq (.4, 2), A (.2, 3), B (.1, 4) from the sweep; C (.1, 2.5), D (0, 3.5) from greedy (with fq).
    Normalized over all five (loss / .4, (MB - 2) / 2): fq (1, 0), A (.5, .5), B (.25, 1), C (.25, .25), D (0, .75).
    Hypervolume with reference (1.1, 1.1), as slabs along the loss axis:
      sweep  {fq, A, B}: [.25, .5) x (1.1 - 1) + [.5, 1) x (1.1 - .5) + [1, 1.1) x 1.1 = .025 + .3 + .11 = .435
      greedy {fq, C, D}: [0, .25) x (1.1 - .75) + [.25, 1) x (1.1 - .25) + [1, 1.1) x 1.1 = .0875 + .6375 + .11 = .835
    """
    s = _Study(tmp)
    start = {
        SWEEP: add_search(s.store, SWEEP, strategy="sweep", ranking="paper"),
        GREEDY: add_search(s.store, GREEDY, strategy="greedy", ranking="measured"),
    }
    ids = {
        "fq": add_candidate(s.store, k=0, size=2 * MB, label="paper k=0"),
        "A": add_candidate(s.store, k=1, size=3 * MB, label="paper k=1"),
        "B": add_candidate(s.store, k=2, size=4 * MB, label="paper k=2"),
        "C": add_candidate(s.store, excluded=["conv_5"], size=2_500_000, label="greedy step 1"),
        "D": add_candidate(s.store, excluded=["conv_5", "conv_6"], size=3_500_000, label="greedy step 2"),
        "E": add_candidate(s.store, excluded=["conv_7"], size=2_400_000, label="ranking +conv_7"),
        "F": add_candidate(s.store, excluded=["conv_8", "conv_9"], size=3 * MB, label="size only"),
    }
    for name in ("fq", "A", "B"):
        add_proposal(s.store, SWEEP, ids[name], "full")
    for name in ("fq", "C", "D", "E"):
        add_proposal(s.store, GREEDY, ids[name], "screen")
    for name in ("fq", "C", "D"):
        add_proposal(s.store, GREEDY, ids[name], "full")
    add_proposal(s.store, GREEDY, ids["F"], "build")
    add_proposal(s.store, GREEDY, ids["C"], "full")  # asking again changes nothing
    g = start[GREEDY]
    for name, a, at in [("fq", 0.5, 1), ("C", 0.75, 2), ("D", 1.0, 3), ("E", 1.0, 4)]:
        s.screened(ids[name], "cpu", a, at=g + at)
    for name, a, at in [("fq", 0.6, 10), ("A", 0.8, 20), ("B", 0.9, 40), ("C", 0.9, 15), ("D", 1.0, 30)]:
        s.full(ids[name], "cpu", a, at=start[SWEEP] + at if name in "AB" else g + at)
    return s, ids, start


def test_hypervolume_of_a_known_front() -> None:
    lo, span = np.array([0.0, 2.0]), np.array([0.4, 2.0])
    sweep = np.array([[0.4, 2.0], [0.2, 3.0], [0.1, 4.0]])
    assert hypervolume(sweep, lo, span) == pytest.approx(0.435)
    assert hypervolume(np.zeros((0, 2)), lo, span) == 0.0
    assert hypervolume(np.array([[0.0, 2.0]]), lo, span) == pytest.approx(HV_REFERENCE**2)  # the ideal point
    assert hypervolume(np.array([[0.1, 5.0]]), lo, np.array([0.4, 0.0])) == pytest.approx(0.85 * 1.1)  # constant size


def test_ablation_hypervolume_counts_and_times(tmp_path: Path) -> None:
    s, ids, start = _ablation_study(tmp_path)
    report = compute_report(s.store)

    sweep, greedy = _row(report, SWEEP), _row(report, GREEDY)
    assert (sweep["model"], sweep["recipe"], sweep["mode"]) == (MODEL, "static", "static")
    assert sweep["front"] == [ids["fq"], ids["A"], ids["B"]]
    assert greedy["front"] == [ids["fq"], ids["C"], ids["D"]]
    assert sweep["hypervolume"] == pytest.approx(0.435)
    assert greedy["hypervolume"] == pytest.approx(0.835)
    assert sweep["hv_vs_sweep"] == pytest.approx(1.0)
    assert greedy["hv_vs_sweep"] == pytest.approx(0.835 / 0.435)
    # distinct candidates asked for per level; builds = everything asked for at any level
    assert (sweep["evaluations"], sweep["screenings"], sweep["builds"]) == (3, 0, 3)
    assert (greedy["evaluations"], greedy["screenings"], greedy["builds"]) == (3, 4, 5)
    # agent seconds: 2 s per full result, 0.5 s per screening result (FP32 runs belong to no search)
    assert sweep["seconds"] == pytest.approx(6.0)
    assert greedy["seconds"] == pytest.approx(3 * 2.0 + 4 * 0.5)
    assert sweep["found_after_s"] == pytest.approx(40) and sweep["front_done_after_s"] == pytest.approx(40)
    assert greedy["found_after_s"] == pytest.approx(30) and greedy["front_done_after_s"] == pytest.approx(30)

    totals = {a["search"]: a for a in report["ablation"] if a["device"] is None}
    assert set(totals) == {SWEEP, GREEDY}
    assert (totals[GREEDY]["model"], totals[GREEDY]["recipe"], totals[GREEDY]["front"]) == (None, None, None)
    assert totals[GREEDY]["hypervolume"] == pytest.approx(0.835)
    assert totals[GREEDY]["hv_vs_sweep"] == pytest.approx(0.835 / 0.435)
    assert (totals[GREEDY]["evaluations"], totals[GREEDY]["screenings"], totals[GREEDY]["builds"]) == (3, 4, 5)

    # searches[]: the keys bench/peers.py reads, with the totals
    by_name = {x["name"]: x for x in report["searches"]}
    assert list(by_name) == [SWEEP, GREEDY]
    for x in report["searches"]:
        assert {
            "name",
            "strategy",
            "ranking",
            "recipe",
            "evaluations",
            "screenings",
            "seconds",
            "target",
            "front_done_after_s",
            "found_after_s",
            "hypervolume",
            "hv_vs_sweep",
            "builds",
            "proposals",
        } <= set(x)
    g = by_name[GREEDY]
    assert (g["strategy"], g["ranking"], g["recipe"], g["recipes"]) == ("greedy", "measured", "static", ["static"])
    assert (g["evaluations"], g["screenings"], g["seconds"], g["target"], g["targets"]) == (3, 4, 8.0, None, None)
    assert g["started_at"] == start[GREEDY] and len(g["proposals"]) == 8
    assert by_name[SWEEP]["hypervolume"] == pytest.approx(0.435)

    # normalization over every full result of (model, device): the numbers stay put when searches are dropped
    only_sweep = compute_report(s.store)
    only_sweep["searches"] = [x for x in only_sweep["searches"] if x["name"] == SWEEP]
    assert _row(finalize_report(only_sweep), SWEEP)["hypervolume"] == pytest.approx(0.435)

    paths = write_full_report(s.store, tmp_path / "out")
    html = paths["html"].read_text(encoding="utf-8")
    assert 'class="ablation"' in html and "0.8350" in html and "1.920" in html and "0.4350" in html


# --------------------------------------------------------------------------- target


def test_target_is_the_smallest_candidate_within_the_loss_on_every_device(tmp_path: Path) -> None:
    s = _Study(tmp_path, n=100, screen=10, devices=("cpu", "phone"))
    t0 = add_search(s.store, TARGET, strategy="target", ranking="measured", max_loss=0.01)
    add_search(s.store, GREEDY, strategy="greedy", ranking="measured")
    small_other = add_candidate(s.store, excluded=["conv_1"], size=2 * MB, label="greedy's")  # not the target's
    screened = add_candidate(s.store, excluded=["conv_2"], size=2_500_000, label="screened")
    fails = add_candidate(s.store, excluded=["conv_3"], size=3 * MB, label="target step 1")
    found = add_candidate(s.store, excluded=["conv_3", "conv_4"], size=3_500_000, label="target step 2")
    bigger = add_candidate(s.store, excluded=["conv_3", "conv_4", "conv_5"], size=4 * MB, label="target step 3")
    add_proposal(s.store, GREEDY, small_other, "full")
    add_proposal(s.store, TARGET, screened, "screen")
    for cid in (fails, found, bigger):
        add_proposal(s.store, TARGET, cid, "full")
    s.screened(screened, "cpu", 1.0, at=t0 + 1)
    s.screened(screened, "phone", 1.0, at=t0 + 1)
    for dev in ("cpu", "phone"):
        s.full(small_other, dev, 1.0, at=t0 + 2)
    s.full(fails, "cpu", 1.0, at=t0 + 3)
    s.full(fails, "phone", 0.98, at=t0 + 4)  # 2 % loss on the phone
    s.full(found, "cpu", 0.99, at=t0 + 5)  # 1 - 0.99 = 0.010000000000000009: within 1 %
    s.full(found, "phone", 1.0, at=t0 + 7)
    s.full(bigger, "cpu", 1.0, at=t0 + 6)
    s.full(bigger, "phone", 1.0, at=t0 + 9)

    report = compute_report(s.store)
    target = next(x for x in report["searches"] if x["name"] == TARGET)
    assert target["max_loss"] == 0.01 and target["strategy"] == "target"
    assert target["target"] == {
        "model": MODEL,
        "id": found,
        "recipe": "static",
        "label": "target step 2",
        "size_bytes": 3_500_000,
        "worst_agreement": pytest.approx(0.99),
        "found_after_s": pytest.approx(7.0),
        "parts": [],
        "devices": [
            {
                "device": "cpu",
                "id": fails,
                "recipe": "static",
                "label": "target step 1",
                "size_bytes": 3 * MB,
                "worst_agreement": 1.0,
                "found_after_s": pytest.approx(3.0),
            },
            {
                "device": "phone",
                "id": found,
                "recipe": "static",
                "label": "target step 2",
                "size_bytes": 3_500_000,
                "worst_agreement": 1.0,
                "found_after_s": pytest.approx(7.0),
            },
        ],
    }
    assert target["targets"] == [target["target"]]
    assert target["found_after_s"] == pytest.approx(7.0)
    assert target["front_done_after_s"] == pytest.approx(9.0)
    assert (target["evaluations"], target["screenings"]) == (3, 1)
    other = next(x for x in report["searches"] if x["name"] == GREEDY)
    assert (other["target"], other["targets"]) == (None, None)

    # nothing within the loss: an entry without a candidate, and no target
    s.store.put_search("target0%/measured", {"ranking": "measured", "strategy": "target", "max_loss": 0.0})
    add_proposal(s.store, "target0%/measured", fails, "full")
    none = next(x for x in compute_report(s.store)["searches"] if x["name"] == "target0%/measured")
    assert none["target"] is None and none["targets"][0]["id"] is None and none["found_after_s"] is None

    html = write_full_report(s.store, tmp_path / "out")["html"].read_text(encoding="utf-8")
    assert "target1%/measured (net): target step 2 [static], 3.50 MB, worst agreement 99.00 %" in html
    assert "target0%/measured (net): no candidate with accuracy loss ≤ 0 % on every device" in html
    json.dumps(report)  # JSON-ready
