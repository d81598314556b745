"""`tuneqn export` you can trust, and the answer `tuneqn tune` ends with (real local agent, real ORT)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import write_study
from report_store import add_candidate, add_model, add_proposal, add_search, layers, open_store

from tuneqn.controller.cli import main

FAST = {"latency_repeats": 2, "latency_warmup": 1}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> tuple[Path, str, Path]:
    """A study tuned once (paper sweep on a local agent), then moved away from the out_dir its config names:
    (the moved study folder, what `tune` printed, the out_dir its config names)."""
    root = tmp_path_factory.mktemp("tuned")
    study = write_study(root, model=assets / "wide.onnx", images=assets / "labelled", evaluation=FAST)
    text = study.read_text().replace("[dataset]\n", "[dataset]\nlabels = { regex = 'img_\\d+_(\\d)\\.png' }\n")
    study.write_text(text)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["tune", str(study)]) == 0
    moved = root / "moved-study"
    (root / "out").rename(moved)
    return moved, printed.getvalue(), root / "out"


def _copy(template: tuple[Path, str, Path], dest: Path) -> Path:
    shutil.copytree(template[0], dest)
    return dest


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = (p.stat().st_mode, p.read_bytes() if p.is_file() else b"")
    return out


def _sidecar(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".json").read_text())


def _metadata(path: Path) -> dict:
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(props["tuneqn"])


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _candidate_with_float_layers(study: Path) -> dict:
    report = json.loads((study / "report.json").read_text())
    return next(c for c in report["candidates"] if c["k"] == 2 and c["runtime"]["ort_disabled_optimizers"])


def test_tune_ends_with_the_answer_and_report_has_answer_and_dataset(template: tuple[Path, str, Path]) -> None:
    study, printed, _ = template
    lines = printed.rstrip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("answer (accuracy loss ≤ 1 %)"))
    assert lines[start - 1].startswith("json: ")  # after the report paths
    answer = lines[start:]
    assert answer[-1].startswith("    export: tuneqn export ") and "--best --device local" in answer[-1]
    assert any("agreement loss" in line and "n = 12" in line for line in answer)
    assert any(line.startswith("    float layers (") for line in answer)
    report = json.loads((study / "report.json").read_text())
    assert report["dataset"]["eval_samples"] == 12 and report["dataset"]["labelled_eval_samples"] == 12
    assert report["dataset"]["calibration_samples"] == 12 and report["dataset"]["analysis_samples"] == 6
    (pick,) = report["answer"]["picks"]
    assert report["answer"]["constraint"] == {"max_loss": 0.01, "max_size_bytes": None, "max_latency_ms": None}
    assert pick["device"] == "local" and pick["n"] == 12 and pick["accuracy_n"] == 12
    assert (study / pick["file"]).is_file()


def test_report_recomputes_the_answer_for_another_constraint(
    template: tuple[Path, str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = _copy(template, tmp_path / "s")
    assert main(["report", str(study), "--max-loss", "0.5", "--max-size-mb", "0.0095"]) == 0
    out = capsys.readouterr().out.rstrip().splitlines()
    assert any(line.startswith("answer (accuracy loss ≤ 50 %, size ≤ 0.0095 MB)") for line in out)
    report = json.loads((study / "report.json").read_text())
    assert report["answer"]["constraint"] == {"max_loss": 0.5, "max_size_bytes": 9500, "max_latency_ms": None}
    assert "--max-loss 0.5 --max-size-mb 0.0095" in report["answer"]["picks"][0]["export_command"]


def test_export_from_a_moved_study_writes_nothing_there(template: tuple[Path, str, Path], tmp_path: Path) -> None:
    study = _copy(template, tmp_path / "elsewhere")
    before = _snapshot(study)
    dest = tmp_path / "x.onnx"
    assert main(["export", str(study), "--candidate", "0", "-o", str(dest)]) == 0
    assert _snapshot(study) == before  # no lock, no database write, no rebuilt file
    assert not template[2].exists()  # nor a study recreated at the out_dir its config names
    facts = _sidecar(dest)
    stored = json.loads((study / "report.json").read_text())
    fq = next(c for c in stored["candidates"] if c["k"] == 0)
    assert facts["candidate"] == fq["id"] and facts["evaluated_sha256"] == fq["sha256"]


def test_export_from_a_read_only_study(template: tuple[Path, str, Path], tmp_path: Path) -> None:
    study = _copy(template, tmp_path / "ro")
    dirs = [study, *(p for p in study.rglob("*") if p.is_dir())]
    files = [p for p in study.rglob("*") if p.is_file()]
    for p in files:
        p.chmod(0o444)
    for d in dirs:
        d.chmod(0o555)
    try:
        before = _snapshot(study)
        dest = tmp_path / "best.onnx"
        assert main(["export", str(study), "--best", "-o", str(dest)]) == 0
        assert _snapshot(study) == before
    finally:
        for d in dirs:
            d.chmod(0o755)
    assert not template[2].exists()
    report = json.loads((study / "report.json").read_text())
    assert _sidecar(dest)["candidate"] == report["answer"]["picks"][0]["candidate"]


def test_export_best_exports_the_answers_pick_with_facts(
    template: tuple[Path, str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = template[0]
    dest = tmp_path / "pick.onnx"
    assert main(["export", str(study), "--best", "--device", "local", "--max-loss", "0.5", "-o", str(dest)]) == 0
    printed = capsys.readouterr().out
    assert "the answer for wide on local" in printed and "facts: " in printed
    facts = _sidecar(dest)
    assert facts["answer"]["constraint"]["max_loss"] == 0.5 and facts["answer"]["devices"] == ["local"]
    assert facts["sha256"] == hashlib.sha256(dest.read_bytes()).hexdigest()
    assert facts["size_bytes"] == dest.stat().st_size
    for key in ("candidate", "evaluated_sha256", "recipe", "float_layers", "metrics", "session_options", "versions"):
        assert key in facts, key
    (m,) = facts["metrics"]
    assert m["device"] == "local" and m["n"] == 12 and len(m["loss_ci95"]) == 2 and m["accuracy_n"] == 12
    assert set(facts["versions"]) >= {"tuneqn", "onnxruntime"}
    meta = _metadata(dest)  # the same facts in the model, less what depends on the written bytes
    assert meta == {k: v for k, v in facts.items() if k not in ("file", "sha256", "size_bytes")}
    # the device is known: --device of another name is refused
    assert main(["export", str(study), "--best", "--device", "phone", "-o", str(tmp_path / "y.onnx")]) == 2
    assert "--device" in _one_line(capsys) and not (tmp_path / "y.onnx").exists()


def test_export_is_bit_identical_run_to_run(template: tuple[Path, str, Path], tmp_path: Path) -> None:
    study = template[0]
    cand = _candidate_with_float_layers(study)
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        assert main(["export", str(study), "--candidate", cand["id"], "-o", str(tmp_path / run / "m.onnx")]) == 0
    for name in ("m.onnx", "m.onnx.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def _optimized(path: Path, tmp: Path, disabled: list[str]) -> tuple[onnx.ModelProto, ort.InferenceSession]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp / "optimized.onnx")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    return onnx.load(str(tmp / "optimized.onnx")), sess


def _float_convs(model: onnx.ModelProto) -> int:
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    return sum(1 for n in model.graph.node if n.op_type in ("Conv", "FusedConv") and n.input[1] in floats)


def test_exported_float_layers_stay_float_in_a_plain_session(template: tuple[Path, str, Path], tmp_path: Path) -> None:
    """What ONNX Runtime really runs: the exported file in a plain InferenceSession keeps the excluded Convs
    float and predicts exactly what the evaluated file does with disabled_optimizers."""
    study = template[0]
    cand = _candidate_with_float_layers(study)
    dest = tmp_path / "plain.onnx"
    assert main(["export", str(study), "--candidate", cand["id"], "-o", str(dest)]) == 0
    facts = _sidecar(dest)
    assert facts["session_options"] == {} and facts["load"] == "onnxruntime.InferenceSession(path)"
    assert facts["float_layers"] == ["conv2", "conv4"]
    evaluated = study / facts["evaluated_file"]
    x = np.load(study / "data" / "wide" / "eval.npy")
    ran, with_option = _optimized(evaluated, tmp_path, ["WeightBiasQuantization"])
    assert _float_convs(ran) == 2
    plain_graph, plain = _optimized(dest, tmp_path, [])
    assert _float_convs(plain_graph) == 2
    np.testing.assert_array_equal(plain.run(None, {"input": x})[0], with_option.run(None, {"input": x})[0])
    default_graph, _ = _optimized(evaluated, tmp_path, [])  # the evaluated file alone: ORT quantizes them
    assert _float_convs(default_graph) < 2


def test_export_refuses_a_changed_candidate_file(
    template: tuple[Path, str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = _copy(template, tmp_path / "s")
    cand = _candidate_with_float_layers(study)
    path = study / "candidates" / "wide" / "static" / f"{cand['id'].rsplit(':', 1)[-1]}.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    assert main(["export", str(study), "--candidate", cand["id"], "-o", str(tmp_path / "x.onnx")]) == 1
    err = _one_line(capsys)
    assert "not the evaluated candidate's" in err and "tuneqn tune" in err
    path.unlink()
    assert main(["export", str(study), "--candidate", cand["id"], "-o", str(tmp_path / "x.onnx")]) == 1
    assert "is missing" in _one_line(capsys)
    assert not (tmp_path / "x.onnx").exists()


def test_a_bare_k_matching_several_candidates_is_refused_with_the_choices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--candidate 2`: the paper's top-2 layers and the candidate a search labelled 'measured k=2' differ."""
    store = open_store(tmp_path)
    add_model(store)
    order = layers(4)
    store.put_analysis(
        "net",
        "static",
        "key",
        "f" * 64,
        1.0,
        [
            {
                "name": n,
                "op_type": "Conv",
                "index": i,
                "output": f"{n}_out",
                "fused_activation": "",
                "qdq_err": 1.0,
                "xmodel_err": 1.0,
                "norm_qdq": 1.0,
                "norm_xmodel": 1.0,
                "score": 1.0,
                "rank": i + 1,
            }
            for i, n in enumerate(order)
        ],
    )
    paper = add_candidate(store, k=2, label="paper k=2", size=14_300_000)  # conv_0, conv_1
    measured = add_candidate(store, excluded=["conv_2", "conv_3"], label="measured k=2", size=5_930_000)
    add_search(store, "budget/measured", strategy="budget", ranking="measured")
    add_proposal(store, "budget/measured", measured, "full")
    store.close()
    rc = main(["export", str(tmp_path / "out"), "--candidate", "2", "-o", str(tmp_path / "x.onnx")])
    err = _one_line(capsys)
    assert rc == 2 and paper in err and measured in err and "14.3 MB" in err and "5.93 MB" in err
    assert not (tmp_path / "x.onnx").exists()
    # the label itself is not ambiguous
    from tuneqn.controller.store import Store
    from tuneqn.controller.study import find_candidate

    ro = Store.open_readonly(tmp_path / "out")
    try:
        assert find_candidate(ro, "measured k=2")["id"] == measured
        assert find_candidate(ro, "budget/measured measured k=2")["id"] == measured
        assert find_candidate(ro, "paper k=2")["id"] == paper
    finally:
        ro.close()


def test_export_needs_candidate_or_best(
    template: tuple[Path, str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(template[0]), "-o", str(tmp_path / "x.onnx")]) == 2
    assert "--best" in _one_line(capsys)
    assert main(["export", str(template[0]), "--best", "--cross-device", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "one device only" in _one_line(capsys)
