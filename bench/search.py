"""Search strategies and rankings on the example model, against the paper's sweep, in one run.

Usage: python bench/search.py [--study examples/lite0/study.toml] [--recipes per-tensor per-channel dynamic]
                              [--searches sweep/paper greedy/measured budget/measured ...] [--json FILE]

For every recipe and every search (``strategy/ranking``; ``budget`` spends 30% of the sweep's
evaluations unless ``budgetN``; ``target1%`` is the target strategy at 1% loss) the study runs
from scratch as ``tuneqn tune`` (its own out dir, local agent, the study's other settings) and
the bench reads back every full (not screening) result. Printed per (recipe, search):

* ``HV``: hypervolume of the top front (accuracy loss, size) with both objectives normalized over
  the recipe: loss by the fully quantized model's loss, size between the fully quantized and the
  FP32 model (reference point 1.1, 1.1); the same normalization for every search of a recipe, so
  HVs compare (``HV/sweep`` = ratio to ``sweep/paper``);
* ``full``/``screen``: evaluations asked for (``eval/sweep``: full evaluations vs the sweep's);
* ``wall``: wall time of the whole ``tune`` run, and vs the sweep's;
* ``best≥0.99``: the smallest model with agreement ≥ 0.99 on its front (MB), if any.

Timings on a shared machine are noisy: run it alone.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pymoo.indicators.hv import HV
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

DEFAULT_SEARCHES = ["sweep/paper", "greedy/measured", "budget/measured", "budget/paper", "target1%/measured"]


def _flags(search: str) -> list[str]:
    strategy, ranking = search.split("/")
    flags = ["--ranking", ranking]
    if strategy.startswith("target"):
        pct = strategy.removeprefix("target").removesuffix("%") or "1"
        return [*flags, "--strategy", "target", "--max-loss", str(float(pct) / 100)]
    if strategy.startswith("budget") and strategy != "budget":
        return [*flags, "--strategy", "budget", "--budget", strategy.removeprefix("budget")]
    return [*flags, "--strategy", strategy]


def _run(study: Path, recipe: str, search: str, out: Path) -> dict[str, Any]:
    """One ``tuneqn tune`` of one recipe and one search; its full results and counts."""
    cmd = [
        str(Path(sys.executable).with_name("tuneqn")),
        "tune",
        str(study),
        "--out",
        str(out),
        "--recipe",
        recipe,
        "--no-compare",
        *_flags(search),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    report = json.loads((out / "report.json").read_text())
    points = []
    for c in report["candidates"]:
        for r in c["results"]:
            if r.get("status") == "done" and r.get("agreement") is not None:
                points.append({"id": c["id"], "loss": 1.0 - r["agreement"], "size": c["size_bytes"], "k": c["k"]})
    fq = next((p for p in points if p["k"] == 0), None)
    fp32 = report["models"][0]["size_bytes"]
    searches = report.get("searches") or [{}]
    main = searches[0]
    return {
        "wall_s": wall,
        "points": points,
        "fq": fq,
        "fp32_size": fp32,
        "full": main.get("evaluations"),
        "screen": main.get("screenings"),
        "target": main.get("target"),
        "front_done_after_s": main.get("front_done_after_s"),
    }


def _front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not points:
        return []
    F = np.array([[p["loss"], p["size"]] for p in points], dtype=float)
    first = NonDominatedSorting().do(F, only_non_dominated_front=True)
    return [points[i] for i in first]


def _hv(front: list[dict[str, Any]], fq_loss: float, fq_size: float, fp32_size: float) -> float:
    if not front:
        return 0.0
    loss_scale = fq_loss if fq_loss > 0 else 1.0
    F = np.array([[p["loss"] / loss_scale, (p["size"] - fq_size) / (fp32_size - fq_size)] for p in front])
    return float(HV(ref_point=np.array([1.1, 1.1]))(F))


def main() -> int:
    """Run every (recipe, search) and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default="examples/lite0/study.toml")
    ap.add_argument("--recipes", nargs="+", default=["per-tensor", "per-channel", "dynamic"])
    ap.add_argument("--searches", nargs="+", default=DEFAULT_SEARCHES)
    ap.add_argument("--keep", help="keep the study folders under this folder")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    study = Path(args.study).resolve()
    if not study.is_file():
        print(f"--study: {study} not found (run `make example`)", file=sys.stderr)
        return 2
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tuneqn-bench-search-"))
    rows: list[dict[str, Any]] = []
    try:
        for recipe in args.recipes:
            runs = {}
            for search in args.searches:
                out = base / recipe / search.replace("/", "-").replace("%", "pct")
                shutil.rmtree(out, ignore_errors=True)
                runs[search] = _run(study, recipe, search, out)
                print(f"  {recipe:12} {search:18} {runs[search]['wall_s']:6.1f}s", file=sys.stderr, flush=True)
            fqs = [r["fq"] for r in runs.values() if r["fq"] is not None]
            fq_loss = max(p["loss"] for p in fqs) if fqs else 1.0
            fq_size = min(p["size"] for p in fqs) if fqs else 0.0
            fp32 = next(iter(runs.values()))["fp32_size"]
            ref = runs.get("sweep/paper")
            ref_hv = _hv(_front(ref["points"]), fq_loss, fq_size, fp32) if ref else math.nan
            for search, r in runs.items():
                front = _front(r["points"])
                hv = _hv(front, fq_loss, fq_size, fp32)
                good = [p for p in front if p["loss"] <= 0.01 + 1e-9]
                rows.append(
                    {
                        "recipe": recipe,
                        "search": search,
                        "hv": hv,
                        "hv_vs_sweep": hv / ref_hv if ref_hv else math.nan,
                        "full": r["full"] if r["full"] is not None else len(r["points"]),
                        "screen": r["screen"] or 0,
                        "eval_vs_sweep": (r["full"] or len(r["points"])) / (ref["full"] or len(ref["points"]))
                        if ref
                        else math.nan,
                        "wall_s": r["wall_s"],
                        "wall_vs_sweep": r["wall_s"] / ref["wall_s"] if ref else math.nan,
                        "best_099_mb": min(p["size"] for p in good) / 1e6 if good else None,
                        "front": [{"id": p["id"], "loss": p["loss"], "size": p["size"]} for p in front],
                        "target": r["target"],
                        "front_done_after_s": r["front_done_after_s"],
                    }
                )
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(
        f"{'recipe':12} {'search':18} {'HV':>6} {'HV/sweep':>8} {'full':>5} {'screen':>6} {'eval/sweep':>10} "
        f"{'wall':>7} {'wall/sweep':>10} {'best≥0.99':>10}"
    )
    for r in rows:
        best = f"{r['best_099_mb']:.2f} MB" if r["best_099_mb"] is not None else "-"
        print(
            f"{r['recipe']:12} {r['search']:18} {r['hv']:6.3f} {r['hv_vs_sweep']:8.3f} {r['full']:5d} "
            f"{r['screen']:6d} {r['eval_vs_sweep']:10.2f} {r['wall_s']:6.0f}s {r['wall_vs_sweep']:10.2f} {best:>10}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
