"""Time to build 10 candidates: calibration reused (tuneqn) vs recalibrated each time (paper loop).

Usage: python bench/calibration_reuse.py [--example examples/lite0/work] [--candidates 10]
Prints both times and their ratio, measured in one run on the example model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import benchlib

from tuneqn.controller.config import QuantizationSpec
from tuneqn.controller.quantize.analysis import find_layers
from tuneqn.controller.quantize.quantizer import (
    QuantSettings,
    calibrate,
    calibration_reader,
    quantize_candidate,
    quantize_static_file,
)


def main() -> int:
    """Run the benchmark."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--candidates", type=int, default=10)
    ap.add_argument("--calibration", type=int, default=20)
    args, ex = benchlib.parse_example(ap)
    if ex is None:
        return 2
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        pm, calib = benchlib.calibration_sample(ex, tmp, args.calibration)
        settings = QuantSettings.from_spec(QuantizationSpec(), "static")
        import onnx

        names = [layer.node.name for layer in find_layers(onnx.load(str(pm.path)), ["Conv", "Gemm"])]
        excludes = [names[:k] for k in range(args.candidates)]

        t0 = time.perf_counter()
        cache = calibrate(pm.path, pm.input_name, pm.input_shape[0], calib, settings, tmp / "calib.json")
        for i, ex_list in enumerate(excludes):
            quantize_candidate(pm.path, tmp / f"reuse-{i}.onnx", settings, ex_list, cache)
        reused = time.perf_counter() - t0

        t0 = time.perf_counter()
        for i, ex_list in enumerate(excludes):
            fresh = tmp / f"fresh-{i}.json"
            quantize_static_file(
                pm.path,
                tmp / f"fresh-{i}.onnx",
                settings,
                ex_list,
                fresh,
                calibration_reader(pm.input_name, calib, pm.input_shape[0], settings),
            )
        recal = time.perf_counter() - t0
        same = all(
            (tmp / f"reuse-{i}.onnx").read_bytes() == (tmp / f"fresh-{i}.onnx").read_bytes()
            for i in range(len(excludes))
        )
    n = len(excludes)
    print(f"model: {ex / 'model.onnx'}  calibration sample: {args.calibration} images  candidates: {n}")
    print(f"calibration reused : {reused:7.2f} s  ({reused / n:.2f} s/candidate, calibration included)")
    print(f"recalibrated each  : {recal:7.2f} s  ({recal / n:.2f} s/candidate)")
    print(f"speed-up           : {recal / reused:.2f}x   identical candidate files: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
