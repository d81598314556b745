"""Time to build 10 candidates: calibration reused (tuneqn) vs recalibrated each time (paper loop).

Usage: python bench/calibration_reuse.py [--example examples/lite0/work] [--candidates 10]
Prints both times and their ratio, measured in one run on the example model.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

from tuneqn.controller.analysis import find_layers
from tuneqn.controller.config import DatasetSpec, ModelSpec, PreprocessSpec, QuantizationSpec
from tuneqn.controller.dataset import prepare_data
from tuneqn.controller.modelio import prepare_model
from tuneqn.controller.quantize import (
    QuantSettings,
    _calibration_reader,
    _quantize_static,
    calibrate,
    quantize_candidate,
)


def main() -> int:
    """Run the benchmark."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--example", default="examples/lite0/work")
    ap.add_argument("--candidates", type=int, default=10)
    ap.add_argument("--calibration", type=int, default=20)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    ort.set_default_logger_severity(3)
    ex = Path(args.example)
    if not (ex / "model.onnx").is_file():
        print(f"example not prepared in {ex}: run `make example`", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        pm = prepare_model(ModelSpec(path=ex / "model.onnx", input_shape=[1, 3, 224, 224]), tmp / "models")
        spec = DatasetSpec(images=ex / "images", eval=1, calibration=args.calibration, analysis=1,
                           preprocess=PreprocessSpec(resize=256, crop=224, interpolation="bicubic",
                                                     scale=1 / 128, offset=-127 / 128))
        calib = prepare_data(spec, pm.input_shape, tmp / "data").calibration.load()
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
            _quantize_static(pm.path, tmp / f"fresh-{i}.onnx", settings, ex_list, fresh,
                             _calibration_reader(pm.input_name, calib, pm.input_shape[0]))
        recal = time.perf_counter() - t0
        same = all((tmp / f"reuse-{i}.onnx").read_bytes() == (tmp / f"fresh-{i}.onnx").read_bytes()
                   for i in range(len(excludes)))
    n = len(excludes)
    print(f"model: {ex / 'model.onnx'}  calibration sample: {args.calibration} images  candidates: {n}")
    print(f"calibration reused : {reused:7.2f} s  ({reused / n:.2f} s/candidate, calibration included)")
    print(f"recalibrated each  : {recal:7.2f} s  ({recal / n:.2f} s/candidate)")
    print(f"speed-up           : {recal / reused:.2f}x   identical candidate files: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
