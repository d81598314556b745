"""Precision levels against in-or-out: the default search (int4 weights where they cost nothing, fp32 exclusions)
beside the same search restricted to the paper's binary candidates, in one study per model.

Usage: python bench/levels.py [--example examples/lite0/work] [--example examples/lite1/work] [--json FILE]

For each prepared example (``make example``; Lite1: ``python examples/lite0/prepare.py --variant lite1``) one
``tuneqn tune`` runs in the quick form's settings (auto recipes, 100 evaluation photos, 20 calibration, the
model's own preprocessing ``--preprocess lite``) with two searches over the same recipes: the default
(``budget/measured``: levels fp32, int8, int4) and ``budget/measured{binary}`` (levels fp32 and int8 only), with
the same budget each. Both share the fully quantized models and the measured ranking's screens, so the only
difference is the candidates they choose. Printed per model:

* each search's top front over all recipes on the device: size (MB), agreement with FP32, latency (median ms);
* which front dominates: every binary point has a level point at least as good in size and agreement;
* the answer: the smallest candidate with ≤ 1 % loss per search, its file size against the fully quantized int8
  model's, its latency, and the layers it gives a level other than int8 (fp32 float, int4 weights).

Timings on a shared machine are noisy: run it alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w

BINARY = "budget/measured{binary}"
LEVELS = "budget/measured"


def _study(example: Path, out: Path) -> Path:
    """The study: the quick form's settings plus the binary search beside the default one."""
    data = {
        "name": example.parent.name,
        "out_dir": str(out),
        "models": [{"name": example.parent.name, "path": str(example / "model.onnx")}],
        "dataset": {
            "images": str(example / "images"),
            "eval": 100,
            "calibration": 20,
            "preprocess": {"preset": "lite"},
        },
        "search": {"compare": [{"strategy": "budget", "ranking": "measured", "levels": ["fp32", "int8"]}]},
        "objectives": [{"name": "accuracy_loss"}, {"name": "size"}, {"name": "latency"}],
    }
    path = out.parent / f"{example.parent.name}.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def _points(report: dict[str, Any], search: str) -> list[dict[str, Any]]:
    """The full results of the candidates ``search`` proposed (every recipe), one per candidate and device."""
    out = []
    for c in report["candidates"]:
        if not any(p.get("search") == search and p.get("level") == "full" for p in c.get("proposed_by") or []):
            continue
        for r in c.get("results") or []:
            if r.get("status") == "done" and r.get("agreement") is not None:
                out.append(
                    {
                        "id": c["id"],
                        "recipe": c["recipe"],
                        "label": c["label"],
                        "size": c["size_bytes"],
                        "agreement": r["agreement"],
                        "latency_ms": r.get("latency_ms"),
                        "float": c.get("excluded") or [],
                        "levels": c.get("levels") or {},
                    }
                )
    return out


def _front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points no other point beats in size and agreement (smallest first)."""
    front = [
        p
        for p in points
        if not any(
            q["size"] <= p["size"]
            and q["agreement"] >= p["agreement"]
            and (q["size"], q["agreement"]) != (p["size"], p["agreement"])
            for q in points
        )
    ]
    return sorted({(p["size"], p["agreement"]): p for p in front}.values(), key=lambda p: p["size"])


def _dominates(levels: list[dict[str, Any]], binary: list[dict[str, Any]]) -> bool:
    """Every binary front point has a level point at least as small and at least as accurate."""
    return all(any(q["size"] <= p["size"] and q["agreement"] >= p["agreement"] for q in levels) for p in binary)


def _answer(points: list[dict[str, Any]], max_loss: float = 0.01) -> dict[str, Any] | None:
    ok = [p for p in points if 1.0 - p["agreement"] <= max_loss + 1e-12]
    return min(ok, key=lambda p: (p["size"], -p["agreement"])) if ok else None


def _fmt(p: dict[str, Any] | None) -> str:
    if p is None:
        return "–"
    lat = f"{p['latency_ms']:.2f} ms" if p.get("latency_ms") is not None else "? ms"
    return f"{p['size'] / 1e6:.3f} MB  agreement {p['agreement']:.2f}  {lat}  ({p['recipe']} {p['label']})"


def run(example: Path, work: Path) -> dict[str, Any]:
    """One model's study and its figures."""
    out = work / example.parent.name
    study = _study(example, out)
    cmd = [str(Path(sys.executable).with_name("tuneqn")), "tune", str(study), "--no-lab"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-600:]}")
    report = json.loads((out / "report.json").read_text())
    fq = [
        c["size_bytes"]
        for c in report["candidates"]
        if c.get("k") == 0 and not c.get("levels") and any(r.get("status") == "done" for r in c.get("results") or [])
    ]
    binary, levels = _front(_points(report, BINARY)), _front(_points(report, LEVELS))
    searches = {s["name"]: s for s in report.get("searches") or []}
    return {
        "model": example.parent.name,
        "wall_s": wall,
        "fq_int8_bytes": min(fq) if fq else None,
        "fp32_bytes": report["models"][0]["size_bytes"],
        "binary_front": binary,
        "level_front": levels,
        "dominates": _dominates(levels, binary),
        "binary_answer": _answer(_points(report, BINARY)),
        "level_answer": _answer(_points(report, LEVELS)),
        "evaluations": {name: searches.get(name, {}).get("evaluations") for name in (LEVELS, BINARY)},
        "screenings": {name: searches.get(name, {}).get("screenings") for name in (LEVELS, BINARY)},
    }


def show(r: dict[str, Any]) -> None:
    """Print one model's figures."""
    fq = r["fq_int8_bytes"]
    print(f"\n== {r['model']}: FP32 {r['fp32_bytes'] / 1e6:.2f} MB, smallest int8-everything {fq / 1e6:.3f} MB")
    print(f"   study {r['wall_s']:.0f} s; full evaluations {r['evaluations']}; screens {r['screenings']}")
    rows = max(len(r["binary_front"]), len(r["level_front"]))
    print(f"   {'binary front (fp32 or int8)':<62} | level front (fp32, int8, int4)")
    for i in range(rows):
        b = r["binary_front"][i] if i < len(r["binary_front"]) else None
        lv = r["level_front"][i] if i < len(r["level_front"]) else None
        print(f"   {_fmt(b):<62} | {_fmt(lv)}")
    print(f"   level front dominates the binary front: {'yes' if r['dominates'] else 'NO'}")
    for name in ("binary_answer", "level_answer"):
        p = r[name]
        print(f"   {name.replace('_', ' ')} (≤ 1 % loss): {_fmt(p)}")
        if p is not None:
            ratio = p["size"] / fq if fq else float("nan")
            print(f"      {ratio:.3f} × the int8-everything size; float layers: {', '.join(p['float']) or 'none'}")
            int4 = sorted(layer for layer, lv in p["levels"].items() if lv == "int4")
            print(f"      int4 layers ({len(int4)}): {', '.join(int4) or 'none'}")


def main() -> int:
    """Run the benchmark."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--example", type=Path, action="append", help="a prepared example (repeatable)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--work", type=Path, help="keep the studies here (default: a temporary folder)")
    args = ap.parse_args()
    examples = args.example or [p for p in (Path("examples/lite0/work"), Path("examples/lite1/work")) if p.is_dir()]
    missing = [e for e in examples if not (e / "model.onnx").is_file()]
    if not examples or missing:
        where = missing[0] if missing else "examples/lite0/work"
        print(f"example not prepared: {where} (make example)", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory(prefix="tuneqn-levels-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for ex in examples:
            r = run(ex.resolve(), work)
            show(r)
            results.append(r)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
