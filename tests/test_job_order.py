"""Which pending job a device takes first (``JobPlan.priority``): model by model, FP32 first, then recipe by
recipe (``Orchestrator._priority``), so that one recipe's search runs at full pace instead of at the pace of
all of them; equal priorities keep the order they were added in. Real SQLite store, the real board."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from report_store import add_candidate, add_model, open_store

from tuneqn.controller.farm.dispatcher import FarmSettings, JobBoard, JobPlan, make_job

CLASS = "lab"
HOLDER = "127.0.0.1:1#cpu"


def _job(tmp: Path, cid: str, priority: tuple[int, ...]) -> JobPlan:
    plan = make_job(
        cid, CLASS, tmp / "m.onnx", "a" * 64, tmp / "eval.npy", "e" * 64, "x", {}, FarmSettings(), tuning_group="t"
    )
    return dataclasses.replace(plan, priority=priority)


def test_a_device_takes_the_lowest_priority_first_and_equal_ones_in_order(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    add_model(store)
    board = JobBoard(store, FarmSettings(max_attempts=3))
    # Added as a search would: recipe 2's screens first, then FP32, then recipe 1's (the first-ranked recipe).
    wanted = [("r2a", (0, 2)), ("r2b", (0, 2)), ("fp32", (0, -1)), ("r1a", (0, 1)), ("r1b", (0, 1)), ("m2", (1, -1))]
    plans = {
        name: _job(tmp_path, add_candidate(store, k=i, size=100 + i), prio) for i, (name, prio) in enumerate(wanted)
    }
    for plan in plans.values():
        assert board.add(plan) == "pending"
    names = {p.id: n for n, p in plans.items()}
    first = board.take(CLASS, HOLDER, timeout=1.0)
    second = board.take(CLASS, HOLDER, timeout=1.0)
    assert first is not None and second is not None
    assert [names[first[0].id], names[second[0].id]] == ["fp32", "r1a"]
    # A failed attempt goes back by its priority: ahead of recipe 2, behind the rest of recipe 1.
    assert board.fail(second[0], HOLDER, "boom") == "pending"
    order = []
    while (job := board.take(CLASS, HOLDER, timeout=0.05)) is not None:
        order.append(names[job[0].id])
    assert order == ["r1b", "r1a", "r2a", "r2b", "m2"]


def test_the_priority_is_not_part_of_a_jobs_identity(tmp_path: Path) -> None:
    """The same job asked for again (a rerun, another search) with another priority is the same job."""
    a, b = _job(tmp_path, "m:r:fq", (0, 1)), _job(tmp_path, "m:r:fq", (0, 3))
    assert a.id == b.id and a == b
