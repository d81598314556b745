"""Milliseconds per QOperator candidate: graph edits (controller/quantize/edits_qop.py) vs ONNX Runtime's quantizer.

Usage: python bench/derive_qop.py [--example examples/lite0/work] [--candidates 50] [--check 3]
For the per-tensor and per-channel QOperator recipes of the example: the one-off index time, the median
(and 90th percentile) time to derive a candidate's file bytes for random exclusion sets of 1-25 layers,
and for ``--check`` of them the quantizer's time and whether both files are byte-identical.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import onnx

from tuneqn.controller.quantize.edits_qop import QOperatorEditor
from tuneqn.controller.quantize.quantizer import QuantSettings, calibrate, quantize_candidate


def main() -> int:
    """Run the benchmark."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--candidates", type=int, default=50)
    ap.add_argument("--check", type=int, default=3)
    args, ex = benchlib.parse_example(ap)
    if ex is None:
        return 2
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        pm, calib = benchlib.calibration_sample(ex, tmp)
        float_model = onnx.load(str(pm.path))
        layers = [n.name for n in float_model.graph.node if n.op_type in ("Conv", "Gemm")]
        rng = random.Random(0)
        sets = [rng.sample(layers, rng.randint(1, 25)) for _ in range(args.candidates)]
        base = QuantSettings(format="qoperator")  # otherwise the defaults: static, per tensor, u8/s8, min/max
        print(f"model: {ex / 'model.onnx'} ({len(layers)} layers)  candidates: {len(sets)} random sets of 1-25 layers")
        for name, settings in (("per-tensor", base), ("per-channel", base.model_copy(update={"per_channel": True}))):
            cache = calibrate(pm.path, pm.input_name, pm.input_shape[0], calib, settings, tmp / f"{name}.json")
            quantize_candidate(pm.path, tmp / "fq.onnx", settings, [], cache)
            t0 = time.perf_counter()
            editor = QOperatorEditor(onnx.load(str(tmp / "fq.onnx")), float_model, cache, settings)
            index_ms = (time.perf_counter() - t0) * 1e3
            times = []
            for exclude in sets:
                t0 = time.perf_counter()
                editor.derive_bytes(exclude)
                times.append((time.perf_counter() - t0) * 1e3)
            q_times, same = [], 0
            for exclude in sets[: args.check]:
                t0 = time.perf_counter()
                quantize_candidate(pm.path, tmp / "ort.onnx", settings, exclude, cache)
                q_times.append(time.perf_counter() - t0)
                same += (tmp / "ort.onnx").read_bytes() == editor.derive_bytes(exclude)
            p90 = statistics.quantiles(times, n=10)[-1] if len(times) > 1 else times[0]
            print(
                f"{name:12s}: index {index_ms:6.1f} ms   derive median {statistics.median(times):5.1f} ms "
                f"(p90 {p90:5.1f})   quantizer median {statistics.median(q_times) if q_times else float('nan'):5.2f} s"
                f"   byte-identical {same}/{len(q_times)}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
