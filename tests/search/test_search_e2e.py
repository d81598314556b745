"""Searches end to end: real agents on loopback, real ONNX Runtime, real SQLite checkpoints."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import exported_sha256, write_study
from onnx_models import cnn

from tuneqn.controller.cli import main
from tuneqn.controller.config import load_config
from tuneqn.controller.farm.jobs import Endpoint, FarmSettings
from tuneqn.controller.farm.local import LocalAgent
from tuneqn.controller.orchestrator import tune
from tuneqn.controller.study import Study

FAST = {
    "latency_repeats": 2,
    "latency_warmup": 1,
    "heartbeat_s": 0.5,
    "silent_after_s": 5.0,
    "unreachable_grace_s": 1.0,
    "lease_timeout_s": 10.0,
    "device_wait_s": 30.0,
}
SEARCH = {
    "strategy": "greedy",
    "ranking": "measured",
    "regain_every": 2,
    "screen_samples": 8,
    "compare": [
        {"strategy": "budget", "ranking": "measured", "budget": 3},
        {"strategy": "target", "ranking": "measured", "max_loss": 0.0},
        {"strategy": "sweep", "ranking": "paper"},
    ],
}
RECIPES = [{"name": "per-tensor", "mode": "static"}, {"name": "per-channel", "mode": "static", "per_channel": True}]


def _study(tmp: Path, assets: Path) -> Path:
    return write_study(
        tmp,
        model=assets / "wide.onnx",
        images=assets / "images",
        evaluation=FAST,
        search=SEARCH,
        quantization={"recipes": RECIPES},
    )


def _proposals(out: Path) -> set[tuple[str, str, str]]:
    con = sqlite3.connect(out / "tuneqn.db")
    return set(con.execute("select search, candidate_id, level from proposals").fetchall())


def _full_results(out: Path) -> dict[tuple[str, str], float]:
    con = sqlite3.connect(out / "tuneqn.db")
    rows = con.execute("select candidate_id, device, agreement from results where level = 'full'").fetchall()
    return {(c, d): a for c, d, a in rows}


def _run(study_toml: Path, endpoints: list[Endpoint]) -> Any:
    cfg = load_config(study_toml)
    study = Study(cfg)
    try:
        return tune(study, endpoints, FarmSettings.from_config(cfg.evaluation))
    finally:
        study.close()


@pytest.mark.heavy
def test_searches_resume_mid_search_to_the_same_outcome(tmp_path: Path, assets: Path) -> None:
    """A study SIGKILLed mid-search and resumed asks for exactly what an uninterrupted one asks for."""
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref_dir.mkdir()
    cut_dir.mkdir()
    with LocalAgent(tmp_path / "agent", device_name="cpu0", extra_args=["--device-class", "lab"]) as agent:
        reference = _run(_study(ref_dir, assets), [Endpoint(address=agent.address)])
        assert reference.failed == 0 and reference.done == reference.total
        cut_toml = _study(cut_dir, assets)
        db = cut_dir / "out" / "tuneqn.db"
        proc = subprocess.Popen(
            [sys.executable, "-m", "tuneqn.controller", "tune", str(cut_toml), "--agent", agent.address],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        done = 0
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                done = sqlite3.connect(db).execute("select count(*) from results").fetchone()[0]
            except sqlite3.OperationalError:
                done = 0
            if done >= 6:
                break
            time.sleep(0.05)  # polling the checkpoint for a condition
        assert proc.poll() is None, "the study finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert len(_full_results(cut_dir / "out")) < len(_full_results(ref_dir / "out"))
        resumed = _run(cut_toml, [Endpoint(address=agent.address)])
        assert resumed.failed == 0
    assert _proposals(cut_dir / "out") == _proposals(ref_dir / "out")
    assert _full_results(cut_dir / "out") == _full_results(ref_dir / "out")
    searches = {s for s, _, _ in _proposals(ref_dir / "out")}
    assert searches == {"greedy/measured", "budget3/measured", "target0%/measured", "sweep/paper"}


@pytest.mark.heavy
def test_every_evaluated_set_exports_bit_identically(tmp_path: Path, assets: Path) -> None:
    """Any candidate a search evaluated is reproduced by `tuneqn export` from its id or its label."""
    study_toml = write_study(
        tmp_path,
        model=assets / "wide.onnx",
        images=assets / "images",
        evaluation=FAST,
        search={"strategy": "sweep", "ranking": "measured", "screen_samples": 8},
    )
    assert main(["tune", str(study_toml)]) == 0
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    evaluated = [c for c in report["candidates"] if any(r["status"] == "done" for r in c["results"])]
    assert len(evaluated) >= 2
    con = sqlite3.connect(out / "tuneqn.db")
    labels = dict(con.execute("select candidate_id, label from proposals where level = 'full'").fetchall())
    for i, c in enumerate(evaluated):
        which = c["id"] if i % 2 == 0 else labels[c["id"]]
        dest = tmp_path / f"export-{i}.onnx"
        assert main(["export", str(out), "--candidate", which, "-o", str(dest)]) == 0
        assert exported_sha256(dest) == c["sha256"], which


@pytest.mark.heavy
def test_the_default_search_adds_int4_twins_and_exports_them(tmp_path: Path, assets: Path) -> None:
    """The default search (budget, measured, levels fp32/int8/int4) on real agents: its front keeps the in-or-out
    candidates and adds int4 twins, evaluated in full; the report and the export carry each twin's levels."""
    model = cnn(tmp_path / "cnn32.onnx", channels=32)  # layers whose int4 saves more than its unpacking costs
    study_toml = write_study(
        tmp_path,
        model=model,
        images=assets / "images",
        evaluation=FAST,
        search={"strategy": "budget", "ranking": "measured", "screen_samples": 8},
    )
    assert main(["tune", str(study_toml)]) == 0
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    full = [c for c in report["candidates"] if any(r["status"] == "done" for r in c["results"])]
    twins = [c for c in full if c["levels"]]
    assert twins and all(set(c["levels"].values()) == {"int4"} for c in twins), [c["label"] for c in full]
    assert all(c["label"].endswith("int4") and not set(c["levels"]) & set(c["excluded"]) for c in twins)
    plain = {(tuple(c["excluded"]), c["recipe"]): c for c in full if not c["levels"]}
    for c in twins:  # each twin is a front candidate with int4 weights: smaller than it
        assert c["size_bytes"] < plain[(tuple(c["excluded"]), c["recipe"])]["size_bytes"]
    dest = tmp_path / "twin.onnx"
    assert main(["export", str(out), "--candidate", twins[0]["id"], "-o", str(dest)]) == 0
    assert exported_sha256(dest) == twins[0]["sha256"]
    assert json.loads(dest.with_name("twin.onnx.json").read_text())["levels"] == twins[0]["levels"]
    assert "levels" in report["answer"]["picks"][0]


def test_unknown_recipe_and_missing_target_are_one_line_errors(
    tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study_toml = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images")
    assert main(["tune", str(study_toml), "--recipe", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tuneqn: error: --recipe: unknown recipe 'nope'") and "\n" not in err, err
    assert main(["tune", str(study_toml), "--strategy", "target"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--strategy" in err and "max_loss" in err and "\n" not in err, err
    assert not (tmp_path / "out" / "tuneqn.db").exists()


@pytest.mark.heavy
def test_a_compared_search_of_one_recipe_searches_only_that_recipe(tmp_path: Path, assets: Path) -> None:
    """``recipes`` on a search: the paper's sweep beside the default search on the paper's recipe only (the
    demo's setting). Its proposals are of that recipe alone, every k of it; the main search covers both."""
    compare = [{"strategy": "sweep", "ranking": "paper", "recipes": ["per-tensor"]}]
    study_toml = write_study(
        tmp_path,
        model=assets / "cnn.onnx",
        images=assets / "images",
        evaluation=FAST,
        search={"strategy": "budget", "ranking": "measured", "screen_samples": 8, "compare": compare},
        quantization={"recipes": RECIPES},
    )
    assert main(["tune", str(study_toml)]) == 0
    con = sqlite3.connect(tmp_path / "out" / "tuneqn.db")
    modes: dict[str, set[str]] = {}
    for search, mode in con.execute("select distinct search, mode from proposals"):
        modes.setdefault(search, set()).add(mode)
    assert modes == {"budget/measured": {"per-tensor", "per-channel"}, "sweep/paper[per-tensor]": {"per-tensor"}}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    layers = len(report["rankings"][0]["layers"])  # the same layers in both recipes of this model
    swept = con.execute("select count(*) from proposals where search = 'sweep/paper[per-tensor]' and level = 'full'")
    assert swept.fetchone()[0] == layers + 1  # k = 0 … every layer
    assert {s["name"] for s in report["searches"]} == {"budget/measured", "sweep/paper[per-tensor]"}


def test_a_search_naming_an_unknown_recipe_is_a_one_line_error(
    tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    compare = [{"strategy": "sweep", "ranking": "paper", "recipes": ["per-tensr"]}]
    study_toml = write_study(
        tmp_path,
        model=assets / "cnn.onnx",
        images=assets / "images",
        search={"compare": compare},
        quantization={"recipes": RECIPES},
    )
    assert main(["tune", str(study_toml)]) == 2
    err = capsys.readouterr().err.strip()
    assert "per-tensr" in err and "sweep/paper[per-tensr]" in err and "\n" not in err, err
    assert not (tmp_path / "out" / "tuneqn.db").exists()
