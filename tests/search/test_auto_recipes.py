"""Recipes chosen automatically (``recipes = "auto"``, the default) and the recipe gate.

The quick form used to search only per-tensor (issue 16: a 3x bigger answer than per-channel
alone); without recipes every applicable preset's fully quantized model is now evaluated and the
gate (a pure function of stored results) decides which ones go on to the search.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
from helpers import write_study

from tuneqn.controller.cli import main, quick_config, study_config
from tuneqn.controller.config import AUTO_RECIPES, QuantizationSpec, load_config
from tuneqn.controller.quantize import auto
from tuneqn.controller.search import gate
from tuneqn.controller.search.gate import FqFailed, FqPoint, decide
from tuneqn.controller.store import Store
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


# --------------------------------------------------------------------------- the rule (pure)


def _p(size: int, wrong: set[int], n: int = 100) -> FqPoint:
    return FqPoint(size, n, frozenset(wrong))


def _status(points: dict[str, Any]) -> dict[str, str]:
    return {d.recipe: d.status for d in decide(points)}


def test_a_point_on_the_front_continues_and_a_clearly_dominated_one_stops() -> None:
    small_bad = _p(4_800_000, set(range(30)))  # smallest: on the front whatever its loss
    big_good = _p(5_100_000, {1, 2})  # most accurate: on the front
    dominated = _p(5_100_500, set(range(3, 13)))  # larger than big_good, wrong on 10 others, right on 2
    out = decide(
        {
            "per-tensor": {"cpu": small_bad},
            "per-channel": {"cpu": big_good},
            "per-channel-percentile": {"cpu": dominated},
        }
    )
    assert [d.status for d in out] == ["searched", "searched", "stopped"]
    assert "per-channel" in out[2].reason and "clearly fewer" in out[2].reason and "cpu" in out[2].reason


def test_a_point_behind_the_front_within_noise_continues() -> None:
    # 3 images more wrong and none fewer: b - c = 3 < 1.96 * sqrt(3): within the sample's noise
    assert _status({"a": {"cpu": _p(100, {1})}, "b": {"cpu": _p(100, {1, 2, 3, 4})}}) == {
        "a": "searched",
        "b": "searched",
    }
    # 4 more: 4 > 1.96 * 2 -> clearly worse at no smaller size
    assert _status({"a": {"cpu": _p(100, {1})}, "b": {"cpu": _p(100, {1, 2, 3, 4, 5})}}) == {
        "a": "searched",
        "b": "stopped",
    }
    # more wrong but on different images (b=5, c=3): not clearly worse
    assert _status({"a": {"cpu": _p(100, {1, 2, 3})}, "b": {"cpu": _p(100, {4, 5, 6, 7, 8})}})["b"] == "searched"
    # a smaller file stays whatever its loss
    assert _status({"a": {"cpu": _p(100, set())}, "b": {"cpu": _p(99, set(range(50)))}})["b"] == "searched"


def test_equal_points_do_not_stop_each_other() -> None:
    """The same fully quantized predictions do not mean the same front (EfficientNet-Lite0: per-tensor-percentile
    is wrong on per-tensor's images, 10 bytes larger, and its search finds 4.81 MB at 1 % where per-tensor's
    finds 5.93 MB)."""
    same = _p(100, {3, 7})
    assert _status({"a": {"cpu": same}, "b": {"cpu": _p(110, {3, 7})}, "c": {"cpu": same}}) == {
        "a": "searched",
        "b": "searched",
        "c": "searched",
    }
    # one image fewer wrong (a subset) at no larger size is within noise too
    assert _status({"a": {"cpu": _p(101, {3, 4})}, "b": {"cpu": _p(100, {3})}}) == {"a": "searched", "b": "searched"}


def test_a_recipe_on_the_front_of_one_device_continues() -> None:
    points = {
        "a": {"cpu": _p(100, set()), "gpu": _p(100, set(range(20)))},
        "b": {"cpu": _p(100, set(range(20))), "gpu": _p(100, set())},
    }
    assert _status(points) == {"a": "searched", "b": "searched"}


def test_a_failed_fully_quantized_model_is_decided_without_that_device() -> None:
    out = decide(
        {
            "a": {"cpu": _p(100, set()), "npu": FqFailed("failed: out of memory")},
            "b": {"cpu": _p(100, set(range(10))), "npu": _p(100, set())},
            "c": {"cpu": FqFailed("infeasible: no QLinearConv"), "npu": FqFailed("unreachable: gone")},
        }
    )
    by = {d.recipe: d for d in out}
    assert by["a"].status == "searched" and "npu" in by["a"].reason  # decided on cpu; npu named
    assert by["b"].status == "searched"  # alone on npu's front
    assert by["c"].status == "stopped" and "no result on any device" in by["c"].reason
    assert "out of memory" not in by["c"].reason and "no QLinearConv" in by["c"].reason


def test_nothing_is_decided_while_a_point_is_not_final() -> None:
    out = decide({"a": {"cpu": _p(100, set())}, "b": {"cpu": None}})
    assert {d.status for d in out} == {"pending"} and "cpu" in out[0].reason


# --------------------------------------------------------------------------- which recipes, which wins


def test_auto_is_the_default_and_explicit_recipes_win(tmp_path: Path, assets: Path) -> None:
    assert QuantizationSpec().auto and QuantizationSpec(recipes="auto", modes=["static"]).auto
    assert not QuantizationSpec(modes=["static"]).auto
    assert not QuantizationSpec(recipes=[{"name": "pc", "per_channel": True}]).auto
    assert QuantizationSpec().recipe_names()[: len(AUTO_RECIPES)] == list(AUTO_RECIPES)
    assert {"per-tensor", "per-channel"} <= set(AUTO_RECIPES)  # per-channel is always tried

    def args(**kw: Any) -> argparse.Namespace:
        base = {
            "study": None,
            "model": str(assets / "cnn.onnx"),
            "images": str(assets / "images"),
            "out": str(tmp_path / "o"),
            "mode": None,
            "format": None,
            "labels": None,
            "eval": None,
            "calibration": None,
            "analysis": None,
            "recipe": None,
            "ranking": None,
            "strategy": None,
            "budget": None,
            "max_loss": None,
            "no_compare": False,
        }
        return argparse.Namespace(**{**base, **kw})

    # The quick form: auto unless --mode or --recipe says otherwise (issue 16: it searched per-tensor only).
    assert quick_config(args()).quantization.auto
    assert study_config(args(mode=["static"])).quantization.recipe_names() == ["static"]
    assert study_config(args(recipe=["per-channel"])).quantization.recipe_names() == ["per-channel"]
    # A study file: auto without recipes/modes or with recipes = "auto"; --mode and --recipe win.
    toml = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images", quantization={"recipes": "auto"})

    def from_file(**kw: Any) -> QuantizationSpec:
        return study_config(args(study=str(toml), model=None, images=None, out=None, **kw)).quantization

    assert load_config(toml).quantization.auto and from_file().auto
    assert from_file(mode=["dynamic"]).recipe_names() == ["dynamic"]
    data = tomllib.loads(toml.read_text())
    del data["quantization"]
    toml.write_text(tomli_w.dumps(data))
    assert from_file().auto
    assert from_file(mode=["static"]).recipe_names() == ["static"]
    assert from_file(recipe=["per-tensor-entropy"]).recipe_names() == ["per-tensor-entropy"]


def test_dynamic_is_tried_only_on_matmul_heavy_models(tmp_path: Path, assets: Path) -> None:
    conv, conv_note = auto.auto_recipes(assets / "cnn.onnx", ["Conv", "ConvTranspose", "Gemm", "MatMul"])
    mm, mm_note = auto.auto_recipes(assets / "mlp.onnx", ["Conv", "ConvTranspose", "Gemm", "MatMul"])
    assert conv == list(AUTO_RECIPES) and "left out" in conv_note
    assert mm == [*AUTO_RECIPES, "dynamic"] and "100%" in mm_note
    # In a study: per model, kept in the store for the report.
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(24, 32)).astype(np.float32))
    toml = write_study(tmp_path, model=assets / "mlp.onnx", images=tmp_path, quantization={"recipes": "auto"})
    toml.write_text(toml.read_text().replace(f'images = "{tmp_path}"', f'tensors = "{tmp_path / "x.npy"}"'))
    with Study(load_config(toml)) as study:
        study.prepare()
        assert study.recipes("mlp") == [*AUTO_RECIPES, "dynamic"]
        assert gate.auto_models(study.store) == {"mlp": [*AUTO_RECIPES, "dynamic"]}


# --------------------------------------------------------------------------- end to end


def _selection(out: Path) -> list[dict[str, Any]]:
    return json.loads((out / "report.json").read_text())["recipe_selection"]


@pytest.mark.heavy
def test_auto_study_stops_dominated_recipes_and_resumes_to_the_same_decisions(tmp_path: Path, assets: Path) -> None:
    """One local agent, a MatMul model (so dynamic is tried) and a few loud samples that blow the static
    activation ranges: every auto recipe's fully quantized model is measured, the static ones are larger and
    clearly worse than dynamic, so only dynamic is searched; the report says why, with the numbers; a rerun
    takes the same decisions from the stored results and runs nothing."""
    x = np.random.default_rng(0).normal(size=(40, 32)).astype(np.float32)
    x[::8] *= 60
    np.save(tmp_path / "x.npy", x)
    toml = write_study(
        tmp_path,
        model=assets / "mlp.onnx",
        images=tmp_path,
        quantization={"recipes": "auto"},
        evaluation={**FAST, "chunk_size": 1},
    )
    data = tomllib.loads(toml.read_text())
    data["dataset"] = {"tensors": str(tmp_path / "x.npy"), "eval": 24, "calibration": 12, "analysis": 4}
    toml.write_text(tomli_w.dumps(data))
    out = tmp_path / "out"
    assert main(["tune", str(toml), "--no-lab"]) == 0
    sel = _selection(out)
    assert [s["model"] for s in sel] == ["mlp"] and "clearly fewer" in sel[0]["rule"]
    by = {r["recipe"]: r for r in sel[0]["recipes"]}
    assert list(by) == [*AUTO_RECIPES, "dynamic"]
    assert by["dynamic"]["status"] == "searched" and "front" in by["dynamic"]["reason"]
    dyn = by["dynamic"]["devices"][0]
    for name in AUTO_RECIPES:
        entry = by[name]
        (dev,) = entry["devices"]
        assert entry["status"] == "stopped" and entry["fq_candidate"] == f"mlp:{name}:fq"
        assert dev["device"] == "local" and dev["n"] == 24
        assert dev["size_bytes"] >= dyn["size_bytes"] and dev["accuracy_loss"] > dyn["accuracy_loss"] + 4 / 24
        assert entry["reason"].startswith("on local dynamic is") and "clearly fewer" in entry["reason"]
        assert f"{dev['accuracy_loss']:.1%}" in entry["reason"]
    report = json.loads((out / "report.json").read_text())
    cands = {c["id"]: c for c in report["candidates"]}
    # Stopped recipes keep their measured point: a candidate like any, on the cross-recipe fronts ...
    assert all(cands[f"mlp:{r}:fq"]["results"][0]["status"] == "done" for r in AUTO_RECIPES)
    (cross_recipe,) = report["recipe_fronts"]
    assert set(cross_recipe["recipes"]) == {*AUTO_RECIPES, "dynamic"}
    # ... and nothing else: no search asked for anything of theirs, no layer analysis was made.
    con = sqlite3.connect(out / "tuneqn.db")
    assert {r[0] for r in con.execute("select distinct mode from proposals")} == {"dynamic"}
    assert {r[0] for r in con.execute("select distinct mode from layers")} == {"dynamic"}
    assert {r["mode"] for r in json.loads((out / "layers.json").read_text())} == {"dynamic"}
    jobs = con.execute("select count(*) from jobs").fetchone()[0]
    # Byte-identical candidates (every searched layer in float under per-tensor and per-channel: the same file)
    # are measured once; the twin takes that result and is never sent to the agent.
    by_file: dict[str, list[tuple[str, dict[str, Any], bytes, int]]] = {}
    for sha, jid, info, topk, attempts in con.execute(
        "select c.sha256, r.job_id, r.info, r.topk, j.attempts from results r join candidates c "
        "on c.id = r.candidate_id join jobs j on j.id = r.job_id where r.level = 'full'"
    ):
        by_file.setdefault(sha, []).append((jid, json.loads(info), topk, attempts))
    twins = [rows for rows in by_file.values() if len(rows) > 1]
    assert len(twins) == 2  # the best cases of the min/max pair and of the percentile pair
    for rows in twins:
        (ran,) = [r for r in rows if "same_file_as" not in r[1]]
        assert ran[3] == 1
        assert all(r[1]["same_file_as"] == ran[0] and r[2] == ran[2] and r[3] == 0 for r in rows if r is not ran)
    con.close()
    # Resumed: the same decisions from the same stored results, no new job.
    assert main(["tune", str(toml), "--no-lab"]) == 0
    assert _selection(out) == sel
    con = sqlite3.connect(out / "tuneqn.db")
    assert con.execute("select count(*) from jobs").fetchone()[0] == jobs
    con.close()
    store = Store.open(out)  # the report's function over the store alone says the same
    try:
        assert gate.selection(store) == sel
    finally:
        store.close()


@pytest.mark.heavy
def test_explicit_recipes_have_no_selection(tmp_path: Path, assets: Path) -> None:
    out = tmp_path / "out"
    assert (
        main(
            [
                "tune",
                "--model",
                str(assets / "cnn.onnx"),
                "--images",
                str(assets / "images"),
                "--out",
                str(out),
                "--eval",
                "8",
                "--calibration",
                "8",
                "--analysis",
                "4",
                "--no-lab",
                "--recipe",
                "per-channel",
                "--strategy",
                "sweep",
                "--ranking",
                "paper",
                "--no-compare",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["recipe_selection"] == []
    assert {c["recipe"] for c in report["candidates"]} == {"per-channel"}


def test_points_come_from_the_store_and_failures_are_final(tmp_path: Path) -> None:
    """The store adapter: a result is a point (its disagreeing images), a job failed for good is final, a
    missing or running one is pending; an FP32 failure on a device fails every recipe there."""
    from report_store import MODEL, add_candidate, add_device, add_model, add_result, open_store, predictions

    from tuneqn.controller import accuracy

    store = open_store(tmp_path)
    try:
        add_model(store)
        for dev in ("cpu", "npu"):
            add_device(store, dev)
        fq = {r: add_candidate(store, mode=r, k=0, size=1000 + i) for i, r in enumerate(("a", "b"))}
        assert fq["a"] == f"{MODEL}:a:fq"
        assert gate.fq_points(store, MODEL, ["a", "b"], ["cpu"]) == {"a": {"cpu": None}, "b": {"cpu": None}}
        ref = predictions(10, np.random.default_rng(0))
        accuracy.on_result(store, add_result(store, accuracy.baseline_id(MODEL), "cpu", ref))
        other = ref.copy()
        other[[2, 5], 0] = (other[[2, 5], 0] + 1) % 10
        other[[2, 5], 1:] = ref[[2, 5], :-1]
        accuracy.on_result(store, add_result(store, fq["a"], "cpu", other))
        store.add_job("j-b", fq["b"], "cpu")
        store.update_job("j-b", state="failed", error="boom")
        store.add_job("fp32-npu", accuracy.baseline_id(MODEL), "npu")
        store.update_job("fp32-npu", state="unreachable", error="gone")
        accuracy.on_result(store, add_result(store, fq["a"], "npu", ref))
        pts = gate.fq_points(store, MODEL, ["a", "b"], ["cpu", "npu"])
        # two images wrong, each with 4 of FP32's top 5: overlap (8 + 2 × 0.8) / 10
        assert pts["a"]["cpu"] == FqPoint(1000, 10, frozenset({2, 5}), fq["a"], pytest.approx(0.96))
        assert isinstance(pts["b"]["cpu"], FqFailed) and "boom" in pts["b"]["cpu"].reason
        assert isinstance(pts["a"]["npu"], FqFailed) and "FP32 unreachable" in pts["a"]["npu"].reason
        assert pts["b"]["npu"] is None  # no job yet
        store.add_job("j-b-npu", fq["b"], "npu")
        store.update_job("j-b-npu", state="failed", error="also")
        status = {d.recipe: d.status for d in gate.decisions(store, MODEL, ["a", "b"], ["cpu", "npu"])}
        assert status == {"a": "searched", "b": "stopped"}
    finally:
        store.close()


class _GateSettlingView:
    """A search view whose recipe gate settles while the search reads its pairs (a result arriving
    between the two reads, as in a loaded CI run): before, no pair; after, one that must be searched."""

    def __init__(self) -> None:
        self.settled = False

    def pairs(self) -> list[tuple[str, str]]:
        out = [("mlp", "dynamic")] if self.settled else []
        self.settled = True  # the last fully quantized result lands right after this read
        return out

    def pairs_settled(self) -> bool:
        return self.settled


def test_a_search_is_not_done_when_the_gate_settles_while_it_reads_its_pairs() -> None:
    from tuneqn.controller.config import SearchRun
    from tuneqn.controller.search import PairStrategy, PerPair

    view = _GateSettlingView()
    search = PerPair(view, SearchRun(), PairStrategy)  # type: ignore[arg-type]
    view.settled = False  # construction read the pairs; the gate is still pending
    assert not search.done()  # the pair the gate allows has not started: the search goes on
