"""Lab scale: N loopback agents with SIMULATED device time × M small models, one real ``tuneqn tune``.

N real ``tuneqn-agent`` processes (ONNX Runtime, port 0, one intra-op thread, ``--simulated-latency-ms``
per sample; ``--classes`` device classes, agents dealt round-robin) and M small CNNs built with
onnx.helper (6–12 Conv layers, 16–40 channels, 16–28 px inputs, a few hundred KB; different per
model). The controller is ``python -m tuneqn.controller tune study.toml`` as a child process, once
per row: the paper's sweep (``--strategy sweep --ranking paper``) and the default search
(``budget``/``measured``). Latency measurement is off (``latency_repeats = 0``), so a job's device time
is its simulated time plus a few ms of real inference.

Per row it prints the wall time of ``tune`` against the ideal (the simulated device time of the jobs
actually run / N: every device busy from the first second to the last), the controller's CPU seconds
per job and peak RSS (``os.wait4`` of the tune process alone), the agents' CPU over the run, and where
the wall time went (from the store's timestamps): until the first job was registered, until the first
result, until the last analysis, and the tail after the last result.

    python bench/scale.py                          # 32 agents × 10 models, 300 ms/sample, both rows
    python bench/scale.py --agents 8 --models 3 --sim-ms 100 --strategy sweep
    python bench/scale.py --profile /tmp/prof      # the controller's CPU per function, every thread (cProfile)

Measured (defaults: 32 agents × 10 models, 300 ms/sample, 40 samples, auto recipes; 2 shared cores, load 2–9):
before the pipelining (c194dd0) sweep 2.52 × the ideal (572 ms controller CPU per job; the last analysis at
190 s, 65 s of report after the last result), budget 3.29 × (477 ms/job); after, sweep 1.09 × (240 ms/job,
tail 5 s), budget 1.33 × (190 ms/job; its search waits on its own results, so devices idle near the end).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import tomli_w
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from onnx_models import _save_classifier, write_images  # noqa: E402

from tuneqn.controller.farm.local import LocalAgent  # noqa: E402

#: (strategy, ranking) of each row; "sweep" is the paper's, "budget" the default search.
ROWS = {"sweep": ("sweep", "paper"), "budget": ("budget", "measured")}


def chain_cnn(path: Path, seed: int, layers: int, channels: int, size: int) -> Path:
    """``layers`` Conv+Relu (3×3, ``channels`` wide, every third one stride 2) → GAP → Flatten → Gemm (10)."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    prev, cin = "input", 3
    for i in range(layers):
        name = f"conv{i}"
        w = rng.normal(0, (2.0 / (9 * cin)) ** 0.5, (channels, cin, 3, 3)).astype(np.float32)
        b = rng.normal(0, 0.05, channels).astype(np.float32)
        stride = 2 if i % 3 == 2 else 1
        nodes += [
            helper.make_node(
                "Conv",
                [prev, f"{name}.W", f"{name}.B"],
                [f"c{i}"],
                name=name,
                pads=[1, 1, 1, 1],
                strides=[stride, stride],
            ),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        inits += [numpy_helper.from_array(w, f"{name}.W"), numpy_helper.from_array(b, f"{name}.B")]
        prev, cin = f"r{i}", channels
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.W", "fc.B"], ["logits"], name="fc", transB=1),
    ]
    inits += [
        numpy_helper.from_array(rng.normal(0, 0.5, (10, channels)).astype(np.float32), "fc.W"),
        numpy_helper.from_array(rng.normal(0, 0.1, 10).astype(np.float32), "fc.B"),
    ]
    return _save_classifier(path, f"chain{seed}", nodes, inits, "N", size, 17)


def make_models(folder: Path, m: int) -> list[Path]:
    """M different small models (depth, width and input size vary with the index)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [
        chain_cnn(
            folder / f"m{i:02d}.onnx",
            seed=i,
            layers=6 + (i * 5) % 7,
            channels=(16, 24, 32, 40)[i % 4],
            size=(16, 20, 24, 28)[(i // 2) % 4],
        )
        for i in range(m)
    ]


def start_agents(root: Path, n: int, classes: int, sim_ms: float) -> list[LocalAgent]:
    """N agents, started in parallel; class ``sim<i % classes>``."""
    agents = [
        LocalAgent(
            root / f"agent-{i:02d}",
            device_name=f"d{i:02d}",
            extra_args=["--device-class", f"sim{i % classes}", "--simulated-latency-ms", str(sim_ms)],
            start_timeout=300.0,
        )
        for i in range(n)
    ]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(LocalAgent.start, agents))
    return agents


@dataclass
class Row:
    """What one tune run measured."""

    name: str
    wall: float
    ideal: float
    jobs: int
    cpu: float
    rss_mb: float
    agent_cpu: float
    first_job: float
    first_result: float
    last_analysis: float
    tail: float
    device_s: float
    rc: int


def write_study(folder: Path, models: list[Path], images: Path, agents: list[LocalAgent], eval_n: int) -> Path:
    """The study file: every model, one shared image folder, the agents, latency off."""
    data: dict[str, Any] = {
        "name": "scale",
        "out_dir": str(folder / "out"),
        "models": [{"name": p.stem, "path": str(p)} for p in models],
        "dataset": {"images": str(images), "eval": eval_n, "calibration": 16, "analysis": 8},
        "search": {"screen_samples": max(1, eval_n // 3)},
        "evaluation": {"latency_repeats": 0, "latency_warmup": 0, "intra_op_threads": 1},
        "agents": [{"address": a.address, "name": a.device_name} for a in agents],
    }
    path = folder / "study.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def run_row(
    name: str, folder: Path, study: Path, agents: list[LocalAgent], recipes: list[str], profile: Path | None
) -> Row:
    """One ``tune`` run; the agents keep running (their results of an earlier row are not reused: new out dir,
    but identical jobs would be answered from the agents' stores, so each row gets fresh agents)."""
    strategy, ranking = ROWS[name]
    cmd = [
        sys.executable,
        *([__file__, PROFILED, str(profile)] if profile else ["-m", "tuneqn.controller"]),
        "tune",
        str(study),
        "--strategy",
        strategy,
        "--ranking",
        ranking,
        "--no-lab",
    ]
    if recipes != ["auto"]:
        cmd += [f for r in recipes for f in ("--recipe", r)]
    t0 = time.time()
    with open(folder / "tune.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603 - our own interpreter
        _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    db = folder / "out" / "tuneqn.db"
    con = sqlite3.connect(db)
    rows = con.execute("select simulated, num_samples, finished_at, info from results").fetchall()
    sim = sum(s * n / 1000.0 for s, n, _, _ in rows)
    device_s = sum(json.loads(info)["inference_seconds"] for *_, info in rows)
    first_job = con.execute("select min(created_at) from jobs").fetchone()[0] or t0
    last_result = max((f for _, _, f, _ in rows), default=t0)
    first_result = min((f for _, _, f, _ in rows), default=t0)
    last_analysis = con.execute("select max(created_at) from analyses").fetchone()[0] or t0
    con.close()
    return Row(
        name,
        wall,
        sim / len(agents),
        len(rows),
        ru.ru_utime + ru.ru_stime,
        ru.ru_maxrss / 1024,
        0.0,
        first_job - t0,
        first_result - t0,
        last_analysis - t0,
        t0 + wall - last_result,
        device_s,
        proc.returncode,
    )


PROFILED = "_profiled"


def profiled(out: Path, argv: list[str]) -> int:
    """``tuneqn ARGV`` with every thread under cProfile timing thread CPU (``time.thread_time``), so the stats
    say where the controller's CPU went (not its waits); written to ``out`` (pstats) and ``out``.txt."""
    import cProfile
    import pstats
    import threading

    from tuneqn.controller.cli import main as cli_main

    profiles: list[cProfile.Profile] = []
    run = threading.Thread.run

    def profiled_run(self: threading.Thread) -> None:
        prof = cProfile.Profile(time.thread_time)
        profiles.append(prof)
        prof.enable()
        try:
            run(self)
        finally:
            prof.disable()

    threading.Thread.run = profiled_run  # type: ignore[method-assign]
    main_prof = cProfile.Profile(time.thread_time)
    main_prof.enable()
    try:
        rc = cli_main(argv)
    finally:
        main_prof.disable()
        stats = pstats.Stats(main_prof)
        for prof in profiles:
            stats.add(prof)
        stats.dump_stats(str(out))
        with open(f"{out}.txt", "w") as f:
            pstats.Stats(str(out), stream=f).sort_stats("tottime").print_stats(60)
            pstats.Stats(str(out), stream=f).sort_stats("cumulative").print_stats(80)
    return rc


def main() -> int:
    """Build the models, start the agents, run each row, print the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", "-n", type=int, default=32, help="loopback agents (default 32)")
    ap.add_argument("--models", "-m", type=int, default=10, help="models (default 10)")
    ap.add_argument("--sim-ms", type=float, default=300.0, help="simulated device time per sample, ms (default 300)")
    ap.add_argument("--strategy", choices=[*ROWS, "both"], default="both", help="which rows (default both)")
    ap.add_argument("--classes", type=int, default=1, help="device classes the agents are dealt into (default 1)")
    ap.add_argument("--eval", type=int, default=40, help="evaluation sample per model (default 40)")
    ap.add_argument("--recipe", action="append", help="recipes (repeatable; default: auto)")
    ap.add_argument("--profile", type=Path, help="folder for a cProfile of the controller per row")
    ap.add_argument("--keep", type=Path, help="keep the run folders here")
    args = ap.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    recipes = args.recipe or ["auto"]
    names = list(ROWS) if args.strategy == "both" else [args.strategy]
    print(
        f"uptime: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1/5/15 min load), "
        f"{os.cpu_count()} cores; {args.agents} agents × {args.models} models, SIMULATED {args.sim_ms:g} ms/sample, "
        f"{args.eval} eval samples, recipes {', '.join(recipes)}"
    )
    with tempfile.TemporaryDirectory(prefix="tuneqn-scale-") as tmp_s:
        root = args.keep or Path(tmp_s)
        root.mkdir(parents=True, exist_ok=True)
        models = make_models(root / "models", args.models)
        sizes = [p.stat().st_size // 1000 for p in models]
        images = write_images(root / "images", args.eval + 16, size=32)
        print(f"models: {len(models)}, {min(sizes)}–{max(sizes)} KB")
        results: list[Row] = []
        for name in names:
            folder = root / name
            folder.mkdir()
            t = time.time()
            agents = start_agents(folder / "agents", args.agents, args.classes, args.sim_ms)
            print(f"[{name}] {len(agents)} agents up in {time.time() - t:.1f} s")
            study = write_study(folder, models, images, agents, args.eval)
            try:
                row = run_row(
                    name, folder, study, agents, recipes, args.profile / f"{name}.prof" if args.profile else None
                )
            finally:
                mid = resource.getrusage(resource.RUSAGE_CHILDREN)
                for a in agents:
                    a.stop()
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            row.agent_cpu = (after.ru_utime + after.ru_stime) - (mid.ru_utime + mid.ru_stime)
            results.append(row)
            print(
                f"[{name}] rc {row.rc}: wall {row.wall:.1f} s vs ideal {row.ideal:.1f} s → "
                f"{row.wall / max(row.ideal, 1e-9):.2f} ×; "
                f"{row.jobs} jobs; controller CPU {row.cpu:.1f} s = {1000 * row.cpu / max(row.jobs, 1):.0f} ms/job, "
                f"peak RSS {row.rss_mb:.0f} MB; agents' CPU {row.agent_cpu:.1f} s "
                f"(device time {row.device_s:.1f} s)"
            )
            print(
                f"[{name}]   from start: first job registered {row.first_job:.1f} s, first result "
                f"{row.first_result:.1f} s, last analysis {row.last_analysis:.1f} s; tail after the last result "
                f"{row.tail:.1f} s"
            )
        print("load after:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0 if all(r.rc == 0 for r in results) else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == PROFILED:
        sys.exit(profiled(Path(sys.argv[2]), sys.argv[3:]))
    sys.exit(main())
