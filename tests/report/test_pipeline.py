"""A tune run pipelines its models: the jobs of a model go out while the next one is prepared and analysed,
and a finished model's plots are drawn once (the report redraws only what changed)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from helpers import write_study
from report_study import make_study

from tuneqn.controller.config import load_config
from tuneqn.controller.farm.jobs import Endpoint, FarmSettings
from tuneqn.controller.farm.local import LocalAgent
from tuneqn.controller.orchestrator import tune
from tuneqn.controller.report import write
from tuneqn.controller.report.finalize import finalize_report
from tuneqn.controller.report.plots import render_plot
from tuneqn.controller.report.write import PLOT_KEYS, plot_input, render_plots, report_dict, validate_report
from tuneqn.controller.study import Study

FAST = {
    "latency_repeats": 2,
    "latency_warmup": 0,
    "heartbeat_s": 0.5,
    "silent_after_s": 3.0,
    "unreachable_grace_s": 1.0,
    "lease_timeout_s": 10.0,
    "device_wait_s": 30.0,
}


@pytest.mark.heavy
def test_a_models_jobs_are_registered_before_the_next_model_is_analysed(tmp_path: Path, assets: Path) -> None:
    """Two models, one recipe: the first model's FP32 job is in the store (registered for the agents) before
    the second model's layers are ranked; before, every model was prepared and analysed before any job."""
    with LocalAgent(
        tmp_path / "agent", device_name="a0", extra_args=["--device-class", "lab", "--simulated-latency-ms", "5"]
    ) as agent:
        study_toml = write_study(
            tmp_path,
            model=assets / "cnn.onnx",
            images=assets / "images",
            evaluation=FAST,
            models=[
                {"name": "first", "path": str(assets / "cnn.onnx")},
                {"name": "second", "path": str(assets / "wide.onnx")},
            ],
            search={"strategy": "sweep", "ranking": "paper", "step": 2},
        )
        cfg = load_config(study_toml)
        study = Study(cfg)
        try:
            outcome = tune(
                study, [Endpoint(address=agent.address, device_class="lab")], FarmSettings.from_config(cfg.evaluation)
            )
        finally:
            study.close()
    assert outcome.errors == [] and outcome.failed == 0 and outcome.done == outcome.total > 4
    con = sqlite3.connect(tmp_path / "out" / "tuneqn.db")
    analysed = dict(con.execute("select model, created_at from analyses").fetchall())
    first_jobs = con.execute(
        "select min(j.created_at), count(*) from jobs j join candidates c on c.id = j.candidate_id "
        "where c.model = 'first'"
    ).fetchone()
    assert set(analysed) == {"first", "second"}
    assert first_jobs[1] > 1
    assert first_jobs[0] < analysed["second"], "the first model's jobs waited for the second model's analysis"
    # every model and its layers are in the outputs, as before
    layers = json.loads((tmp_path / "out" / "layers.json").read_text())
    assert {r["model"] for r in layers} == {"first", "second"}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {m["name"] for m in report["models"]} == {"first", "second"}


def _make_study() -> dict[str, Any]:
    report = report_dict(validate_report(finalize_report(make_study())))
    # a second model: a copy of the first one's entries under another name
    for key in ("candidates", "fronts", "summary"):
        report[key] += [{**e, "model": "othernet"} for e in report[key] if e.get("model") == "toynet"]
    report["models"] += [{**m, "name": "othernet"} for m in report["models"] if m["name"] == "toynet"]
    return report


@pytest.mark.heavy
def test_a_plot_drawn_from_its_models_part_is_the_same_and_is_not_drawn_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plot drawn from :func:`plot_input` (what the cache keys) is byte for byte the one drawn from the whole
    report; a second :func:`render_plots` draws nothing; a changed model's plots alone are drawn again; a pool
    of processes draws the same bytes; a cancelled call leaves the rest to the next one."""
    report = _make_study()
    entry = report["fronts"][0]
    model, mode, device = entry["model"], entry["mode"], entry["device"]
    for kind in ("objectives", "tradeoff"):
        whole = render_plot(kind, report, model, mode, device, tmp_path / f"whole-{kind}.png").read_bytes()
        part = render_plot(kind, plot_input(report, model), model, mode, device, tmp_path / f"part-{kind}.png")
        assert part.read_bytes() == whole

    out = tmp_path / "report"
    images = render_plots(report, out)
    assert images and (out / "plots" / PLOT_KEYS).is_file()
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in images.values()}
    assert render_plots(report, out) == images
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in images.values()} == stamps

    assert {json.loads(k)[1] for k in images} == {"toynet", "othernet"}
    changed = "othernet"
    for c in report["candidates"]:
        if c["model"] == changed:
            c["label"] = f"{c['label']} (changed)"
    render_plots(report, out)
    redrawn = {json.loads(k)[1] for k, p in images.items() if (p.stat().st_ino, p.stat().st_mtime_ns) != stamps[p]}
    assert redrawn == {changed}

    monkeypatch.setattr(write, "POOL_MIN_PLOTS", 2)  # the test's few plots are enough to start the pool
    pooled = render_plots(report, tmp_path / "pooled", workers=2)
    assert list(pooled) == list(images)
    assert [p.read_bytes() for p in pooled.values()] == [p.read_bytes() for p in images.values()]

    # cancelled after one plot (the run ends): the next call draws the rest
    answers = iter([False])
    cut = render_plots(report, tmp_path / "cut", cancel=lambda: next(answers, True))
    assert len(cut) == 1
    rest = render_plots(report, tmp_path / "cut")
    assert [p.read_bytes() for p in rest.values()] == [p.read_bytes() for p in images.values()]
