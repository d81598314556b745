"""Peers, side by side: NNCF's accuracy-controlled quantization vs the answer tuneqn prints, on any model.

One run, same model, same photos, same preprocessed arrays (issue 16, "Done when"):

* tuneqn: the quick form with its defaults, ``tuneqn tune --model M --images DIR --out TMP
  --preprocess PRESET --no-lab`` (any further tuneqn flags after ``--``), as a subprocess; its
  wall time, then the pick in ``TMP/report.json``'s ``answer`` section (see :func:`read_answer`).
  ``--study STUDY.toml`` runs ``tuneqn tune STUDY --out TMP --no-lab`` instead.
* NNCF: ``nncf.quantize_with_accuracy_control`` with its ONNX backend (no OpenVINO needed) on the
  same FP32 model, calibrated on tuneqn's calibration sample and validated on tuneqn's evaluation
  sample: both drawn by ``tuneqn.controller.prepare.dataset.prepare_data`` from the config tuneqn's own
  command-line parser builds for the command above, so they are the same arrays (checked against
  the sha256 of the samples tuneqn stores in ``TMP/data``). Validation metric: top-1 agreement with
  the FP32 model, all run with ONNX Runtime; ``max_drop`` 0.0101 (NNCF tests ``drop <= max_drop``
  in floating point, so 1 - 0.99 would fail at exactly 0.01). Measured: wall time of the NNCF
  call, validation calls (and images they ran), size of the saved model, its agreement
  re-evaluated with ONNX Runtime, and the operations NNCF reverted to floating point (from its log).
* ONNX Runtime alone (unless ``--no-ort``): ``quant_pre_process`` + ``quantize_static`` (QDQ, uint8
  activations, int8 weights, min-max), per-tensor and per-channel, fully quantized, same arrays.

Prints one table and the ratios the issue targets: tuneqn size / NNCF size (<= 1.02), tuneqn
time to its model / NNCF time (<= 0.5, when the report says when the pick was found; counted from the
command's start, so preparing and calibrating count), tuneqn
whole-run time / NNCF time (<= 1), and whether tuneqn's pick is within the 1 % loss.

Not part of ``make test``: NNCF is an optional requirement, installed in its own environment.
From the repository root::

    python3 -m venv /tmp/peers-venv
    /tmp/peers-venv/bin/pip install -e . -r bench/requirements-peers.txt
    /tmp/peers-venv/bin/python bench/peers.py --model examples/lite0/work/model.onnx \\
        --images examples/lite0/work/images --preprocess lite [--json peers.json]
    /tmp/peers-venv/bin/python bench/peers.py --model examples/lite1/work/model.onnx \\
        --images examples/lite1/work/images --preprocess lite

(``make example`` first, for the Lite0 model and photos; ``python examples/lite0/prepare.py
--variant lite1`` for Lite1. Instead of ``pip install -e .`` a ``.pth`` file in the new venv's
site-packages with ``import site; site.addsitedir('/path/to/tuneqn/.venv/lib/python3.11/site-packages')``
reuses an existing tuneqn environment; pip then installs only what NNCF adds.)
``--skip-tuneqn`` runs the NNCF (and ONNX Runtime) half only; ``--runs N`` repeats each NNCF setting
N times; ``--ranking-subset 20 0`` (the default) runs NNCF with both ranking subsets (see
:data:`RANKING_SUBSETS`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from tuneqn.controller.cli import build_parser, study_config
from tuneqn.controller.common.errors import UserError
from tuneqn.controller.config import StudyConfig
from tuneqn.controller.prepare.dataset import PreparedData, describe_preprocess, model_hw, prepare_data
from tuneqn.controller.prepare.modelio import prepare_model

log = logging.getLogger(__name__)

MAX_DROP = 0.0101  # NNCF: drop <= max_drop, in floating point; 1 - 0.99 > 0.01
MAX_LOSS = 0.01  # tuneqn's default --max-loss (the answer's constraint)
CHUNK = 20  # images per ONNX Runtime call (the model's batch axis is free)
# NNCF ranks each group of quantizers on the evaluation images where the quantized model is
# furthest from FP32 (ranking_subset_size). Which size does best depends on the samples: on the
# example study's split (100 evaluation images) NNCF's default (300: all of them) gave 14.2 MB and
# 20 gave 5.13 MB; on the quick form's split of the same photos (70) with the lite preset, 20 gave
# 18.28 MB and the default 12.13 MB. Both run by default and the smallest model within the drop
# stands for NNCF, so that tuneqn is compared with NNCF at its best; the table lists every run.
RANKING_SUBSETS = [20, 0]  # 0: NNCF's own default

# ---------------------------------------------------------------------------------------------
# The samples: tuneqn's own config for the command, tuneqn's own prepare_data


def tuneqn_command(quick: list[str], out: Path) -> list[str]:
    """The arguments after ``tuneqn``: ``tune <quick…> --out OUT --no-lab``."""
    return ["tune", *quick, "--out", str(out), "--no-lab"]


def samples(quick: list[str], out: Path, work: Path) -> tuple[StudyConfig, PreparedData]:
    """The config tuneqn builds for the command and the samples it draws from it.

    Returns (config, prepared data). The config comes from
    tuneqn's parser and ``study_config`` (the quick form's defaults: sample sizes, seed,
    preprocessing); the samples from ``prepare_data`` with the model's input shape as tuneqn
    prepares it.
    """
    parser = build_parser()
    args = parser.parse_args(tuneqn_command(quick, out))
    cfg = study_config(args)
    spec = cfg.models[0]
    pm = prepare_model(spec, work / "models", cfg.hub_cache_dir, label="models[0]", preprocess_model=False)
    data = prepare_data(cfg.dataset, pm.input_shape, work / "data")
    return cfg, data


def same_samples(data: PreparedData, tuneqn_out: Path) -> bool | None:
    """Whether tuneqn stored the same evaluation and calibration arrays (None: nothing to compare)."""
    manifests = sorted((tuneqn_out / "data").glob("*/manifest.json"))
    if len(manifests) != 1:
        return None
    splits = json.loads(manifests[0].read_text()).get("splits", {})
    return all(splits.get(s.name, {}).get("sha256") == s.sha256 for s in (data.eval, data.calibration))


# ---------------------------------------------------------------------------------------------
# ONNX Runtime helpers (NNCF's validation, the FP32 reference and the final check of NNCF's model)


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def top1(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    """Top-1 class of every image (N, C, H, W), run in chunks of :data:`CHUNK`."""
    name = session.get_inputs()[0].name
    out = []
    for i in range(0, len(images), CHUNK):
        scores = session.run(None, {name: images[i : i + CHUNK]})[0]
        out.append(np.asarray(scores).reshape(scores.shape[0], -1).argmax(axis=1))
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------
# NNCF side


class _RevertedOps(logging.Handler):
    """Catches NNCF's report of the operations it reverted to floating point."""

    PATTERN = re.compile(r"(\d+) out of (\d+) were reverted back to the floating-point precision:\n?(.*)", re.S)

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.reverted: list[str] | None = None
        self.quantized_ops: int | None = None
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        self.messages.append(msg)
        m = self.PATTERN.search(msg)
        if m:
            self.quantized_ops = int(m.group(2))
            self.reverted = [line.strip() for line in m.group(3).splitlines() if line.strip()]


def nncf_side(
    model_path: Path, calib: np.ndarray, evals: np.ndarray, workdir: Path, ranking_subset: int | None = None
) -> dict[str, Any]:
    """Run ``quantize_with_accuracy_control`` once (NNCF's defaults but ``max_drop``) and measure it.

    ``ranking_subset``: NNCF's ``ranking_subset_size`` (images each group of quantizers is ranked
    on); None keeps NNCF's default (``subset_size``, 300: all evaluation images here).
    """
    import nncf  # optional requirement: bench/requirements-peers.txt
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    fp32 = onnx.load(str(model_path))
    input_name = fp32.graph.input[0].name
    reference = top1(_session(model_path), evals)  # FP32 top-1: what agreement is measured against

    calls = {"n": 0, "images": 0}

    def validate(model: onnx.ModelProto, data: Iterable[tuple[np.ndarray, int]]) -> tuple[float, list[float]]:
        """Top-1 agreement with FP32 over ``data`` (items: image (1, C, H, W), FP32 class)."""
        items = list(data)
        calls["n"] += 1
        calls["images"] += len(items)
        if not items:
            return 0.0, []
        pred = top1(_session(model), np.concatenate([x for x, _ in items]))
        hits = [float(p == ref) for p, (_, ref) in zip(pred, items, strict=False)]
        return float(np.mean(hits)), hits

    calibration = nncf.Dataset([calib[i : i + 1] for i in range(len(calib))], lambda x: {input_name: x})
    validation = nncf.Dataset(
        [(evals[i : i + 1], int(reference[i])) for i in range(len(evals))], lambda item: {input_name: item[0]}
    )

    catcher = _RevertedOps()
    nncf_log = logging.getLogger("nncf")
    nncf_log.addHandler(catcher)
    load_before = os.getloadavg()[0]
    try:
        t0 = time.perf_counter()
        quantized = nncf.quantize_with_accuracy_control(
            fp32,
            calibration,
            validation,
            validate,
            max_drop=MAX_DROP,
            drop_type=nncf.DropType.ABSOLUTE,
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                ranking_subset_size=ranking_subset
            ),
        )
        seconds = time.perf_counter() - t0
        load_after = os.getloadavg()[0]
    finally:
        nncf_log.removeHandler(catcher)

    out = workdir / f"nncf-ranking{ranking_subset or 0}.onnx"
    onnx.save(quantized, str(out))
    agreement = float((top1(_session(out), evals) == reference).mean())
    return {
        "nncf_version": nncf.__version__,
        "seconds": seconds,
        "validation_calls": calls["n"],
        "validation_images": calls["images"],
        "size_bytes": out.stat().st_size,
        "fp32_size_bytes": model_path.stat().st_size,
        "agreement": agreement,
        "n": len(evals),
        "ranking_subset": min(ranking_subset if ranking_subset is not None else 300, len(evals)),
        "quantized_ops": catcher.quantized_ops,
        "reverted_ops": catcher.reverted if catcher.reverted is not None else [],
        "load": [load_before, load_after],  # 1-minute load average before and after (other work skews times)
    }


# ---------------------------------------------------------------------------------------------
# ONNX Runtime alone: the fully quantized models a user gets from its quantizer


class _Reader:
    """ONNX Runtime calibration reader over an array, one image at a time."""

    def __init__(self, input_name: str, data: np.ndarray) -> None:
        self.input_name, self.data, self.i = input_name, data, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.data):
            return None
        self.i += 1
        return {self.input_name: self.data[self.i - 1 : self.i]}


def ort_side(model_path: Path, calib: np.ndarray, evals: np.ndarray, workdir: Path) -> list[dict[str, Any]]:
    """Fully quantized per-tensor and per-channel models from ONNX Runtime's quantizer: size and agreement."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reference = top1(_session(model_path), evals)
    pre = workdir / "ort-pre.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        quant_pre_process(str(model_path), str(pre))
    input_name = onnx.load(str(pre), load_external_data=False).graph.input[0].name
    rows = []
    for per_channel in (False, True):
        out = workdir / f"ort-{'per-channel' if per_channel else 'per-tensor'}.onnx"
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(pre),
                str(out),
                _Reader(input_name, calib),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "recipe": "per-channel" if per_channel else "per-tensor",
                "seconds": seconds,
                "size_bytes": out.stat().st_size,
                "agreement": float((top1(_session(out), evals) == reference).mean()),
                "n": len(evals),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# tuneqn side: the only place that knows the shape of report.json


def read_answer(report: dict[str, Any]) -> dict[str, Any] | None:
    """tuneqn's printed answer, from ``report["answer"]`` (CONTRACTS.md §2); None without one.

    Of the per-device picks (one per device; the quick form has one local device), the one that
    missed the constraint, else the largest, stands for tuneqn: the ratio is then the worst case.
    """
    picks = [p for p in (report.get("answer") or {}).get("picks") or [] if p.get("scope") == "device"]
    if not picks:
        return None
    pick = min(picks, key=lambda p: (bool(p.get("met")), -(p.get("size_bytes") or 0)))
    loss = pick.get("accuracy_loss")
    return {
        "model": pick.get("model"),
        "device": pick.get("device"),
        "met": pick.get("met"),
        "candidate": pick.get("candidate"),
        "recipe": pick.get("recipe"),
        "label": pick.get("label"),
        "size_bytes": pick.get("size_bytes"),
        "accuracy_loss": loss,
        "agreement": None if loss is None else 1 - loss,
        "n": pick.get("n"),
        "loss_ci95": pick.get("loss_ci95"),
        "float_layers": pick.get("float_layers") or [],
        "runtime": pick.get("runtime") or {},
        "warnings": pick.get("warnings") or [],
        "picks": len(picks),
    }


def tuneqn_side(quick: list[str], out: Path, tuneqn: list[str]) -> dict[str, Any] | None:
    """Run the tuneqn command and read its answer; None if tuneqn refuses the command.

    From ``report.json``: the ``answer`` pick (:func:`read_answer`), and from ``"searches"``
    (``{"evaluations", "screenings", "front_done_after_s", "target": {"id", "found_after_s"} | null}``)
    the work done; from the pick's own full results in ``"candidates"``, when it was found (seconds from the
    command's start: preparing, calibrating and the recipe gate count, as NNCF's wall time counts its own).
    """
    cmd = [*tuneqn, *tuneqn_command(quick, out)]
    print("running:", " ".join(cmd), flush=True)
    load_before = os.getloadavg()[0]
    start_epoch = time.time()  # the searches' times are unix seconds since their own start: count from here
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - t0
    load = [load_before, os.getloadavg()[0]]
    if proc.returncode == 2:
        print("tuneqn's side is not available yet (tuneqn refused the command):", file=sys.stderr)
        print("  " + "\n  ".join(proc.stdout.strip().splitlines()[-3:]), file=sys.stderr)
        return None
    if proc.returncode != 0:
        print(proc.stdout[-4000:], file=sys.stderr)
        raise SystemExit(f"tuneqn tune exited with {proc.returncode}")
    print("tuneqn printed, last lines:\n  " + "\n  ".join(proc.stdout.rstrip().splitlines()[-12:]), flush=True)
    report = json.loads((out / "report.json").read_text())
    searches = report.get("searches") or []
    answer = read_answer(report)
    if answer is None:
        print("report.json has no answer section (a tuneqn before issue 16)", file=sys.stderr)
    cand = answer["candidate"] if answer else None

    def since_command(s: dict[str, Any], after: float) -> float:
        """Seconds from the command's start (a search starts after the model is prepared and calibrated)."""
        started = s.get("started_at")
        return after + (started - start_epoch if isinstance(started, int | float) else 0.0)

    # When the pick had its full result on every device (whatever search asked for it), from the command's start.
    pick_row = next((c for c in report.get("candidates") or [] if c.get("id") == cand), None)
    done_at = [r.get("finished_at") for r in (pick_row or {}).get("results") or []]
    found = (
        [max(done_at) - start_epoch]
        if done_at and all(isinstance(t, int | float) for t in done_at)
        else [
            since_command(s, s["target"]["found_after_s"])
            for s in searches
            if cand is not None
            and (s.get("target") or {}).get("id") == cand
            and s["target"].get("found_after_s") is not None
        ]
    )
    fronts = [since_command(s, s["front_done_after_s"]) for s in searches if s.get("front_done_after_s") is not None]
    return {
        **(answer or {}),
        "seconds": seconds,
        "evaluations": sum(int(s.get("evaluations", 0)) for s in searches),
        "screenings": sum(int(s.get("screenings", 0)) for s in searches),
        "found_after_s": found[0] if found else None,
        "front_done_after_s": max(fronts) if fronts else None,
        "load": load,
    }


# ---------------------------------------------------------------------------------------------
# Table


def _fmt(v: Any, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _earlier_nncf_runs(files: list[Path], data: PreparedData) -> list[dict[str, Any]]:
    """NNCF's runs from earlier ``--json`` outputs on exactly these samples (UserError otherwise)."""
    runs: list[dict[str, Any]] = []
    for f in files:
        earlier = json.loads(f.read_text())
        got = earlier.get("samples", {})
        if (got.get("eval_sha256"), got.get("calibration_sha256")) != (data.eval.sha256, data.calibration.sha256):
            raise UserError(f"--nncf-from: {f} was measured on other samples (sha256 differs)")
        runs.extend(earlier["nncf"])
        print(f"NNCF: {len(earlier['nncf'])} runs from {f} (same samples)", flush=True)
    return runs


def summary(
    model: str, nncf_runs: list[dict[str, Any]], tq: dict[str, Any] | None, ort_rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """Print the side-by-side table and return the figures (JSON-ready)."""
    within = [r for r in nncf_runs if r["agreement"] >= 1 - MAX_DROP] or nncf_runs
    n = min(within, key=lambda r: r["size_bytes"])  # NNCF at its best
    nncf_s = float(np.median([r["seconds"] for r in nncf_runs if r["ranking_subset"] == n["ranking_subset"]]))
    t = tq or {}
    mb = lambda b: None if b is None else b / 1e6  # noqa: E731  (MB as in tuneqn's reports)
    rows = [
        ("wall time (s)", _fmt(nncf_s, ".1f"), _fmt(t.get("seconds"), ".1f")),
        ("  time to model (s)", _fmt(nncf_s, ".1f"), _fmt(t.get("found_after_s"), ".1f")),
        ("  whole front (s)", "–", _fmt(t.get("front_done_after_s"), ".1f")),
        (
            "evaluations",
            f"{n['validation_calls']} calls / {n['validation_images']} images",
            "–" if not t else f"{t['evaluations']} (+{t['screenings']} screenings)",
        ),
        ("size (MB)", _fmt(mb(n["size_bytes"]), ".2f"), _fmt(mb(t.get("size_bytes")), ".2f")),
        (
            "agreement (n)",
            f"{n['agreement']:.3f} ({n['n']})",
            "–" if t.get("agreement") is None else f"{t['agreement']:.3f} ({t.get('n')})",
        ),
        (
            "float ops",
            f"{len(n['reverted_ops'])} of {n['quantized_ops']}",
            "–" if not t else str(len(t.get("float_layers", []))),
        ),
        (
            "load before/after",
            "/".join(f"{x:.1f}" for x in n["load"]),
            "/".join(f"{x:.1f}" for x in t["load"]) if t else "–",
        ),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"\n{model} (FP32 {n['fp32_size_bytes'] / 1e6:.2f} MB)")
    print(f"{'':{w}}  {'NNCF ' + n['nncf_version']:>28}  {'tuneqn answer ' + str(MAX_LOSS):>28}")
    for label, a, b in rows:
        print(f"{label:{w}}  {a:>28}  {b:>28}")
    for r in ort_rows:
        print(
            f"ONNX Runtime {r['recipe']:12} fully quantized: {r['size_bytes'] / 1e6:.2f} MB, "
            f"agreement {r['agreement']:.3f} (n {r['n']}), {r['seconds']:.1f} s"
        )
    if len(nncf_runs) > 1:
        each = ", ".join(
            f"ranking subset {r['ranking_subset']}: {r['size_bytes'] / 1e6:.2f} MB, agreement "
            f"{r['agreement']:.3f}, {r['seconds']:.1f} s / {r['validation_calls']} calls"
            for r in nncf_runs
        )
        print(f"NNCF runs: {each} (the smallest within the drop is NNCF's column; median time of its setting)")
    reverted = n["reverted_ops"]
    print(
        f"NNCF (ranking subset {n['ranking_subset']} images) reverted {len(reverted)} of {n['quantized_ops']} "
        f"quantized ops: {', '.join(reverted) or '–'}"
    )
    ratios = {
        "size": _ratio(t.get("size_bytes"), n["size_bytes"]),
        "time_to_model": _ratio(t.get("found_after_s"), nncf_s),
        "run_time": _ratio(t.get("seconds"), nncf_s),
    }
    if tq is None:
        print("tuneqn's side is not available: ratios not computed")
    else:
        if t.get("same_samples") is not None:
            print(f"{'same samples as tuneqn stored':38} {'yes' if t['same_samples'] else 'NO'}")
        for key, label, limit in (
            ("size", "tuneqn size / NNCF size", 1.02),
            ("time_to_model", "tuneqn time to model / NNCF time", 0.5),
            ("run_time", "tuneqn whole run time / NNCF time", 1.0),
        ):
            r = ratios[key]
            verdict = "–" if r is None else ("met" if r <= limit else "MISSED")
            print(f"{label:38} {_fmt(r, '.2f'):>6}  (target <= {limit}: {verdict})")
        loss = t.get("accuracy_loss")
        ok = loss is not None and loss <= MAX_LOSS + 1e-9  # 0.99 meets 1 - 0.01
        print(
            f"{'tuneqn accuracy loss <= ' + str(MAX_LOSS):38} {_fmt(loss, '.3f'):>6}  "
            f"({'met' if ok else 'MISSED'}; interval {t.get('loss_ci95') or '–'})"
        )
    return {
        "model": model,
        "nncf": nncf_runs,
        "nncf_seconds_median": nncf_s,
        "tuneqn": tq,
        "ort": ort_rows,
        "ratios": ratios,
        "max_drop": MAX_DROP,
        "max_loss": MAX_LOSS,
    }


def main() -> int:
    """Run both sides and print the comparison."""
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        usage="%(prog)s (--model M.onnx --images DIR [--preprocess PRESET] | --study S.toml) "
        "[options] [-- more tuneqn flags]",
    )
    ap.add_argument("--model", type=Path, help="ONNX model (the quick form)")
    ap.add_argument("--images", type=Path, help="image folder (the quick form)")
    ap.add_argument(
        "--preprocess", metavar="PRESET", help="tuneqn's --preprocess preset (imagenet, inception, lite, raw, unit)"
    )
    ap.add_argument("--study", type=Path, help="a study TOML instead of the quick form")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    ap.add_argument("--runs", type=int, default=1, help="NNCF runs (the table uses the median time)")
    ap.add_argument(
        "--ranking-subset",
        type=int,
        nargs="+",
        default=RANKING_SUBSETS,
        help="NNCF's ranking_subset_size, one run each (default: 20 and 0, NNCF's own default, "
        "300, i.e. all evaluation images); the smallest model within the drop is NNCF's",
    )
    ap.add_argument(
        "--nncf-from",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="take NNCF's runs from earlier --json outputs instead of running NNCF again (their samples' "
        "sha256 must equal this command's)",
    )
    ap.add_argument("--skip-tuneqn", action="store_true", help="NNCF (and ONNX Runtime) side only")
    ap.add_argument("--no-ort", action="store_true", help="leave out ONNX Runtime's fully quantized models")
    ap.add_argument(
        "--keep", type=Path, metavar="DIR", help="keep tuneqn's study and the models here (default: a temporary folder)"
    )
    ap.add_argument(
        "--tuneqn",
        nargs="+",
        default=[sys.executable, "-m", "tuneqn.controller"],
        help="command that runs tuneqn (default: this Python's tuneqn.controller)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.runs < 1:
        print("--runs must be at least 1", file=sys.stderr)
        return 2
    if any(k < 0 for k in args.ranking_subset):
        print("--ranking-subset must be 0 (NNCF's default) or more", file=sys.stderr)
        return 2
    if args.study is not None:
        if args.model or args.images or args.preprocess:
            print("give either --study or --model/--images/--preprocess", file=sys.stderr)
            return 2
        quick = [str(args.study), *extra]
    elif args.model is None or args.images is None:
        print("give --model and --images (and --preprocess), or --study", file=sys.stderr)
        return 2
    else:
        quick = [
            "--model",
            str(args.model),
            "--images",
            str(args.images),
            *(["--preprocess", args.preprocess] if args.preprocess else []),
            *extra,
        ]
    try:
        import nncf  # noqa: F401
    except ImportError:
        print("nncf is not installed: pip install -r bench/requirements-peers.txt", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp_s:
        tmp = args.keep.resolve() if args.keep else Path(tmp_s)
        tmp.mkdir(parents=True, exist_ok=True)
        tq_out = tmp / "tuneqn"
        try:
            cfg, data = samples(quick, tq_out, tmp / "bench")
        except UserError as exc:
            print(exc, file=sys.stderr)
            return 2
        model_path = Path(cfg.models[0].path)
        name = cfg.models[0].display_name
        calib, evals = data.calibration.load(), data.eval.load()
        pp = describe_preprocess(cfg.dataset.preprocess, model_hw(list(evals.shape), cfg.dataset.preprocess))
        print(
            f"{name} ({model_path}): {len(calib)} calibration and {len(evals)} evaluation images "
            f"(tuneqn's samples, seed {cfg.dataset.seed}); preprocessing: {pp}; "
            f"load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        runs = _earlier_nncf_runs(args.nncf_from, data) if args.nncf_from else []
        for i, subset in enumerate(
            [] if args.nncf_from else [k for k in args.ranking_subset for _ in range(args.runs)]
        ):
            r = nncf_side(model_path, calib, evals, tmp, subset or None)
            print(
                f"NNCF run {i + 1}: {r['seconds']:.1f} s, {r['validation_calls']} validation calls, "
                f"{r['size_bytes'] / 1e6:.2f} MB, agreement {r['agreement']:.3f} (n {r['n']}), "
                f"reverted {len(r['reverted_ops'])}, ranking subset {r['ranking_subset']}",
                flush=True,
            )
            runs.append(r)
        ort_rows = [] if args.no_ort else ort_side(model_path, calib, evals, tmp)
        tq = None
        if not args.skip_tuneqn:
            tq = tuneqn_side(quick, tq_out, args.tuneqn)
            if tq is not None:
                tq["same_samples"] = same_samples(data, tq_out)
        figures = summary(f"{name} ({args.model or args.study})", runs, tq, ort_rows)
        figures.update(
            samples={
                "eval": len(evals),
                "calibration": len(calib),
                "seed": cfg.dataset.seed,
                "eval_sha256": data.eval.sha256,
                "calibration_sha256": data.calibration.sha256,
                "preprocess": pp,
            },
            command=["tuneqn", *tuneqn_command(quick, Path("OUT"))],
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
