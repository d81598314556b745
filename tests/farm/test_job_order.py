"""Which pending job a device takes first (``JobPlan.priority``): model by model, FP32 first, then recipe by
recipe (``Orchestrator._priority``), so that one recipe's search runs at full pace instead of at the pace of
all of them; equal priorities keep the order they were added in. Real SQLite store, the real board."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
from report_store import add_candidate, add_model, open_store

from tuneqn.controller.farm.board import JobBoard
from tuneqn.controller.farm.jobs import FarmSettings, JobPlan, make_job
from tuneqn.v1 import agent_pb2 as pb

CLASS = "lab"
HOLDER = "127.0.0.1:1#cpu"


def _job(tmp: Path, cid: str, priority: tuple[int, ...]) -> JobPlan:
    sha = hashlib.sha256(cid.encode()).hexdigest()  # each candidate its own file
    plan = make_job(
        cid, CLASS, tmp / "m.onnx", sha, tmp / "eval.npy", "e" * 64, "x", {}, FarmSettings(), tuning_group="t"
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


def _twin(tmp: Path, cid: str, priority: tuple[int, ...], sha: str = "a" * 64) -> JobPlan:
    """The full job of a candidate whose file has sha256 ``sha`` (twins: the same file, two candidates)."""
    plan = make_job(
        cid, CLASS, tmp / f"{cid}.onnx", sha, tmp / "eval.npy", "e" * 64, "x", {}, FarmSettings(), tuning_group="t"
    )
    return dataclasses.replace(plan, priority=priority)


def _result(plan: JobPlan) -> pb.JobResult:
    return pb.JobResult(
        job_id=plan.id,
        state=pb.SUCCEEDED,
        num_samples=2,
        top_k=1,
        topk_indices=np.array([[3], [4]], dtype="<i4").tobytes(),
        model_size_bytes=100,
        finished_at=time.time(),
        started_at=time.time() - 0.5,
    )


def test_a_file_asked_for_twice_is_measured_once(tmp_path: Path) -> None:
    """Two candidates with the same bytes (every searched layer in float under per-tensor and per-channel): one job
    runs, the other takes its result (marked ``same_file_as``), never leased; the one that runs is queued as early
    as the earlier of the two; a different file runs itself."""
    store = open_store(tmp_path)
    add_model(store)
    board = JobBoard(store, FarmSettings(max_attempts=3))
    later = _twin(tmp_path, add_candidate(store, k=1), (0, 3))
    other = _twin(tmp_path, add_candidate(store, k=2), (0, 2), sha="b" * 64)
    earlier = _twin(tmp_path, add_candidate(store, k=3), (0, 1))  # the same bytes as ``later``, a better priority
    for plan in (later, other, earlier):
        assert board.add(plan) == "pending"
    first = board.take(CLASS, HOLDER, timeout=1.0)
    assert first is not None and first[0].id == later.id  # moved up to ``earlier``'s place, ahead of ``other``
    second = board.take(CLASS, HOLDER, timeout=1.0)
    assert second is not None and second[0].id == other.id
    assert board.take(CLASS, HOLDER, timeout=0.05) is None  # ``earlier`` is never leased
    assert board.complete(first[0], HOLDER, _result(first[0]))
    twin = store.result(earlier.id)
    assert twin is not None and twin["candidate_id"] == earlier.candidate_id
    assert json.loads(twin["info"])["same_file_as"] == later.id
    assert twin["topk"] == store.result(later.id)["topk"]
    assert store.job(earlier.id)["state"] == "done" and store.job(earlier.id)["attempts"] == 0
    # Asked for once more after the result is in (a resumed run, another search): taken at once, nothing runs.
    again = _twin(tmp_path, add_candidate(store, k=4), (0, 0))
    assert board.add(again) == "pending"
    assert store.job(again.id)["state"] == "done"
    assert json.loads(store.result(again.id)["info"])["same_file_as"] == later.id
    assert board.take(CLASS, HOLDER, timeout=0.05) is None


def test_a_twin_runs_itself_when_the_first_fails_for_good(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    add_model(store)
    board = JobBoard(store, FarmSettings(max_attempts=1))
    a, b, c = (_twin(tmp_path, add_candidate(store, k=k), (0, 1)) for k in (1, 2, 3))
    for plan in (a, b, c):
        board.add(plan)
    taken = board.take(CLASS, HOLDER, timeout=1.0)
    assert taken is not None and taken[0].id == a.id and board.take(CLASS, HOLDER, timeout=0.05) is None
    assert board.fail(taken[0], HOLDER, "crashed") == "failed"
    retry = board.take(CLASS, HOLDER, timeout=1.0)  # b runs now; c still waits for it
    assert retry is not None and retry[0].id == b.id and board.take(CLASS, HOLDER, timeout=0.05) is None
    assert board.complete(retry[0], HOLDER, _result(retry[0]))
    assert json.loads(store.result(c.id)["info"])["same_file_as"] == b.id
    assert board.unfinished() == []
