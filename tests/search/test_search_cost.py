"""The work before the answer with the default search (``budget`` on the ``measured`` ranking)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from helpers import write_study

from tuneqn.controller.cli import main
from tuneqn.controller.config import load_config
from tuneqn.controller.search import gate
from tuneqn.controller.search.gate import FqPoint
from tuneqn.controller.study import Study, candidate_id

FAST = {
    "latency_repeats": 2,
    "latency_warmup": 1,
    "heartbeat_s": 0.5,
    "silent_after_s": 5.0,
    "unreachable_grace_s": 1.0,
    "lease_timeout_s": 10.0,
    "device_wait_s": 30.0,
}
MEASURED = {"strategy": "budget", "ranking": "measured", "screen_samples": 8}


def _rows(out: Path, sql: str) -> list[tuple[object, ...]]:
    con = sqlite3.connect(out / "tuneqn.db")
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


@pytest.mark.heavy
def test_a_measured_search_needs_no_layer_analysis(tmp_path: Path, assets: Path) -> None:
    """Every search measures its own ranking: the layers are read from the fully quantized model and no error
    analysis runs (no row in ``analyses``, no layers.json); the screens cover exactly the layers the analysis
    would have ranked; a rerun asks for nothing new and still analyzes nothing."""
    toml = write_study(tmp_path, model=assets / "wide.onnx", images=assets / "images", evaluation=FAST, search=MEASURED)
    out = tmp_path / "out"
    assert main(["tune", str(toml), "--no-lab"]) == 0
    assert _rows(out, "select model, mode from analyses") == []
    assert not (out / "layers.json").exists()
    screened = {r[0] for r in _rows(out, "select label from proposals where level = 'screen'")}
    study = Study(load_config(toml))
    try:
        study.prepare()
        analyzed = [r["name"] for r in sorted(study.analyze("wide", "static"), key=lambda r: r["idx"])]
    finally:
        study.close()
    assert len(analyzed) > 2
    ranking = {label for label in screened if label.startswith("ranking")}
    assert ranking == {"ranking base", *(f"ranking +{name}" for name in analyzed)}
    assert all("int4" in label for label in screened - ranking)  # the int4 twins' screens (levels, the default)
    proposals = _rows(out, "select search, candidate_id, level from proposals order by seq")
    jobs = _rows(out, "select count(*) from jobs")
    # the check above analyzed (its row is now stored): drop it, the rerun must again do without
    con = sqlite3.connect(out / "tuneqn.db")
    con.execute("delete from analyses")
    con.execute("delete from layers")
    con.commit()
    con.close()
    assert main(["tune", str(toml), "--no-lab"]) == 0
    assert _rows(out, "select search, candidate_id, level from proposals order by seq") == proposals
    assert _rows(out, "select count(*) from jobs") == jobs
    assert _rows(out, "select model, mode from analyses") == []


@pytest.mark.heavy
def test_an_error_ranked_search_still_analyzes(tmp_path: Path, assets: Path) -> None:
    """The paper's method (``sweep`` on the ``paper`` ranking) ranks layers by the analysis, as before."""
    toml = write_study(
        tmp_path,
        model=assets / "cnn.onnx",
        images=assets / "images",
        evaluation=FAST,
        search={"strategy": "sweep", "ranking": "paper", "max_k": 1},
    )
    out = tmp_path / "out"
    assert main(["tune", str(toml), "--no-lab"]) == 0
    assert _rows(out, "select model, mode from analyses") == [("cnn", "static")]
    assert (out / "layers.json").is_file()


def _p(size: int, wrong: int, n: int = 70, overlap: float | None = None) -> FqPoint:
    return FqPoint(size, n, frozenset(range(wrong)), overlap=overlap)


def test_the_recipe_whose_best_case_loses_least_is_searched_first() -> None:
    """Lite1's case (its measured points): per-tensor's fully quantized model loses least, yet with every layer
    in float it still loses 2 images of 70, while the percentile recipes (worse fully quantized) come to 1: the
    answer is likelier there. Recipes with the same best case (they differ only in weight granularity) go by
    their fully quantized model's top-k overlap with FP32 (per-channel's is 0.82 where per-tensor's top-1 is one
    image better at 0.78), then its loss, then size, then the order."""
    fq = {
        "per-tensor": {"cpu": _p(5_626_733, 4, overlap=0.7829)},
        "per-channel": {"cpu": _p(5_990_633, 6, overlap=0.8171)},
        "per-tensor-percentile": {"cpu": _p(5_626_746, 5, overlap=0.7771)},
        "per-channel-percentile": {"cpu": _p(5_990_646, 6, overlap=0.8171)},
    }
    best = {
        "per-tensor": {"cpu": _p(21_656_000, 2)},
        "per-channel": {"cpu": _p(21_656_000, 2)},
        "per-tensor-percentile": {"cpu": _p(21_656_000, 1)},
        "per-channel-percentile": {"cpu": _p(21_656_000, 1)},
    }
    assert gate.search_order(list(fq), fq, best) == [
        "per-channel-percentile",
        "per-tensor-percentile",
        "per-channel",
        "per-tensor",
    ]
    # without best cases (e.g. max_k set): the fully quantized loss, then size, then the given order
    assert gate.search_order(list(fq), fq, {}) == [
        "per-tensor",
        "per-tensor-percentile",
        "per-channel",
        "per-channel-percentile",
    ]
    # the worst device counts; a recipe with no measured point goes last
    fq2 = {"a": {"cpu": _p(10, 1), "npu": _p(10, 9)}, "b": {"cpu": _p(12, 3), "npu": _p(12, 3)}, "c": {"cpu": None}}
    assert gate.search_order(["a", "b", "c"], fq2, {}) == ["b", "a", "c"]


@pytest.mark.heavy
def test_auto_recipes_are_ordered_by_their_best_case_before_any_screen(tmp_path: Path, assets: Path) -> None:
    """With auto recipes every static recipe's best case (every searched layer in float, the last prefix the
    search would evaluate anyway) is evaluated in full before the first screen of the model, and the search
    asks for that same candidate (no second evaluation)."""
    toml = write_study(
        tmp_path,
        model=assets / "wide.onnx",
        images=assets / "images",
        evaluation=FAST,
        search=MEASURED,
        quantization={"recipes": "auto"},
    )
    out = tmp_path / "out"
    assert main(["tune", str(toml), "--no-lab"]) == 0
    first_screen = _rows(out, "select min(created_at) from jobs where level = 'screen'")[0][0]
    assert first_screen is not None
    searched = {r[0] for r in _rows(out, "select distinct mode from proposals where level = 'screen'")}
    assert searched
    for recipe in searched:
        layers = sorted(
            str(r[0]).removeprefix("ranking +")
            for r in _rows(
                out,
                f"select label from proposals where level = 'screen' and mode = '{recipe}' and label like 'ranking +%'",
            )
        )
        best = candidate_id("wide", recipe, layers)
        jobs = _rows(out, f"select created_at, state from jobs where candidate_id = '{best}' and level = 'full'")
        assert len(jobs) == 1 and jobs[0][1] == "done"
        assert float(jobs[0][0]) < float(first_screen)  # type: ignore[arg-type]
        assert _rows(out, f"select count(*) from proposals where candidate_id = '{best}' and level = 'full'") == [(1,)]
