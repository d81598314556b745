"""Static QDQ vs QOperator on the example model: size, top-1 agreement with FP32, ranking, float layers.

Usage: python bench/qoperator_vs_qdq.py [--study examples/lite0/study.toml] [--eval 50] [--k 0 4 10]

For each format the study machinery prepares the model and samples, analyzes the layers and
builds the candidates k (k = 0: fully quantized). Each candidate runs in ONNX Runtime on
the CPU with its recorded runtime options; printed: file size, top-1 agreement with the FP32
model on the evaluation sample, float/quantized Conv counts in the graph ORT actually runs
(float ones must equal the excluded Convs), analysis time, and how the two rankings compare.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from tuneqn.controller.config import load_config
from tuneqn.controller.study import Study


def _session(path: str, disabled: list[str], optimized: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def _top1(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.array([int(np.argmax(sess.run(None, {name: x[i : i + 1]})[0])) for i in range(len(x))])


def _conv_counts(model: onnx.ModelProto) -> tuple[int, int]:
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    f = sum(1 for n in model.graph.node if n.op_type in ("Conv", "FusedConv") and n.input[1] in floats)
    q = sum(1 for n in model.graph.node if n.op_type == "QLinearConv")
    return f, q


def main() -> int:
    """Run the comparison and print one block per format."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--study", default="examples/lite0/study.toml")
    ap.add_argument("--eval", type=int, default=50)
    ap.add_argument("--k", type=int, nargs="+", default=[0, 4, 10])
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    ort.set_default_logger_severity(3)
    study_path = Path(args.study)
    if not study_path.is_file():
        print(f"study file not found: {study_path}", file=sys.stderr)
        return 2
    base = load_config(study_path)
    if not Path(base.models[0].path).is_file():
        print(f"example not prepared ({base.models[0].path}): run `make example`", file=sys.stderr)
        return 2
    rankings: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="tuneqn-bench-") as tmp:
        for fmt in ("qdq", "qoperator"):
            cfg = base.model_copy(
                update={
                    "out_dir": Path(tmp) / fmt,
                    "quantization": base.quantization.model_copy(update={"modes": ["static"], "format": fmt}),
                    "dataset": base.dataset.model_copy(update={"eval": args.eval}),
                }
            )
            study = Study(cfg)
            try:
                study.prepare()
                model = next(iter(study.models))
                pm = study.models[model]
                t0 = time.perf_counter()
                rankings[fmt] = study.analyze(model, "static")
                t_an = time.perf_counter() - t0
                x = study.eval_split(model).load()
                ref = _top1(_session(str(pm.path), []), x)
                print(
                    f"{fmt}: analysis {t_an:.1f} s, {len(rankings[fmt])} layers; FP32 {pm.path.stat().st_size} B; "
                    f"eval {len(x)} samples"
                )
                plans = {p.k: p for p in study.plan(model, "static") if p.k is not None}
                for k in args.k:
                    plan = plans.get(k) or next(p for p in study.plan(model, "static") if p.kind == "ranked")
                    row = study.build(plan)
                    disabled = row["runtime"]["ort_disabled_optimizers"]
                    opt = Path(tmp) / f"{fmt}-k{k}-ran.onnx"
                    sess = _session(row["path"], disabled, opt)
                    agree = float((_top1(sess, x) == ref).mean())
                    fl, ql = _conv_counts(onnx.load(str(opt)))
                    excluded_convs = sum(1 for r in rankings[fmt][:k] if r["op_type"] == "Conv")
                    print(
                        f"  k={k:<3d} size {row['size_bytes']:>9d} B  top-1 agreement {agree:.3f}  "
                        f"ORT runs {fl} float Conv (excluded {excluded_convs}) + {ql} QLinearConv  "
                        f"disabled={disabled}"
                    )
            finally:
                study.close()
    a = {r["name"]: r for r in rankings["qdq"]}
    b = {r["name"]: r for r in rankings["qoperator"]}
    common = sorted(set(a) & set(b))
    qdiff = max(abs(a[n]["qdq_err"] - b[n]["qdq_err"]) for n in common)
    ra = np.array([a[n]["rank"] for n in common], float)
    rb = np.array([b[n]["rank"] for n in common], float)
    rho = float(np.corrcoef(ra, rb)[0, 1])
    top10 = len({r["name"] for r in rankings["qdq"][:10]} & {r["name"] for r in rankings["qoperator"][:10]})
    xr = np.array([b[n]["xmodel_err"] / a[n]["xmodel_err"] for n in common if a[n]["xmodel_err"] > 0])
    print(
        f"rankings: {len(common)} common layers, max |qdq_err diff| {qdiff:.2e}, Spearman rho {rho:.3f}, "
        f"top-10 overlap {top10}/10, xmodel_err QOperator/QDQ median {np.median(xr):.2f} "
        f"(min {xr.min():.2f}, max {xr.max():.2f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
