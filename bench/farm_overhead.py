"""Farm overhead on the example model, measured in one run.

(a) wall time of ``tune`` (sweep, one local agent) / the essential work done alone in one
    process (analysis + building every candidate with calibration reused + pure ONNX
    Runtime inference of every candidate on the same images). Target <= 1.15.
(b) device-bound jobs (SIMULATED per-sample device latency on the agent): candidate
    building overlaps with evaluation, so evaluation-phase wall <= 1.1 x total device
    time; and 2 agents of one device class give >= 1.8 x the throughput of 1.
(c) speed-up over the paper's loop (recalibrate every candidate, evaluate one after another
    in one process).

Usage: python bench/farm_overhead.py [--example examples/lite0/work] [--step 5] [--sim-ms 80]
In (b) every agent runs ONNX Runtime with one intra-op thread (two agents share this 2-core host).
Latency measurement is off (latency_repeats = 0) in every timed run so all sides do the same work.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import onnxruntime as ort

from tuneqn.controller.config import parse_config
from tuneqn.controller.farm.jobs import Endpoint, FarmSettings
from tuneqn.controller.farm.local import LocalAgent
from tuneqn.controller.orchestrator import tune
from tuneqn.controller.quantize.quantizer import calibration_reader, quantize_static_file
from tuneqn.controller.study import Study


def _config(example: Path, out: Path, step: int) -> dict[str, Any]:
    return {
        "name": "bench",
        "out_dir": str(out),
        "models": [{"name": "lite0", "path": str(example / "model.onnx"), "input_shape": [1, 3, 224, 224]}],
        "dataset": {
            "images": str(example / "images"),
            "eval": 100,
            "calibration": 20,
            "analysis": 8,
            "preprocess": {
                "resize": 256,
                "crop": 224,
                "interpolation": "bicubic",
                "scale": 1 / 128,
                "offset": -127 / 128,
            },
        },
        "quantization": {"modes": ["static"]},
        "search": {"step": step},
        "evaluation": {"latency_repeats": 0, "latency_warmup": 0},
    }


def _settings(threads: int = 0) -> FarmSettings:
    return FarmSettings(latency_repeats=0, latency_warmup=0, intra_op_threads=threads)


def _infer(path: str, x: Any, disabled: list[str]) -> None:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    name = sess.get_inputs()[0].name
    for i in range(len(x)):
        sess.run(None, {name: x[i : i + 1]})


def run_tune(
    cfg: dict[str, Any], endpoints: list[Endpoint] | None = None, sim_ms: float = 0.0, threads: int = 0
) -> float:
    """Wall seconds of one tune run."""
    study = Study(parse_config(cfg, Path.cwd()))
    t0 = time.perf_counter()
    try:
        tune(
            study,
            endpoints or [],
            _settings(threads),
            local_agent_args=["--simulated-latency-ms", str(sim_ms)] if sim_ms else None,
        )
    finally:
        study.close()
    return time.perf_counter() - t0


def essential(cfg: dict[str, Any]) -> float:
    """Analysis + candidates (calibration reused) + pure ORT inference, alone in one process."""
    study = Study(parse_config(cfg, Path.cwd()))
    t0 = time.perf_counter()
    try:
        study.prepare()
        study.analyze_all()
        x = study.eval_split("lite0").load()
        _infer(str(study.models["lite0"].path), x, [])
        for plan in study.all_plans():
            row = study.build(plan)
            _infer(row["path"], x, row["runtime"]["ort_disabled_optimizers"])
    finally:
        study.close()
    return time.perf_counter() - t0


def paper_loop(cfg: dict[str, Any], ranking_from: Path) -> float:
    """Recalibrate for every candidate and evaluate one after another in one process."""
    study = Study(parse_config(cfg, Path.cwd()))
    t0 = time.perf_counter()
    try:
        study.prepare()
        study.analyze_all()
        pm = study.models["lite0"]
        calib = study.data["lite0"].calibration.load()
        x = study.eval_split("lite0").load()
        _infer(str(pm.path), x, [])
        settings = study.settings("static")
        with tempfile.TemporaryDirectory() as tmp:
            for i, plan in enumerate(study.all_plans()):
                out = Path(tmp) / f"c{i}.onnx"
                quantize_static_file(
                    pm.path,
                    out,
                    settings,
                    list(plan.excluded),
                    Path(tmp) / f"cal{i}.json",
                    calibration_reader(pm.input_name, calib, pm.input_shape[0], settings),
                )
                _infer(str(out), x, ["WeightBiasQuantization"] if plan.excluded else [])
    finally:
        study.close()
    return time.perf_counter() - t0


def device_seconds(out: Path) -> float:
    """Total device time of the jobs (the agents' prediction passes) from the stored results."""
    con = sqlite3.connect(out / "tuneqn.db")
    return sum(json.loads(info)["inference_seconds"] for (info,) in con.execute("select info from results"))


def reset_evaluation(src: Path, dst: Path) -> None:
    """Copy a study keeping data, calibration and analysis; drop candidates, jobs and results."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "candidates", ignore_errors=True)
    shutil.rmtree(dst / "agents", ignore_errors=True)  # a fresh local agent: no stored results to hand back
    con = sqlite3.connect(dst / "tuneqn.db")
    for table in ("candidates", "jobs", "results", "devices"):
        con.execute(f"delete from {table}")  # noqa: S608 - fixed names
    con.commit()
    con.close()


def main() -> int:
    """Run all three measurements and print the ratios."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step", type=int, default=5)
    ap.add_argument("--sim-ms", type=float, default=80.0, help="simulated device latency per sample (ms)")
    args, ex = benchlib.parse_example(ap)
    if ex is None:
        return 2
    with tempfile.TemporaryDirectory(prefix="tuneqn-bench-") as tmp_s:
        tmp = Path(tmp_s)
        t_tune = run_tune(_config(ex, tmp / "a-tune", args.step))
        t_ess = essential(_config(ex, tmp / "a-essential", args.step))
        n_jobs = sqlite3.connect(tmp / "a-tune" / "tuneqn.db").execute("select count(*) from results").fetchone()[0]
        print(
            f"(a) tune, one local agent: {t_tune:.1f} s for {n_jobs} jobs; essential work alone: {t_ess:.1f} s; "
            f"ratio {t_tune / t_ess:.3f} (target <= 1.15)"
        )

        # (b) device-bound jobs: analysis stored, candidates built while the agent evaluates
        reset_evaluation(tmp / "a-tune", tmp / "b1")
        t_b1 = run_tune(_config(ex, tmp / "b1", args.step), sim_ms=args.sim_ms, threads=1)
        dev1 = device_seconds(tmp / "b1")
        print(
            f"(b) SIMULATED {args.sim_ms:g} ms/sample: 1 agent wall {t_b1:.1f} s vs total device time {dev1:.1f} s; "
            f"ratio {t_b1 / dev1:.3f} (target <= 1.1)"
        )
        reset_evaluation(tmp / "a-tune", tmp / "b2")
        agents = [
            LocalAgent(
                tmp / f"agent-{i}",
                device_name=f"sim{i}",
                extra_args=["--device-class", "sim", "--simulated-latency-ms", str(args.sim_ms)],
            )
            for i in range(2)
        ]
        for a in agents:
            a.start()
        try:
            t_b2 = run_tune(
                _config(ex, tmp / "b2", args.step), endpoints=[Endpoint(address=a.address) for a in agents], threads=1
            )
        finally:
            for a in agents:
                a.stop()
        dev2 = device_seconds(tmp / "b2")
        per_agent = (
            sqlite3.connect(tmp / "b2" / "tuneqn.db")
            .execute("select agent, count(*) from results group by agent")
            .fetchall()
        )
        print(
            f"    2 agents of one device class: wall {t_b2:.1f} s (device time {dev2:.1f} s, jobs per agent "
            f"{[n for _, n in per_agent]}); throughput x{t_b1 / t_b2:.2f} of 1 agent (target >= 1.8)"
        )

        t_paper = paper_loop(_config(ex, tmp / "c-paper", args.step), tmp / "a-tune")
        print(
            f"(c) paper loop (recalibrate + evaluate sequentially): {t_paper:.1f} s; tune: {t_tune:.1f} s; "
            f"speed-up x{t_paper / t_tune:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
