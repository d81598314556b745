"""The work before the answer with the default search (``budget`` on the ``measured`` ranking)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from conftest import write_study

from tuneqn.controller.cli import main
from tuneqn.controller.config import load_config
from tuneqn.controller.study import Study

FAST = {"latency_repeats": 2, "latency_warmup": 1, "heartbeat_s": 0.5, "silent_after_s": 5.0,
        "unreachable_grace_s": 1.0, "lease_timeout_s": 10.0, "device_wait_s": 30.0}
MEASURED = {"strategy": "budget", "ranking": "measured", "screen_samples": 8}


def _rows(out: Path, sql: str) -> list[tuple[object, ...]]:
    con = sqlite3.connect(out / "tuneqn.db")
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_a_measured_search_needs_no_layer_analysis(tmp_path: Path, assets: Path) -> None:
    """Every search measures its own ranking: the layers are read from the fully quantized model and no error
    analysis runs (no row in ``analyses``, no layers.json); the screens cover exactly the layers the analysis
    would have ranked; a rerun asks for nothing new and still analyzes nothing."""
    toml = write_study(tmp_path, model=assets / "wide.onnx", images=assets / "images", evaluation=FAST,
                       search=MEASURED)
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
    assert screened == {"ranking base", *(f"ranking +{name}" for name in analyzed)}
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


def test_an_error_ranked_search_still_analyzes(tmp_path: Path, assets: Path) -> None:
    """The paper's method (``sweep`` on the ``paper`` ranking) ranks layers by the analysis, as before."""
    toml = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images", evaluation=FAST,
                       search={"strategy": "sweep", "ranking": "paper", "max_k": 1})
    out = tmp_path / "out"
    assert main(["tune", str(toml), "--no-lab"]) == 0
    assert _rows(out, "select model, mode from analyses") == [("cnn", "static")]
    assert (out / "layers.json").is_file()
