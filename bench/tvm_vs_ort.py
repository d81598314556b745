"""Apache TVM vs ONNX Runtime on the example model's FP32 and fully quantized QDQ candidates.

Usage: python bench/tvm_vs_ort.py [--study examples/lite0/study.toml] [--target JSON] [--trials N]
                                  [--samples N] [--repeats N] [--work DIR] [--json FILE]

The candidates are made by tuneqn's own study code, as ``tuneqn tune`` makes them: the study's
model prepared (pre-processed, fixed input dims) and its first recipe's fully quantized QDQ
candidate built from the study's calibration sample. Each is compiled by the agent's TVM compile
cache (``tuneqn.agent.backends.tvm_build.CompileCache``) for ``--target`` and run on this machine
(``{"kind": "cuda"}`` on a GPU machine). Printed per candidate, all measured in one run:

* ``compile``: wall seconds of the first (untuned) ``get_or_build``; ``cached``: the same request
  again, served from the cache (must say ``hit``);
* ``ORT``: the median of ``--repeats`` single-sample runs as the agent's ONNX Runtime backend times
  them (``OrtBackend.latency``: 3 warm-up runs, ``time.perf_counter`` per run, the candidate's
  disabled ORT optimizers applied);
* ``TVM untuned`` / ``TVM tuned``: the median of ``--repeats`` timed runs as the agent's TVM backend
  times them (``time_evaluator("invoke_stateful")``, number 1, one warm-up) of the untuned build and
  of the build tuned with MetaSchedule for at most ``--trials`` trials (0 = skip), with its tuning
  and compile seconds. Both candidates share one tuning database (the agent's tuning group is the
  FP32 model), FP32 tuned first, so the QDQ candidate's ``new records`` shows what it added;
* ``top-1 = ORT``: the share of the first ``--samples`` images of the evaluation sample whose top-1
  class from TVM equals ONNX Runtime's for the same candidate (untuned and tuned builds).

Timings are noisy on a shared machine (this project's dev machine has 2 cores, shared with
whatever else runs): run it alone and compare ratios from the same run rather than absolute times
across runs. Exit codes: 0 done, 2 bad input (one line), 1 other failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tuneqn.agent.backends.base import LoadOptions
from tuneqn.agent.backends.ort import OrtBackend
from tuneqn.controller.config import load_config
from tuneqn.controller.errors import UserError
from tuneqn.controller.study import Study
from tuneqn.v1 import agent_pb2 as pb

ORT_WARMUP = 3


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _candidates(study_path: Path, work: Path) -> tuple[list[dict[str, Any]], np.ndarray, str]:
    """The prepared FP32 model and the first recipe's fully quantized candidate, and the eval sample."""
    cfg = load_config(study_path)
    cfg = cfg.model_copy(update={"out_dir": work / "study"})
    with Study(cfg) as study:
        study.prepare()
        model = next(iter(study.models))
        pm = study.models[model]
        recipe = study.recipes()[0]
        row = study.build(study.make_plan(model, recipe, []))
        x = study.eval_split(model).load()
    return [
        {"name": "fp32", "path": Path(pm.path), "disabled": []},
        {"name": f"qdq {recipe} fq", "path": Path(row["path"]),
         "disabled": list(row["runtime"].get("ort_disabled_optimizers", []))},
    ], np.asarray(x, dtype=np.float32), model


def _ort(path: Path, disabled: list[str], x: np.ndarray, repeats: int) -> dict[str, Any]:
    backend = OrtBackend("bench")
    options = LoadOptions(backend_options=pb.BackendOptions(ort=pb.OrtOptions(disabled_optimizers=disabled)))
    handle = backend.load(path, options)
    times = backend.latency(handle, x[:1], ORT_WARMUP, repeats)
    step = handle.fixed_batch or len(x)
    top1 = np.concatenate([backend.predict(handle, x[i:i + step]).argmax(axis=1) for i in range(0, len(x), step)])
    backend.close()
    return {"latency_ms": float(np.median(times)), "top1": top1}


class _TvmRun:
    """Loads one compiled library and runs it as the agent's TVM backend does (locally)."""

    def __init__(self, lib_path: Path, target: dict[str, Any]) -> None:
        import tvm
        from tvm import relax

        self.tvm = tvm
        self.dev = tvm.device(str(target["kind"]), 0)
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), self.dev)

    def latency_ms(self, one: np.ndarray, repeats: int) -> float:
        self.vm.set_input("main", self.tvm.runtime.tensor(one, self.dev))
        timer = self.vm.time_evaluator("invoke_stateful", self.dev, number=1, repeat=repeats)
        return 1000.0 * float(np.median(timer("main").results))

    def top1(self, x: np.ndarray, batch: int | None) -> np.ndarray:
        step = batch or len(x)
        out = []
        for i in range(0, len(x), step):
            chunk = x[i:i + step]
            n = len(chunk)
            if batch and n < batch:
                chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), chunk.dtype)])
            y = self.vm["main"](self.tvm.runtime.tensor(np.ascontiguousarray(chunk), self.dev))
            y = y[0] if isinstance(y, (list, tuple)) or type(y).__name__ == "Array" else y
            out.append(y.numpy().reshape(len(chunk), -1)[:n].argmax(axis=1))
        return np.concatenate(out)


def _records(tuning_dir: Path) -> int:
    from tuneqn.agent.backends.tvm_tuning import RECORD_FILE

    path = tuning_dir / RECORD_FILE
    return sum(1 for _ in open(path, encoding="utf-8")) if path.is_file() else 0


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The whole measurement; returns the figures (also printed)."""
    from tuneqn.agent.backends.tvm_build import BuildSpec, CompileCache

    import tvm

    t0 = time.perf_counter()
    cands, x_all, model = _candidates(args.study, work)
    x = x_all[: args.samples]
    print(f"{model}: candidates built by the study in {time.perf_counter() - t0:.1f} s; TVM {tvm.__version__}, "
          f"target {json.dumps(args.target)}; agreement on {len(x)} of {len(x_all)} evaluation images; "
          f"latency median of {args.repeats} runs", flush=True)
    cache = CompileCache(work / "cache", 10 << 30)
    tuning_dir = work / "tuning" / _sha256(cands[0]["path"])[:16]
    rows = []
    for c in cands:
        sha = _sha256(c["path"])
        ort = _ort(c["path"], c["disabled"], x, args.repeats)
        row: dict[str, Any] = {"candidate": c["name"], "size_bytes": c["path"].stat().st_size,
                               "ort_latency_ms": ort["latency_ms"]}
        untuned = BuildSpec(target=args.target)
        t = time.perf_counter()
        built = cache.get_or_build(c["path"], sha, untuned)
        row["compile_s"] = time.perf_counter() - t
        t = time.perf_counter()
        again = cache.get_or_build(c["path"], sha, untuned)
        row["cached_s"] = time.perf_counter() - t
        row["cache_hit"] = again.cache_hit
        r = _TvmRun(built.path, args.target)
        row["tvm_untuned_ms"] = r.latency_ms(x[:1], args.repeats)
        row["untuned_top1_eq_ort"] = float((r.top1(x, built.batch) == ort["top1"]).mean())
        del r
        if args.trials > 0:
            before = _records(tuning_dir)
            spec = BuildSpec(target=args.target, tuning_trials=args.trials, tuning_dir=tuning_dir)
            t = time.perf_counter()
            tuned = cache.get_or_build(c["path"], sha, spec)
            row["tuned_build_s"] = time.perf_counter() - t
            row["tuning_s"] = tuned.tuning_seconds
            row["tuned_compile_s"] = tuned.compile_seconds
            row["new_records"] = _records(tuning_dir) - before
            r = _TvmRun(tuned.path, args.target)
            row["tvm_tuned_ms"] = r.latency_ms(x[:1], args.repeats)
            row["tuned_top1_eq_ort"] = float((r.top1(x, tuned.batch) == ort["top1"]).mean())
            del r
        rows.append(row)
        _print_row(row, args.trials)
    return {"model": model, "tvm": tvm.__version__, "target": args.target, "trials": args.trials,
            "samples": len(x), "repeats": args.repeats, "rows": rows, "wall_s": time.perf_counter() - t0}


def _print_row(row: dict[str, Any], trials: int) -> None:
    ort = row["ort_latency_ms"]
    line = (f"  {row['candidate']:<18} {row['size_bytes'] / 1e6:6.2f} MB  compile {row['compile_s']:5.1f} s  "
            f"cached {row['cached_s']:5.2f} s ({'hit' if row['cache_hit'] else 'MISS'})  ORT {ort:7.2f} ms  "
            f"TVM untuned {row['tvm_untuned_ms']:8.2f} ms ({row['tvm_untuned_ms'] / ort:5.1f}x ORT)  "
            f"top-1 = ORT {row['untuned_top1_eq_ort']:.3f}")
    if trials > 0:
        line += (f"\n  {'':<18} {'':>9}  tuned ({trials} trials): tuning {row['tuning_s']:5.1f} s + compile "
                 f"{row['tuned_compile_s']:5.1f} s, {row['new_records']} new records  "
                 f"TVM tuned {row['tvm_tuned_ms']:8.2f} ms ({row['tvm_tuned_ms'] / ort:5.1f}x ORT, "
                 f"{row['tvm_untuned_ms'] / row['tvm_tuned_ms']:4.1f}x faster than untuned)  "
                 f"top-1 = ORT {row['tuned_top1_eq_ort']:.3f}")
    print(line, flush=True)


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", type=Path, default=Path("examples/lite0/study.toml"))
    ap.add_argument("--target", default='{"kind": "llvm"}', help="TVM target as a JSON dict")
    ap.add_argument("--trials", type=int, default=32, help="MetaSchedule trials per candidate (0 = no tuning)")
    ap.add_argument("--samples", type=int, default=50, help="evaluation images for the top-1 agreement")
    ap.add_argument("--repeats", type=int, default=20, help="timed runs per latency")
    ap.add_argument("--work", type=Path, help="work dir (study out dir, compile cache, tuning database); "
                                              "default a temporary one")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    try:
        args.target = json.loads(args.target)
    except json.JSONDecodeError as e:
        raise UserError(f"--target: not JSON ({e.msg})") from None
    if not isinstance(args.target, dict) or "kind" not in args.target:
        raise UserError('--target: a JSON dict with "kind", e.g. {"kind": "cuda"}')
    for name in ("trials", "samples", "repeats"):
        if getattr(args, name) < (0 if name == "trials" else 1):
            raise UserError(f"--{name}: must be {'>= 0' if name == 'trials' else '>= 1'}")
    if not args.study.is_file():
        raise UserError(f"--study: no such file: {args.study}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the bench; print the figures."""
    logging.basicConfig(level=logging.WARNING)
    try:
        args = _args(argv)
        model_path = Path(load_config(args.study).models[0].path or "")
        if not model_path.is_file():
            raise UserError(f"example not prepared ({model_path}): run `make example`")
        try:
            import tvm  # noqa: F401

            from tuneqn.agent.backends.tvm_tuning import environment_problem
        except ImportError:
            raise UserError("apache-tvm is not installed: pip install 'tuneqn[tvm]'") from None
        if args.trials > 0 and environment_problem():
            raise UserError(environment_problem())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        result = run(args, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="tuneqn-tvm-bench-") as tmp:
            result = run(args, Path(tmp))
    print(f"whole bench: {result['wall_s']:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
