"""The search width follows the live devices, and a resume replays what was decided (issue 17, items 5 and 6).

Real ORT agents on loopback (one in-process agent exposing several devices of one class, like a TVM agent
fronting phones), real SQLite stores. ``agent_proxy.DeviceProxy`` hides devices on a rerun, or plays a
device class whose arithmetic differs (its results' first two classes swapped on some samples).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_proxy import DeviceProxy, swap_top2
from helpers import write_study
from studies import FAST, run_bounded

from tuneqn.controller.config import load_config
from tuneqn.controller.farm.jobs import Endpoint
from tuneqn.controller.study import Study, screen_positions
from tuneqn.v1 import agent_pb2 as pb

SEARCH = {"strategy": "budget", "ranking": "measured", "budget": 6, "screen_samples": 4}
#: Measured latency is noisy: without it the budget's choices are a function of the predictions only.
OBJECTIVES = [{"name": "accuracy_loss"}, {"name": "size"}]


@contextmanager
def local_agent(tmp: Path, name: str, device_class: str, devices: int, sim_ms: float) -> Iterator[Any]:
    """An in-process ORT agent with ``devices`` devices of one class."""
    from tuneqn.agent.backends.ort import OrtBackend
    from tuneqn.agent.config import AgentConfig
    from tuneqn.agent.server import AgentServer

    backends = [
        OrtBackend(f"{name}{i}", device_class, simulated_latency_ms_per_sample=sim_ms) for i in range(1, devices + 1)
    ]
    server = AgentServer(AgentConfig(state_dir=tmp / f"agent-{name}"), backends)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _rows(db: Path, sql: str, args: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as con:
        return con.execute(sql, args or []).fetchall()


def _most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of the (start, end) intervals that overlap at one instant."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda t: (t[0], t[1]))
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def _chosen_in_flight(db: Path) -> int:
    """How many of the budget's own choices (every full evaluation but its first and last: those two and
    FP32 always start together) ran at once, from the results' start and end times."""
    ks = {
        cid: len(json.loads(excluded))
        for cid, excluded in _rows(
            db,
            "select c.id, c.excluded from proposals p join candidates c on c.id = p.candidate_id "
            "where p.level = 'full' and c.kind != 'fp32'",
        )
    }
    inner = {cid for cid, k in ks.items() if min(ks.values()) < k < max(ks.values())}
    spans = []
    for cid, info, finished in _rows(
        db, "select candidate_id, json_extract(info, '$.seconds'), finished_at from results where level = 'full'"
    ):
        if cid in inner:
            spans.append((finished - info, finished))
    assert len(spans) >= 3, "the budget chose too few candidates to show its width"
    return _most_at_once(spans)


@pytest.mark.heavy
def test_an_agent_with_three_devices_of_a_class_gets_three_evaluations_at_once(tmp_path: Path, assets: Path) -> None:
    """One agent fronting three devices of one class (a TVM agent with three phones): width 3, recorded per
    decision, and the budget's choices run together (one endpoint gave width 1 before: one at a time)."""
    study = write_study(
        tmp_path,
        model=assets / "cnn.onnx",
        images=assets / "images",
        evaluation=FAST,
        search=SEARCH,
        objectives=OBJECTIVES,
    )
    db = tmp_path / "out" / "tuneqn.db"
    with local_agent(tmp_path, "phone", "phones", 3, 60.0) as server:
        outcome = run_bounded(240, study, [Endpoint(address=server.address)], info_poll_s=0.2)
    assert outcome.failed == 0 and outcome.done == outcome.total
    widths = [w for (w,) in _rows(db, "select width from search_widths")]
    assert widths and set(widths) == {3}
    assert _chosen_in_flight(db) == 3  # at width 1 one at a time (and fewer: each choice knew more)


@pytest.mark.heavy
def test_a_rerun_with_fewer_devices_takes_every_decision_as_before(tmp_path: Path, assets: Path) -> None:
    """A study searched three wide, rerun when only one of the devices is left: every decision is replayed
    with the width it was taken with, so nothing new is asked for and nothing runs again."""
    study = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images", evaluation=FAST, search=SEARCH)
    db = tmp_path / "out" / "tuneqn.db"
    with local_agent(tmp_path, "phone", "phones", 3, 30.0) as server:
        first = run_bounded(240, study, [Endpoint(address=server.address)], info_poll_s=0.2)
        proposals = _rows(db, "select search, candidate_id, level from proposals order by search, seq")
        widths = _rows(db, "select * from search_widths order by search, model, mode, step")
        jobs = _rows(db, "select id, state, attempts from jobs order by id")
        with DeviceProxy(server.address, lambda devices: [d for d in devices if d.name == "phone1"]) as proxy:
            second = run_bounded(120, study, [Endpoint(address=proxy.address)], info_poll_s=0.2)
    assert first.failed == second.failed == 0 and second.done == second.total == first.total
    assert second.submitted_here == 0  # every result was in the store
    assert _rows(db, "select search, candidate_id, level from proposals order by search, seq") == proposals
    assert _rows(db, "select * from search_widths order by search, model, mode, step") == widths
    assert _rows(db, "select id, state, attempts from jobs order by id") == jobs


@pytest.mark.heavy
def test_the_screening_sample_is_kept_when_a_class_is_gone_on_resume(tmp_path: Path, assets: Path) -> None:
    """The screening sample is chosen from classes A and B (B's arithmetic differs from A's on some samples);
    rerun with only A connected, the study screens on the same sample (recomputing it from A alone would
    choose another one and change what the searches see)."""
    study_toml = write_study(
        tmp_path, model=assets / "wide.onnx", images=assets / "images", evaluation=FAST, search=SEARCH
    )
    db = tmp_path / "out" / "tuneqn.db"
    cfg = load_config(study_toml)
    prepared = Study(cfg)
    try:
        prepared.prepare()
        fp32_sha = prepared.models[next(iter(prepared.models))].sha256
    finally:
        prepared.close()

    differs_on = {7, 8, 9, 10, 11}  # B's top-1 and top-2 swap on these samples, FP32 aside

    def device_b(result: pb.JobResult, spec: pb.JobSpec | None) -> None:
        if spec is not None and spec.model_sha256 != fp32_sha:
            swap_top2(result, differs_on)

    with (
        local_agent(tmp_path, "a", "A", 1, 0.0) as a,
        local_agent(tmp_path, "b", "B", 1, 0.0) as b,
        DeviceProxy(b.address) as proxy_b,
    ):
        proxy_b.rewrite_result = device_b
        first = run_bounded(240, study_toml, [Endpoint(address=a.address), Endpoint(address=proxy_b.address)])
        assert first.failed == 0
        ((recipe, kept, classes),) = _rows(db, "select mode, positions, classes from screens")
        assert classes == '["A", "B"]'
        items = _rows(db, "select items from datasets where split like '%/screen/%'")
        # precondition: A's results alone choose another sample
        fq = _rows(
            db,
            "select r.device, r.topk, r.num_samples, r.top_k from results r join candidates c "
            "on c.id = r.candidate_id where c.mode = ? and c.excluded = '[]' and r.level = 'full'",
            [recipe],
        )
        base = _rows(
            db,
            "select r.device, r.topk, r.num_samples, r.top_k from results r join candidates c "
            "on c.id = r.candidate_id where c.kind = 'fp32'",
        )
        arrays = {
            (dev, i): np.frombuffer(t, "<i4").reshape(n, k)
            for i, rows in enumerate((fq, base))
            for dev, t, n, k in rows
        }
        both = screen_positions([arrays[("A", 0)], arrays[("B", 0)]], [arrays[("A", 1)], arrays[("B", 1)]], 4)
        alone = screen_positions([arrays[("A", 0)]], [arrays[("A", 1)]], 4)
        assert json.loads(kept) == both and alone != both
        screens_a = _rows(db, "select id, state from jobs where level = 'screen' and device = 'A' order by id")
        second = run_bounded(240, study_toml, [Endpoint(address=a.address)])
    assert second.failed == 0
    assert _rows(db, "select mode, positions, classes from screens") == [(recipe, kept, classes)]
    assert _rows(db, "select items from datasets where split like '%/screen/%'") == items
    # A's screens are those of the kept sample (the same job ids): nothing was screened again
    assert _rows(db, "select id, state from jobs where level = 'screen' and device = 'A' order by id") == screens_a


@pytest.mark.heavy
def test_a_study_started_with_a_fixed_width_keeps_it(tmp_path: Path, assets: Path) -> None:
    """A store from before the width followed the devices (meta ``search_concurrency``): its searches keep
    deciding with that width, so a resumed study replays them as they were."""
    from tuneqn.controller.store import Store

    study = write_study(
        tmp_path,
        model=assets / "cnn.onnx",
        images=assets / "images",
        evaluation=FAST,
        search=SEARCH,
        objectives=OBJECTIVES,
    )
    db = tmp_path / "out" / "tuneqn.db"
    old = Store(db)
    old.set_meta("search_concurrency", "2")
    old.close()
    with local_agent(tmp_path, "phone", "phones", 3, 0.0) as server:
        outcome = run_bounded(240, study, [Endpoint(address=server.address)])
    assert outcome.failed == 0
    assert {w for (w,) in _rows(db, "select width from search_widths")} == {2}


@pytest.mark.heavy
def test_a_search_killed_three_wide_resumes_one_wide_and_replays_with_any_width(tmp_path: Path, assets: Path) -> None:
    """SIGKILLed while three devices search, resumed with one device left (the steps not taken yet go one
    wide), then rerun with three again: the widths taken before the kill are kept, and the last rerun,
    replaying a history of mixed widths with another live width, asks for nothing new."""
    import signal
    import subprocess
    import sys
    import time

    study = write_study(
        tmp_path,
        model=assets / "cnn.onnx",
        images=assets / "images",
        evaluation=FAST,
        search=SEARCH,
        objectives=OBJECTIVES,
    )
    db = tmp_path / "out" / "tuneqn.db"

    def widths() -> list[tuple[Any, ...]]:
        try:
            return _rows(db, "select search, model, mode, step, width from search_widths order by step")
        except sqlite3.OperationalError:  # not created yet
            return []

    with local_agent(tmp_path, "phone", "phones", 3, 50.0) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tuneqn.controller", "tune", str(study), "--agent", server.address],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not widths():
            time.sleep(0.05)  # polling the checkpoint for a condition
        assert proc.poll() is None and widths(), "the search ended (or never decided) before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = widths()
        assert {w for *_, w in before} == {3}
        with DeviceProxy(server.address, lambda devices: [d for d in devices if d.name == "phone1"]) as proxy:
            resumed = run_bounded(240, study, [Endpoint(address=proxy.address)], info_poll_s=0.2)
        assert resumed.failed == 0 and resumed.done == resumed.total
        after = widths()
        assert after[: len(before)] == before and len(after) > len(before)
        assert {w for *_, w in after[len(before) :]} == {1}
        proposals = _rows(db, "select search, candidate_id, level from proposals order by search, seq")
        again = run_bounded(120, study, [Endpoint(address=server.address)], info_poll_s=0.2)
    assert again.submitted_here == 0 and again.done == again.total == resumed.total
    assert widths() == after
    assert _rows(db, "select search, candidate_id, level from proposals order by search, seq") == proposals
