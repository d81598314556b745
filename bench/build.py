"""Candidate builds on the example: graph edits (controller/quantize/edits.py) vs ONNX Runtime's quantizer.

Usage: python bench/build.py [--example examples/lite0/work] [--sets 20] [--recipes per-tensor per-channel]
                             [--no-prefixes]

Per recipe: the fully quantized model is built once by the quantizer and indexed; then ``--sets`` random
exclusion sets of the model's layers (seeded) are built both ways. Prints the median and p90 ms per candidate
of ``Study.build`` (derive, write, sha256, runtime options, store row) and of the quantizer alone, whether every
derived file is the quantizer's byte for byte, and, over every k-prefix of the paper's ranking, whether the
size predicted without a build equals the size of the file the quantizer writes.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import benchlib

from tuneqn.controller.config import RECIPE_PRESETS, parse_config
from tuneqn.controller.quantize.quantizer import quantize_candidate
from tuneqn.controller.study import Study


def _ms(xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]
    return f"median {statistics.median(xs) * 1000:7.1f} ms   p90 {p90 * 1000:7.1f} ms"


def main() -> int:
    """Run the benchmark."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", type=int, default=20)
    ap.add_argument("--recipes", nargs="+", default=["per-tensor", "per-channel"])
    ap.add_argument("--no-prefixes", action="store_true", help="skip the size check over every k-prefix")
    args, ex = benchlib.parse_example(ap)
    if ex is None:
        return 2
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        data = tomllib.loads((Path(__file__).resolve().parent.parent / "examples/lite0/study.toml").read_text())
        data["out_dir"] = str(tmp / "out")
        data["models"][0]["path"] = str(ex / "model.onnx")
        data["dataset"].update(images=str(ex / "images"), labels={"csv": str(ex / "labels.csv")})
        data["quantization"]["recipes"] = [{"name": r, **RECIPE_PRESETS[r]} for r in args.recipes]
        cfg = parse_config(data, ex)
        with Study(cfg) as study:
            study.prepare()
            model = next(iter(study.models))
            for recipe in args.recipes:
                _bench(study, model, recipe, args.sets, not args.no_prefixes, tmp)
    return 0


def _bench(study: Study, model: str, recipe: str, n_sets: int, prefixes: bool, tmp: Path) -> None:
    settings = study.settings(recipe)
    cache = study.calibration_cache(model, recipe)
    src = study.quantizer_input(model)
    layers = study.layer_names(model, recipe)
    t0 = time.perf_counter()
    study.build(study.make_plan(model, recipe, ()))
    fq_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    study.predicted_size(study.make_plan(model, recipe, layers[:1]))  # indexes the fully quantized model
    index_s = time.perf_counter() - t0
    rng = random.Random(recipe)
    sets = [sorted(rng.sample(layers, rng.randint(1, len(layers)))) for _ in range(n_sets)]
    derived, quantizer, identical = [], [], 0
    for i, exclude in enumerate(sets):
        plan = study.make_plan(model, recipe, exclude, f"bench {i}")
        t0 = time.perf_counter()
        row = study.build(plan)
        derived.append(time.perf_counter() - t0)
        ref = tmp / f"{recipe}-{i}.onnx"
        t0 = time.perf_counter()
        quantize_candidate(src, ref, settings, exclude, cache)
        quantizer.append(time.perf_counter() - t0)
        identical += Path(row["path"]).read_bytes() == ref.read_bytes()
        ref.unlink()
    print(
        f"{model} / {recipe}: {len(layers)} layers; fully quantized model (quantizer) {fq_s:.2f} s, "
        f"indexed in {index_s * 1000:.0f} ms"
    )
    print(f"  Study.build, graph edits : {_ms(derived)}   ({n_sets} random exclusion sets)")
    print(f"  quantize_static          : {_ms(quantizer)}")
    print(f"  derived == quantizer's bytes: {identical}/{n_sets}")
    if prefixes:
        order = study.ranking(model, recipe)
        exact = 0
        for k in range(len(order) + 1):
            plan = study.make_plan(model, recipe, order[:k])
            predicted = study.predicted_size(plan) if k else study.store.candidate(plan.id)["size_bytes"]
            ref = tmp / f"{recipe}-k{k}.onnx"
            quantize_candidate(src, ref, settings, list(plan.excluded), cache)
            exact += predicted == ref.stat().st_size
            ref.unlink()
        print(f"  predicted size == quantizer's file size: {exact}/{len(order) + 1} k-prefixes of the paper's ranking")


if __name__ == "__main__":
    sys.exit(main())
