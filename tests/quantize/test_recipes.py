"""Quantization recipes: a search dimension, each with its own calibration, ranking and candidates."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import onnx
import pytest
from helpers import write_study

from tuneqn.controller.cli import main
from tuneqn.controller.common.errors import UserError
from tuneqn.controller.config import QuantizationSpec, load_config, parse_config


def test_recipes_inherit_the_section_and_override_it() -> None:
    q = QuantizationSpec(
        calibration_method="percentile",
        recipes=[{"name": "pc", "mode": "static", "per_channel": True}, {"name": "dyn", "mode": "dynamic"}],
    )
    assert q.recipe_names() == ["pc", "dyn"]
    pc = q.resolve("pc")
    assert pc.per_channel and pc.calibration_method == "percentile" and pc.mode == "static"
    assert q.resolve("dyn").mode == "dynamic"
    preset = q.resolve("per-channel-symmetric")  # a preset, not defined by the study
    assert preset.per_channel and preset.activation_symmetric and preset.activation_type == "int8"
    assert QuantizationSpec(modes=["static", "dynamic"]).recipe_names() == ["static", "dynamic"]
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        q.resolve("nope")


def test_a_stored_config_resolves_its_recipes_the_same() -> None:
    """A recipe writes back only the settings it gives (the others stay the section's after a reload); a config
    stored by an earlier version, with None for the settings a recipe does not give, still reads the same."""
    q = QuantizationSpec(calibration_method="percentile", recipes=[{"name": "pc", "per_channel": True}])
    stored = q.model_dump(mode="json")
    assert stored["recipes"] == [{"name": "pc", "per_channel": True}]
    again = QuantizationSpec.model_validate_json(q.model_dump_json())
    assert again.resolve("pc") == q.resolve("pc")
    assert again.resolve("pc").calibration_method == "percentile" and again.resolve("pc").per_channel
    older = {**stored, "recipes": [{"name": "pc", "mode": None, "per_channel": True, "calibration_method": None}]}
    assert QuantizationSpec.model_validate(older).resolve("pc") == q.resolve("pc")
    chosen = q.with_recipes(["pc", "per-tensor.qdq"])  # --recipe: every setting written, variants included
    assert [r.name for r in chosen.recipe_specs] == ["pc", "per-tensor.qdq"]
    assert chosen.resolve("pc") == q.resolve("pc")
    assert chosen.resolve("per-tensor.qdq") == q.resolve("per-tensor.qdq")


def test_repeated_recipe_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="recipe names must be unique"):
        parse_config(
            {
                "models": [{"path": "m.onnx"}],
                "dataset": {"images": "i"},
                "quantization": {"recipes": [{"name": "a"}, {"name": "a"}]},
            },
            tmp_path,
        )


def _scales(path: str) -> int:
    m = onnx.load(path)
    dq_scales = {n.input[1] for n in m.graph.node if n.op_type == "DequantizeLinear"}
    return sum(int(onnx.numpy_helper.to_array(i).size) for i in m.graph.initializer if i.name in dq_scales)


def test_each_recipe_gets_its_calibration_ranking_and_candidates(tmp_path: Path, assets: Path) -> None:
    study = write_study(
        tmp_path,
        model=assets / "wide.onnx",
        images=assets / "images",
        quantization={
            "recipes": [
                {"name": "pt", "mode": "static"},
                {"name": "pc", "mode": "static", "per_channel": True, "calibration_method": "percentile"},
            ]
        },
    )
    assert main(["analyze", str(study), "--candidates"]) == 0
    con = sqlite3.connect(tmp_path / "out" / "tuneqn.db")
    assert con.execute("select count(*) from calibrations").fetchone()[0] == 2
    assert {r[0] for r in con.execute("select distinct mode from layers")} == {"pt", "pc"}
    fq = dict(con.execute("select mode, path from candidates where k = 0").fetchall())
    assert _scales(fq["pc"]) > _scales(fq["pt"])  # one scale per output channel
    # a second run reuses both calibrations (no new rows, same files)
    before = con.execute("select key, created_at from calibrations order by key").fetchall()
    assert main(["analyze", str(study), "--candidates"]) == 0
    assert con.execute("select key, created_at from calibrations order by key").fetchall() == before
    # `--recipe` picks a subset (or a preset) without editing the study
    cfg = load_config(study)
    assert cfg.quantization.with_recipes(["pc", "per-tensor"]).recipe_names() == ["pc", "per-tensor"]
