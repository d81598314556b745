"""The report from a real store: entry points, report.json keys, skipped inputs, unreachable jobs, latency p10/p90;
and the package's shape (no SQL, no import cycle, plots and HTML only when writing)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
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
    add_result,
    cand_id,
    open_store,
    predictions,
)

from tuneqn.controller import accuracy
from tuneqn.controller.common.errors import UserError
from tuneqn.controller.config import parse_config
from tuneqn.controller.objectives import OBJECTIVES
from tuneqn.controller.report import is_partial, write_full_report, write_json
from tuneqn.controller.store import Store

REPORT_DIR = Path(__file__).parents[2] / "controller" / "report"
N = 24
SKIPPED = [
    {"file": "images/broken <1>.png", "reason": "cannot identify image file"},
    {"file": "images/empty.jpg", "reason": "truncated"},
]
UNREACHABLE = "no live agent of device class phone for 30 s"


def _study(tmp: Path) -> Store:
    """cpu: FP32 + k0..k2 done (k1, k2 equal but for a latency inside the noise); phone: unreachable jobs."""
    rng = np.random.default_rng(1)
    store = open_store(tmp, objectives=[{"name": "accuracy_loss"}, {"name": "latency"}])
    add_model(store)
    add_device(store, "cpu")
    add_device(store, "phone")
    labels = [int(x) for x in rng.integers(0, 10, N)]
    add_eval_split(store, labels, skipped=SKIPPED)
    store.put_dataset(f"{MODEL}/calibration", Path("/data/cal.npy"), "c" * 64, ["a.png"], None, SKIPPED[:1])
    for k in range(3):
        add_candidate(store, k=k, size=1_000_000 * (k + 1))
    base = predictions(N, rng)
    k0 = base.copy()
    k0[: N // 2, 0] = (k0[: N // 2, 0] + 1) % 10  # half the samples change class
    runs = [
        (f"{MODEL}:fp32", base, (9.0, 8.8, 9.4)),
        (cand_id(0), k0, (5.0, 4.9, 5.2)),
        (cand_id(1), base, (6.0, 5.8, 6.4)),
        (cand_id(2), base, (6.3, 6.1, 6.6)),
    ]
    for cid, topk, lat in runs:
        accuracy.on_result(store, add_result(store, cid, "cpu", topk, latency=lat))
    for cid in [f"{MODEL}:fp32"] + [cand_id(k) for k in range(3)]:
        job = f"tq-{cid}-phone"
        store.add_job(job, cid, "phone")
        store.update_job(job, state="unreachable", error=UNREACHABLE)
    return store


def _result(report: dict[str, Any], cid: str, device: str) -> dict[str, Any]:
    cand = next(c for c in report["candidates"] if c["id"] == cid)
    return next(r for r in cand["results"] if r["device"] == device)


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    return _study(tmp_path)


def test_report_json_from_the_store(store: Store, tmp_path: Path) -> None:
    assert is_partial(store) is False  # done and unreachable jobs are final
    path = write_json(store, tmp_path / "out")
    assert path == tmp_path / "out" / "report.json"
    report = json.loads(path.read_text(encoding="utf-8"))
    # the stable keys of docs/reference.md (Report, Outputs)
    for key in (
        "candidates",
        "summary",
        "fronts",
        "cross_device",
        "infeasible",
        "baselines",
        "layers",
        "recipe_fronts",
        "searches",
        "ablation",
        "rankings",
    ):
        assert key in report, key
    for c in report["candidates"]:
        assert {
            "model",
            "mode",
            "recipe",
            "k",
            "kind",
            "excluded",
            "size_bytes",
            "sha256",
            "results",
            "screening",
            "proposed_by",
            "level",
        } <= set(c)
        assert c["recipe"] == c["mode"] == "static" and c["kind"] == "set" and c["level"] == "full"
        for r in c["results"]:
            assert {
                "device",
                "agreement",
                "accuracy",
                "latency_ms",
                "front",
                "status",
                "latency_p10_ms",
                "latency_p90_ms",
            } <= set(r)
    assert report["skipped_inputs"] == SKIPPED  # each (file, reason) once, whatever the splits
    assert [(o["name"], o["unit"]) for o in report["objectives"]] == [("accuracy_loss", "fraction"), ("latency", "ms")]

    k1 = _result(report, cand_id(1), "cpu")
    assert (k1["latency_ms"], k1["latency_p10_ms"], k1["latency_p90_ms"]) == (6.0, 5.8, 6.4)
    assert k1["agreement"] == 1.0 and k1["status"] == "done"
    # k2's 6.3 ms (with its p10–p90) overlaps k1's [5.8, 6.4]: a tie, both on front 1 with k0 (faster, worse loss)
    assert report["fronts"][0]["device"] == "cpu"
    assert report["fronts"][0]["fronts"] == [[cand_id(0), cand_id(1), cand_id(2)]]
    (cpu_base,) = [b for b in report["baselines"] if b["device"] == "cpu"]
    assert (cpu_base["latency_ms"], cpu_base["latency_p10_ms"], cpu_base["latency_p90_ms"]) == (9.0, 8.8, 9.4)

    # unreachable: a status with the job's error as reason, never in a front, listed like failed ones
    (phone_base,) = [b for b in report["baselines"] if b["device"] == "phone"]
    assert (phone_base["status"], phone_base["error"]) == ("unreachable", UNREACHABLE)
    for k in range(3):
        r = _result(report, cand_id(k), "phone")
        assert (r["status"], r["reason"], r["front"], r["feasible"]) == ("unreachable", UNREACHABLE, None, False)
        assert {"candidate": cand_id(k), "device": "phone", "reason": UNREACHABLE} in report["infeasible"]
    assert report["fronts"][1] == {
        "model": MODEL,
        "mode": "static",
        "recipe": "static",
        "device": "phone",
        "fronts": [],
    }


def test_full_report_shows_skipped_inputs_unreachable_and_dispersion(store: Store, tmp_path: Path) -> None:
    paths = write_full_report(store, tmp_path / "out")
    assert {"json", "html"} <= set(paths)
    text = paths["html"].read_text(encoding="utf-8")
    assert "Skipped inputs (2)" in text and "images/broken &lt;1&gt;.png" in text and "truncated" in text
    assert text.count(UNREACHABLE) >= 4  # baseline title + infeasible rows
    assert re.search(r'<span class="st-unreachable">unreachable</span>', text)
    assert "5.80–6.40" in text and "8.80–9.40" in text  # k1 and FP32 p10–p90 on cpu
    assert "Latency within the measured noise is a tie" in text
    assert json.loads(paths["json"].read_text(encoding="utf-8"))["partial"] is False


def test_partial_while_jobs_are_open(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    assert is_partial(store)  # no job yet
    add_model(store)
    store.add_job("tq-1", f"{MODEL}:fp32", "cpu")
    assert is_partial(store)
    store.update_job("tq-1", state="submitted")
    report = json.loads(write_json(store, tmp_path / "out").read_text(encoding="utf-8"))
    assert report["partial"] is True and report["skipped_inputs"] == []
    assert report["baselines"][0]["status"] == "running"
    store.update_job("tq-1", state="failed", error="boom")
    assert not is_partial(store)


def test_a_candidate_waits_for_its_baseline(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    add_model(store)
    add_device(store, "cpu")
    add_candidate(store, k=0)
    store.add_job("tq-base", f"{MODEL}:fp32", "cpu")
    accuracy.on_result(store, add_result(store, cand_id(0), "cpu", predictions(4, np.random.default_rng(0))))
    report = json.loads(write_json(store, tmp_path / "out").read_text(encoding="utf-8"))
    r = _result(report, cand_id(0), "cpu")
    assert (r["status"], r["error"]) == ("pending", "FP32 baseline on this device not measured yet")
    store.update_job("tq-base", state="failed", error="out of memory")
    report = json.loads(write_json(store, tmp_path / "out").read_text(encoding="utf-8"))
    r = _result(report, cand_id(0), "cpu")
    assert r["status"] == "done" and r["feasible"] is False
    assert r["reason"].endswith("FP32 baseline on this device failed: out of memory")


def test_objectives_come_from_one_table(tmp_path: Path) -> None:
    base = {"models": [{"path": "m.onnx"}], "dataset": {"images": "i"}}
    for name, o in OBJECTIVES.items():
        cfg = parse_config({**base, "objectives": [{"name": name}]}, tmp_path)
        assert cfg.objectives[0].resolved_direction == o.direction
    with pytest.raises(UserError, match=r"objectives\[0\]\.name: unknown objective 'speed'; known: accuracy_loss"):
        parse_config({**base, "objectives": [{"name": "speed"}]}, tmp_path)
    # no second list of objective names in the controller
    root = Path(__file__).parents[2] / "controller"
    for path in root.rglob("*.py"):
        if path.name == "objectives.py":
            continue
        text = path.read_text(encoding="utf-8")
        assert not re.search(r'"accuracy_top5"\s*[,:]\s*"?(min|max)', text), path
        assert 'Literal["accuracy_loss"' not in text, path


@pytest.mark.heavy
def test_report_package_has_no_sql_and_no_import_cycle() -> None:
    for path in [*REPORT_DIR.glob("*.py"), REPORT_DIR.parent / "accuracy.py"]:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\.db\b|\bselect\s+\*|\.execute\(|\.query\(", text), path
    modules = sorted(p.stem for p in REPORT_DIR.glob("*.py") if p.stem != "__init__")
    # Each module imports first in a fresh interpreter (a cycle shows up as an ImportError for one of them),
    # and the package itself pulls in neither matplotlib nor Jinja2 (only writing the full report does).
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    for k in [k for k in sys.modules if k.startswith('tuneqn')]: del sys.modules[k]\n"
        "    importlib.import_module('tuneqn.controller.report.' + m)\n"
        "for k in [k for k in sys.modules if k.startswith(('tuneqn', 'matplotlib', 'jinja2'))]: del sys.modules[k]\n"
        "import tuneqn.controller.report\n"
        "print(sorted(k for k in ('matplotlib', 'jinja2') if k in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
