"""Bad input gives one line naming what is wrong and exit code 2; hub cache; datasets."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import one_line_error, write_study

from tuneqn.controller.cli import main
from tuneqn.controller.common.errors import UserError
from tuneqn.controller.config import DatasetSpec
from tuneqn.controller.prepare.dataset import prepare_data


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


def test_corrupt_model(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = (assets / "cnn.onnx").read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 2])
    rc, err = _run(
        capsys, "analyze", "--model", str(bad), "--images", str(assets / "images"), "--out", str(tmp_path / "o")
    )
    one_line_error(rc, err, "truncated.onnx", "not a valid ONNX model")


def test_non_onnx_file(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "photo.onnx"
    bad.write_bytes((assets / "images" / "img_000.png").read_bytes())
    rc, err = _run(
        capsys, "analyze", "--model", str(bad), "--images", str(assets / "images"), "--out", str(tmp_path / "o")
    )
    one_line_error(rc, err, "photo.onnx")


def test_unknown_config_key(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images", search={"stepp": 2})
    rc, err = _run(capsys, "analyze", str(study))
    one_line_error(rc, err, "search.stepp: unknown key")
    assert not (tmp_path / "out" / "tuneqn.db").exists()


def test_wrong_type_names_key_path(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = tmp_path / "study.toml"
    study.write_text(
        f'[[models]]\npath = "{assets / "cnn.onnx"}"\n\n[[models]]\npath = "x.onnx"\ninput_shape = "abc"\n\n'
        f'[dataset]\nimages = "{assets / "images"}"\n'
    )
    rc, err = _run(capsys, "analyze", str(study))
    one_line_error(rc, err, "models[1].input_shape: expected list of int")


def test_empty_image_folder(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    rc, err = _run(
        capsys,
        "analyze",
        "--model",
        str(assets / "cnn.onnx"),
        "--images",
        str(tmp_path / "empty"),
        "--out",
        str(tmp_path / "o"),
    )
    one_line_error(rc, err, "dataset.images", "no images")


def test_unknown_layer_in_exclusion_set(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = write_study(
        tmp_path,
        model=assets / "cnn.onnx",
        images=assets / "images",
        search={"exclusion_sets": [{"name": "x", "layers": ["conv1", "nope"]}]},
    )
    rc, err = _run(capsys, "analyze", str(study))
    one_line_error(rc, err, "search.exclusion_sets[0].layers", "'nope'")


def test_hub_name_not_cached(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "hub"
    cache.mkdir()
    (cache / "ONNX_HUB_MANIFEST.json").write_text("[]")
    study = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images", hub_cache_dir=str(cache))
    study.write_text(study.read_text().replace(f'path = "{assets / "cnn.onnx"}"', 'hub = "mobilenetv2-7"'))
    rc, err = _run(capsys, "analyze", str(study))
    one_line_error(rc, err, "mobilenetv2-7")


def _populate_hub(cache: Path, model: Path, name: str, with_file: bool = True) -> None:
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    rel = "vision/classification/tiny/model/tiny-7.onnx"
    manifest = [
        {
            "model": name,
            "model_path": rel,
            "onnx_version": "1.14",
            "opset_version": 17,
            "metadata": {"model_sha": sha, "model_bytes": model.stat().st_size, "tags": ["vision"]},
        }
    ]
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "ONNX_HUB_MANIFEST.json").write_text(json.dumps(manifest))
    if with_file:
        dest = cache / "vision/classification/tiny/model" / f"{sha}_tiny-7.onnx"
        dest.parent.mkdir(parents=True)
        dest.write_bytes(model.read_bytes())


def test_hub_model_from_local_cache(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "hub"
    _populate_hub(cache, assets / "cnn.onnx", "TinyNet")
    study = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images", hub_cache_dir=str(cache))
    study.write_text(study.read_text().replace(f'path = "{assets / "cnn.onnx"}"', 'hub = "tinynet"'))
    assert main(["analyze", str(study)]) == 0
    layers = json.loads((tmp_path / "out" / "layers.json").read_text())
    assert {layer["model"] for layer in layers} == {"tinynet"}


def test_hub_cached_file_corrupt(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "hub"
    _populate_hub(cache, assets / "cnn.onnx", "TinyNet")
    f = next(cache.rglob("*_tiny-7.onnx"))
    f.write_bytes(b"garbage")
    study = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images", hub_cache_dir=str(cache))
    study.write_text(study.read_text().replace(f'path = "{assets / "cnn.onnx"}"', 'hub = "TinyNet"'))
    rc, err = _run(capsys, "analyze", str(study))
    one_line_error(rc, err, "TinyNet", "sha256")


def test_old_opset_is_upgraded(tmp_path: Path, assets: Path) -> None:
    from onnx_models import cnn

    cnn(tmp_path / "old.onnx", opset=11)
    rc = main(
        [
            "analyze",
            "--model",
            str(tmp_path / "old.onnx"),
            "--images",
            str(assets / "images"),
            "--out",
            str(tmp_path / "o"),
            "--calibration",
            "8",
            "--analysis",
            "4",
            "--mode",
            "static",
        ]
    )
    assert rc == 0
    import sqlite3

    row = (
        sqlite3.connect(tmp_path / "o" / "tuneqn.db")
        .execute("select opset_original, opset_used, upgraded, notes from models")
        .fetchone()
    )
    assert row[:3] == (11, 13, 1)
    assert "upgraded opset 11 -> 13" in row[3]


@pytest.mark.heavy
def test_cli_subprocess_has_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "x.onnx"
    bad.write_text("not a model")
    (tmp_path / "imgs").mkdir()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuneqn.controller",
            "analyze",
            "--model",
            str(bad),
            "--images",
            str(tmp_path / "imgs"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert r.stderr.startswith("tuneqn: error:")


def test_seeded_disjoint_samples_and_labels(tmp_path: Path, assets: Path) -> None:
    spec = DatasetSpec(
        images=assets / "labelled", eval=10, calibration=8, analysis=3, seed=7, labels={"regex": r"img_\d+_(\d)\.png"}
    )
    a = prepare_data(spec, [1, 3, 16, 16], tmp_path / "a")
    b = prepare_data(spec, [1, 3, 16, 16], tmp_path / "b")
    assert a.eval.items == b.eval.items and a.calibration.items == b.calibration.items
    assert not set(a.eval.items) & set(a.calibration.items)
    assert set(a.analysis.items) <= set(a.calibration.items)
    assert len(a.eval.items) == 10 and len(a.calibration.items) == 8 and len(a.analysis.items) == 3
    assert a.eval.labels == [int(Path(i).stem.split("_")[2]) for i in a.eval.items]
    arr = a.eval.load()
    assert arr.shape == (10, 3, 16, 16) and arr.dtype == np.float32
    assert 0.0 <= arr.min() and arr.max() <= 1.0  # default scale to [0, 1]
    c = prepare_data(spec.model_copy(update={"seed": 8}), [1, 3, 16, 16], tmp_path / "c")
    assert c.eval.items != a.eval.items


def test_labels_from_csv_and_subfolders(tmp_path: Path) -> None:
    from onnx_models import write_images

    for cls in ("3", "5"):
        write_images(tmp_path / "tree" / cls, 4, seed=int(cls))
    spec = DatasetSpec(images=tmp_path / "tree", eval=4, calibration=4, labels={"subfolders": True})
    d = prepare_data(spec, [1, 3, 8, 8], tmp_path / "o1")
    assert sorted(set(d.eval.labels or [])) <= [3, 5]
    assert all(lab == int(item.split("/")[0]) for item, lab in zip(d.eval.items, d.eval.labels or [], strict=True))
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\n" + "".join(f"3/img_{i:03d}.png,{100 + i}\n" for i in range(4)))
    spec = DatasetSpec(images=tmp_path / "tree", eval=4, calibration=4, labels={"csv": csv})
    d = prepare_data(spec, [1, 3, 8, 8], tmp_path / "o2")
    labels = (d.eval.labels or []) + (d.calibration.labels or [])
    for item, lab in zip(d.eval.items + d.calibration.items, labels, strict=True):
        assert lab == (100 + int(item[-7:-4]) if item.startswith("3/") else -1)


def test_npz_tensors_with_labels(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(30, 3, 8, 8)).astype(np.float32)
    y = np.arange(30) % 4
    np.savez(tmp_path / "d.npz", inputs=x, labels=y)
    d = prepare_data(DatasetSpec(tensors=tmp_path / "d.npz", eval=20, calibration=10), [1, 3, 8, 8], tmp_path / "o")
    idx = [int(i[1:]) for i in d.eval.items]
    np.testing.assert_array_equal(d.eval.load(), x[idx])
    assert d.eval.labels == [int(v) for v in y[idx]]


# --------------------------------------------------------------------------- issue 7, defect 6


@pytest.mark.parametrize("command", ["analyze", "tune"])
def test_out_naming_a_file(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    afile = tmp_path / "taken"
    afile.write_text("keep me")
    study = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images")
    rc, err = _run(capsys, command, str(study), "--out", str(afile))
    one_line_error(rc, err, str(afile), "not a folder")
    assert afile.read_text() == "keep me"


def test_quick_form_out_naming_a_file(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "taken"
    afile.write_text("keep me")
    rc, err = _run(
        capsys, "analyze", "--model", str(assets / "cnn.onnx"), "--images", str(assets / "images"), "--out", str(afile)
    )
    one_line_error(rc, err, str(afile))
    assert afile.read_text() == "keep me"


def test_out_below_a_file(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "taken"
    afile.write_text("keep me")
    study = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images")
    rc, err = _run(capsys, "analyze", str(study), "--out", str(afile / "sub"))
    one_line_error(rc, err, "cannot create folder")


@pytest.mark.parametrize("command", ["report", "export"])
def test_study_dir_naming_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    afile = tmp_path / "taken"
    afile.write_text("keep me")
    extra = ["--candidate", "0", "-o", str(tmp_path / "x.onnx")] if command == "export" else []
    rc, err = _run(capsys, command, str(afile), *extra)
    one_line_error(rc, err, str(afile), "is a file")


def test_export_output_naming_a_folder(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images")
    assert main(["analyze", str(study)]) == 0
    capsys.readouterr()
    (tmp_path / "dest").mkdir()
    rc, err = _run(capsys, "export", str(tmp_path / "out"), "--candidate", "0", "-o", str(tmp_path / "dest"))
    one_line_error(rc, err, "-o/--output", "is a folder")


def test_agents_token_file_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-token"
    rc, err = _run(capsys, "agents", "--agent", "127.0.0.1:1", "--token-file", str(missing))
    one_line_error(rc, err, "--token-file", str(missing), "not found")


def test_agents_token_file_in_study_missing(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "gone"
    study = write_study(
        tmp_path,
        model=assets / "cnn.onnx",
        images=assets / "images",
        agents=[{"address": "127.0.0.1:1", "token_file": str(missing)}],
    )
    rc, err = _run(capsys, "agents", str(study))
    one_line_error(rc, err, "agents[0].token_file", str(missing))


def test_read_token(tmp_path: Path) -> None:
    from tuneqn.controller.common.errors import UserError
    from tuneqn.controller.farm.auth import read_token

    assert read_token(None) is None
    (tmp_path / "t").write_text("  s3cret\n")
    assert read_token(tmp_path / "t") == "s3cret"
    (tmp_path / "empty").write_text("\n")
    for bad, needle in ((tmp_path / "empty", "is empty"), (tmp_path, "is a folder"), (tmp_path / "x", "not found")):
        with pytest.raises(UserError, match=needle):
            read_token(bad, "--token-file")


def _damage(images: Path, *names: str) -> list[str]:
    for name in names:
        (images / name).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return list(names)


def test_unreadable_image_is_skipped_and_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import sqlite3

    from onnx_models import cnn, write_images

    model = cnn(tmp_path / "net.onnx")
    images = write_images(tmp_path / "images", 30)
    bad = _damage(images, "img_004.png", "img_017.png")
    # Sizes that draw every image, so both damaged ones are met.
    rc = main(
        [
            "analyze",
            "--model",
            str(model),
            "--images",
            str(images),
            "--out",
            str(tmp_path / "o"),
            "--calibration",
            "14",
            "--eval",
            "16",
            "--analysis",
            "4",
            "--mode",
            "static",
        ]
    )
    assert rc == 0
    con = sqlite3.connect(tmp_path / "o" / "tuneqn.db")
    rows = con.execute("select split, items, skipped from datasets").fetchall()
    assert {r[0] for r in rows} == {"net/eval", "net/calibration", "net/analysis"}
    for _split, items, skipped in rows:
        recorded = json.loads(skipped)
        assert sorted(s["file"] for s in recorded) == bad
        assert all(s["reason"] for s in recorded)
        assert not set(json.loads(items)) & set(bad)
    sizes = dict(con.execute("select split, size from datasets").fetchall())
    assert sizes["net/eval"] + sizes["net/calibration"] == 28


def test_unreadable_image_warning_names_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from onnx_models import write_images

    images = write_images(tmp_path / "images", 10)
    _damage(images, "img_003.png")
    spec = DatasetSpec(images=images, eval=5, calibration=5, analysis=2)
    with caplog.at_level("WARNING", logger="tuneqn.controller.prepare.dataset"):
        data = prepare_data(spec, [1, 3, 8, 8], tmp_path / "o")
    assert [s["file"] for s in data.skipped] == ["img_003.png"]
    assert any("img_003.png" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    # Reused from the manifest with the same record.
    assert prepare_data(spec, [1, 3, 8, 8], tmp_path / "o").skipped == data.skipped


def test_no_readable_image_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from onnx_models import cnn

    model = cnn(tmp_path / "net.onnx")
    images = tmp_path / "images"
    images.mkdir()
    _damage(images, "a.png", "b.jpg", "c.png")
    rc, err = _run(capsys, "analyze", "--model", str(model), "--images", str(images), "--out", str(tmp_path / "o"))
    one_line_error(rc, err, "none of the 3 images", "can be read")


@pytest.mark.parametrize(
    ("command", "flag", "value", "needle"),
    [
        ("report", "--max-loss", "abc", "not a number: 'abc'"),
        ("report", "--max-loss", "1.5", "must be a fraction in [0, 1)"),
        ("report", "--max-size-mb", "-1", "must be positive"),
        ("export", "--max-latency-ms", "0", "must be positive"),
        ("tune", "--max-loss", "-0.1", "must be a fraction in [0, 1)"),
    ],
)
def test_bad_answer_constraint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, flag: str, value: str, needle: str
) -> None:
    """The answer's constraint flags: one line naming the flag, exit 2, nothing written."""
    args = (
        [str(tmp_path / "study")]
        if command in ("report", "export")
        else ["--model", "m.onnx", "--images", "i", "--out", str(tmp_path / "o")]
    )
    if command == "export":
        args += ["--best", "-o", str(tmp_path / "x.onnx")]
    with pytest.raises(SystemExit) as exc:
        main([command, *args, flag, value])
    one_line_error(int(str(exc.value.code)), capsys.readouterr().err, flag, needle)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["report"], ["export", "--best", "-o", "x.onnx"]])
def test_corrupt_study_store(command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "tuneqn.db").write_bytes(b"SQLite format 3\0" + bytes(range(256)) * 8)
    rc, err = _run(capsys, command[0], str(out), *command[1:])
    one_line_error(rc, err, "tuneqn.db", "not a readable tuneqn study store")
    assert sorted(p.name for p in out.iterdir()) == ["tuneqn.db"]


@pytest.mark.parametrize("flag", ["--lease-timeout", "--device-wait"])
@pytest.mark.parametrize("value", ["-1", "0"])
def test_tune_waits_must_be_positive(
    flag: str, value: str, tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "tune",
                "--model",
                str(assets / "cnn.onnx"),
                "--images",
                str(assets / "images"),
                "--out",
                str(out),
                f"{flag}={value}",
            ]
        )
    one_line_error(exc.value.code, capsys.readouterr().err.strip(), flag, "must be positive")
    assert not out.exists()


def test_tune_quick_form_checks_the_model_before_anything(
    tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])
    bad = tmp_path / "model.onnx"
    onnx.save(
        helper.make_model(helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g", [x], [y])), str(bad)
    )
    for model in (bad, tmp_path / "missing.onnx"):
        out = tmp_path / "o"
        rc, err = _run(capsys, "tune", "--model", str(model), "--images", str(assets / "images"), "--out", str(out))
        one_line_error(rc, err, "--model", model.name)
        assert not out.exists()


def test_a_file_the_user_names_fails_in_one_line(tmp_path: Path) -> None:
    """files.read_user_file (token, lab, study and model files): missing, a folder, unreadable."""
    from tuneqn.controller.common.files import read_user_file

    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"x")
    assert read_user_file(plain, "lab file", "a lab TOML file", "--lab") == b"x"
    for path, message in (
        (tmp_path / "nope.toml", f"--lab: lab file not found: {tmp_path / 'nope.toml'}"),
        (tmp_path, f"--lab: {tmp_path} is a folder, expected a lab TOML file"),
        (plain / "below", f"--lab: cannot read {plain / 'below'} (Not a directory)"),
    ):
        with pytest.raises(UserError) as err:
            read_user_file(path, "lab file", "a lab TOML file", "--lab")
        assert str(err.value) == message
    with pytest.raises(UserError, match=r"^config file not found: "):
        read_user_file(tmp_path / "study.toml", "config file", "a study TOML file")
