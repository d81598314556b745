"""bench/chaos.py: its comparison with the reference and its reading of real stores (fast), and one short
run with faults on the real lab (slow: a TVM tracker, two RPC servers, three agents)."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import chaos  # noqa: E402

from tuneqn.agent.state import AgentState  # noqa: E402
from tuneqn.controller.store import Store  # noqa: E402


def _report(cpu_front: list[list[str]], cpu_pick: str | None, met: bool = True) -> dict[str, Any]:
    return {
        "fronts": [
            {"model": "m", "mode": "per-tensor", "recipe": "per-tensor", "device": "cpu", "fronts": cpu_front},
            {
                "model": "m",
                "mode": "per-tensor",
                "recipe": "per-tensor",
                "device": "phone",
                "fronts": [["m:per-tensor:fq"]],
            },
        ],
        "cross_device": [{"model": "m", "mode": "per-tensor", "recipe": "per-tensor", "fronts": [["a", "b"]]}],
        "recipe_fronts": [{"model": "m", "device": "cpu", "fronts": cpu_front}],
        "answer": {
            "picks": [
                {"scope": "device", "model": "m", "device": "cpu", "candidate": cpu_pick, "met": met},
                {"scope": "cross-device", "model": "m", "candidate": "a", "met": True},
            ]
        },
    }


def test_equal_means_the_same_front_members_per_level_and_the_same_picks() -> None:
    ref = chaos.outcome(_report([["a", "b"], ["c"]], "a"))
    # members of a level in another order are the same front
    assert chaos.differences(ref, chaos.outcome(_report([["b", "a"], ["c"]], "a"))) == []
    # a member moved to another level, another pick, a pick that no longer meets the constraint
    moved = chaos.differences(ref, chaos.outcome(_report([["a"], ["b", "c"]], "a")))
    assert moved == [
        "fronts m/per-tensor@cpu: [['a'], ['b', 'c']] (reference [['a', 'b'], ['c']])",
        "recipe fronts m@cpu: [['a'], ['b', 'c']] (reference [['a', 'b'], ['c']])",
    ]
    assert chaos.differences(ref, chaos.outcome(_report([["a", "b"], ["c"]], "c"))) == [
        "answer m@cpu: ('c', True) (reference ('a', True))"
    ]
    assert chaos.differences(ref, chaos.outcome(_report([["a", "b"], ["c"]], "a", met=False))) == [
        "answer m@cpu: ('a', False) (reference ('a', True))"
    ]
    # a run without a report (it hung or failed before writing one) differs everywhere
    missing = chaos.differences(ref, chaos.outcome({}))
    assert len(missing) == 6 and all(line.endswith(": missing") for line in missing)


def test_a_tie_on_size_and_loss_is_named() -> None:
    report = _report([["a"]], "a")
    report["answer"]["picks"][0].update(size_bytes=100, agreement=0.9)
    report["candidates"] = [
        {"id": cid, "model": "m", "size_bytes": 100, "results": [{"device": "cpu", "status": "done", "agreement": 0.9}]}
        for cid in ("a", "b")
    ]
    assert chaos.ties_on_size_and_loss(report) == ["m@cpu"]
    report["candidates"][1]["size_bytes"] = 101
    assert chaos.ties_on_size_and_loss(report) == []


def _result(store: Store, job_id: str, candidate: str, level: str = "full") -> None:
    store.add_job(job_id, candidate, "cpu", level=level)
    assert store.put_result(
        {
            "job_id": job_id,
            "candidate_id": candidate,
            "device": "cpu",
            "agent": "x#cpu",
            "level": level,
            "split": "eval",
            "finished_at": time.time(),
        }
    )


def test_lost_duplicated_and_unfinished_jobs_are_read_from_real_stores(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "out")
    _result(store, "j1", "m:r:fq")
    _result(store, "j2", "m:r:fq", level="screen")  # another level of the same candidate: not a duplicate
    _result(store, "j3", "m:r:xabc")
    _result(store, "j4", "m:r:xabc")  # the same candidate, class and level stored under a second job id
    store.add_job("j5", "m:r:xdef", "cpu")
    store.update_job("j5", state="submitted", agent="127.0.0.1:1#cpu-a", lease_until=time.time() - 600)
    (tmp_path / "agent-a").mkdir()
    agent = AgentState(tmp_path / "agent-a")
    agent.insert_job("j5", b"", "cpu-a", state="SUCCEEDED")
    for job in ("j3", "j3", "j1"):
        agent.start_execution(job)
    agent.close()
    store.close()

    db = tmp_path / "out" / "tuneqn.db"
    assert chaos.result_count(db) == 4
    assert chaos.done_jobs(db) == {"j1", "j2", "j3", "j4"}
    assert chaos.duplicates(db) == [("m:r:xabc", "cpu", "full", "eval", 2)]
    assert chaos.executions([tmp_path / "agent-a" / "agent.db", tmp_path / "absent.db"]) == {"j3": 2, "j1": 1}
    snapshot = chaos.store_snapshot(db, {"cpu-a": tmp_path / "agent-a" / "agent.db"})
    assert snapshot[0] == "jobs by state: {'done': 4, 'submitted': 1}; results: 4"
    (line,) = snapshot[1:]
    assert line.startswith("  submitted full m:r:xdef on cpu: holder 127.0.0.1:1#cpu-a, attempts 0, lease -6")
    assert line.endswith("agents: {'cpu-a': 'SUCCEEDED'}")
    assert chaos.result_count(tmp_path / "nothing.db") == 0


@pytest.mark.slow
def test_a_short_run_with_faults_is_measured_and_compared(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The bench's pieces on the real lab: a reference, one run with two faults, the figures and chaos.json.

    Whether the run loses nothing is what the bench measures (not asserted here: the code under test
    decides); a non-zero exit must come with its reason printed.
    """
    pytest.importorskip("tvm", reason="Apache TVM (the tuneqn[tvm] extra) is not installed")
    work = tmp_path / "chaos"
    # ORT jobs of 10 ms per sample (the bench's 40 ms makes a job last a second, for faults to hit mid-job over 12
    # runs): the faulted run is ~4 s shorter and still ends seconds after its second fault (seed 3: at ~4 s, a
    # controller SIGKILL whose rerun prepares and evaluates again); what is asserted does not depend on the length
    code = chaos.main(
        ["--runs", "1", "--faults", "2", "--fault-every", "2", "--seed", "3", "--sim-ms", "10", "--workdir", str(work)]
    )
    out = capsys.readouterr().out
    assert re.search(r"^reference: [\d.]+ s, exit 0, controller started 1x, [1-9]\d* results$", out, re.M), out
    assert "run 1: " in out and "total: 1 runs, 2 faults" in out, out
    (run,) = json.loads((work / "chaos.json").read_text())
    assert sum(run["faults"].values()) == 2 and len(run["fault_log"]) == 2
    if code == 0:
        assert "fronts and answer equal" in out and not run["lost"] and not run["hang"], out
    else:
        assert code == 1 and ("lost: " in out or "HANG" in out or "differs: " in out or run["exit"] != 0), out
