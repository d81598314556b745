"""Apache TVM vs ONNX Runtime on the example model's FP32 and fully quantized QDQ candidates.

Usage: python bench/tvm_vs_ort.py [--study examples/lite0/study.toml] [--target JSON] [--trials N]
                                  [--samples N] [--repeats N] [--work DIR] [--json FILE]
       python bench/tvm_vs_ort.py --export-inputs DIR [--study ...] [--samples N]
       python bench/tvm_vs_ort.py --inputs DIR [--target JSON] [--trials N] [--repeats N] [--json FILE]

The candidates are made by tuneqn's own study code, as ``tuneqn tune`` makes them: the study's
model prepared (pre-processed, fixed input dims) and its first recipe's fully quantized QDQ
candidate built from the study's calibration sample. Each is compiled by the agent's TVM compile
cache (``tuneqn.agent.backends.tvm_build.CompileCache``) for ``--target`` and run on this machine
(``{"kind": "cuda"}`` on a GPU machine). Printed per candidate, all measured in one run:

* ``compile``: wall seconds of the first (untuned) ``get_or_build``; ``cached``: the same request
  again, served from the cache (must say ``hit``);
* ``ORT``: the median of ``--repeats`` single-sample runs as the agent's ONNX Runtime backend times
  them (``OrtBackend.latency``: 3 warm-up runs, ``time.perf_counter`` per run, the candidate's
  disabled ORT optimizers applied), on this machine's CPU;
* ``TVM untuned`` / ``TVM tuned``: the median of ``--repeats`` timed runs as the agent's TVM backend
  times them (``time_evaluator("invoke_stateful")``, number 1, one warm-up) of the untuned build and
  of the build tuned with MetaSchedule for at most ``--trials`` trials (0 = skip), with its tuning
  and compile seconds. Both candidates share one tuning database (the agent's tuning group is the
  FP32 model), FP32 tuned first, so the QDQ candidate's ``new records`` shows what it added;
* ``top-1 = ORT``: the share of the first ``--samples`` images of the evaluation sample whose top-1
  class from TVM equals ONNX Runtime's for the same candidate (untuned and tuned builds).

A machine without tuneqn's dependencies (a lent GPU box with only TVM, ONNX, ONNX Runtime and
numpy): ``--export-inputs DIR`` writes the two candidates, the evaluation images and their ORT
settings here; ``--inputs DIR`` there runs the same measurements with plain ``onnxruntime`` (as
``OrtBackend`` sets it up) and ``tvm.compile`` (as ``tvm_build`` does; no compile cache, so no
``cached`` column), importing nothing of tuneqn but ``agent/backends/tvm_tuning.py`` by path.

Timings are noisy on a shared machine (this project's dev machine has 2 cores, shared with
whatever else runs): run it alone and compare ratios from the same run rather than absolute times
across runs. Exit codes: 0 done, 2 bad input (one line), 1 other failure.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ORT_WARMUP = 3
REPO = Path(__file__).resolve().parent.parent


class BadInput(Exception):
    """Bad command-line input: one line, exit 2."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tuning_module() -> Any:
    """``tuneqn.agent.backends.tvm_tuning``, or the same file loaded by path where tuneqn is not installed."""
    try:
        from tuneqn.agent.backends import tvm_tuning
    except ImportError:
        spec = importlib.util.spec_from_file_location("tvm_tuning", REPO / "agent" / "backends" / "tvm_tuning.py")
        if spec is None or spec.loader is None:
            raise
        tvm_tuning = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tvm_tuning)
    return tvm_tuning


# ---------------------------------------------------------------------------------------- inputs


def _study_candidates(study_path: Path, work: Path) -> tuple[list[dict[str, Any]], np.ndarray, str]:
    """The prepared FP32 model and the first recipe's fully quantized candidate, and the eval sample."""
    from tuneqn.controller.config import load_config
    from tuneqn.controller.study import Study

    cfg = load_config(study_path)
    cfg = cfg.model_copy(update={"out_dir": work / "study"})
    with Study(cfg) as study:
        study.prepare()
        model = next(iter(study.models))
        pm = study.models[model]
        recipe = study.recipes()[0]
        row = study.build(study.make_plan(model, recipe, []))
        x = study.eval_split(model).load()
    return (
        [
            {"name": "fp32", "path": Path(pm.path), "disabled": []},
            {
                "name": f"qdq {recipe} fq",
                "path": Path(row["path"]),
                "disabled": list(row["runtime"].get("ort_disabled_optimizers", [])),
            },
        ],
        np.asarray(x, dtype=np.float32),
        model,
    )


def _export_inputs(args: argparse.Namespace, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tuneqn-tvm-bench-") as tmp:
        cands, x, model = _study_candidates(args.study, Path(tmp))
        files = []
        for i, c in enumerate(cands):
            name = f"candidate{i}.onnx"
            shutil.copyfile(c["path"], out / name)
            files.append({"name": c["name"], "file": name, "disabled": c["disabled"]})
    np.save(out / "eval.npy", x[: args.samples])
    (out / "inputs.json").write_text(json.dumps({"model": model, "candidates": files}, indent=1))
    print(f"wrote {len(files)} candidates and {min(len(x), args.samples)} evaluation images of {model} to {out}")


def _read_inputs(folder: Path) -> tuple[list[dict[str, Any]], np.ndarray, str]:
    try:
        meta = json.loads((folder / "inputs.json").read_text())
        x = np.load(folder / "eval.npy")
    except (OSError, ValueError) as e:
        raise BadInput(f"--inputs: {folder} has no readable inputs.json/eval.npy ({e})") from None
    cands = [
        {"name": c["name"], "path": folder / c["file"], "disabled": list(c["disabled"])} for c in meta["candidates"]
    ]
    return cands, np.asarray(x, dtype=np.float32), str(meta["model"])


# ---------------------------------------------------------------------------------------- ORT


def _ort(path: Path, disabled: list[str], x: np.ndarray, repeats: int, standalone: bool) -> dict[str, Any]:
    """Latency (median ms of single-sample runs after 3 warm-ups) and top-1, as the agent's ORT backend."""
    if standalone:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        name = sess.get_inputs()[0].name

        def run(batch: np.ndarray) -> np.ndarray:
            return np.asarray(sess.run(None, {name: batch})[0])

        for _ in range(ORT_WARMUP):
            run(x[:1])
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            run(x[:1])
            times.append(1000.0 * (time.perf_counter() - t))
        top1 = np.array([int(run(x[i : i + 1]).argmax()) for i in range(len(x))])
        return {"latency_ms": float(np.median(times)), "top1": top1}
    from tuneqn.agent.backends.base import LoadOptions
    from tuneqn.agent.backends.ort import OrtBackend
    from tuneqn.v1 import agent_pb2 as pb

    backend = OrtBackend("bench")
    options = LoadOptions(backend_options=pb.BackendOptions(ort=pb.OrtOptions(disabled_optimizers=disabled)))
    handle = backend.load(path, options)
    times = backend.latency(handle, x[:1], ORT_WARMUP, repeats)
    step = handle.fixed_batch or len(x)
    top1 = np.concatenate([backend.predict(handle, x[i : i + step]).argmax(axis=1) for i in range(0, len(x), step)])
    backend.close()
    return {"latency_ms": float(np.median(times)), "top1": top1}


# ---------------------------------------------------------------------------------------- TVM


class _TvmRun:
    """Loads one compiled library and runs it as the agent's TVM backend does (locally)."""

    def __init__(self, lib_path: Path, target: dict[str, Any]) -> None:
        import tvm
        from tvm import relax

        self.tvm = tvm
        kind = str(target["kind"])
        self.dev = tvm.cpu(0) if kind in ("llvm", "c") else tvm.device(kind, 0)
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), self.dev)

    def latency_ms(self, one: np.ndarray, repeats: int) -> float:
        self.vm.set_input("main", self.tvm.runtime.tensor(one, self.dev))
        timer = self.vm.time_evaluator("invoke_stateful", self.dev, number=1, repeat=repeats)
        return 1000.0 * float(np.median(timer("main").results))

    def top1(self, x: np.ndarray, batch: int | None) -> np.ndarray:
        step = batch or len(x)
        out = []
        for i in range(0, len(x), step):
            chunk = x[i : i + step]
            n = len(chunk)
            if batch and n < batch:
                chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), chunk.dtype)])
            y = self.vm["main"](self.tvm.runtime.tensor(np.ascontiguousarray(chunk), self.dev))
            if not hasattr(y, "numpy"):  # a tuple of outputs: the first
                y = y[0]
            out.append(y.numpy().reshape(len(chunk), -1)[:n].argmax(axis=1))
        return np.concatenate(out)


class _DirectBuilder:
    """Standalone builds as ``tvm_build`` makes them (batch 1, optional tuning), without its cache."""

    def __init__(self, root: Path, target: dict[str, Any]) -> None:
        self.root = root
        self.target = target
        root.mkdir(parents=True, exist_ok=True)

    def build(self, path: Path, trials: int, tuning_dir: Path | None) -> dict[str, Any]:
        import onnx
        import tvm
        from tvm.relax.frontend.onnx import from_onnx

        t0 = time.perf_counter()
        model = onnx.load(str(path))
        inp = model.graph.input[0]
        dims = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
        mod = from_onnx(model, shape_dict={inp.name: [1, *dims[1:]]}, keep_params_in_input=False)
        target = tvm.target.Target(self.target)
        tuning_s = 0.0
        if trials > 0 and tuning_dir is not None:
            mod, tuning_s = _tuning_module().tune(mod, target, tuning_dir, trials)
        t1 = time.perf_counter()
        lib = self.root / f"{_sha256(path)[:16]}-{trials}.so"
        tvm.compile(mod, target=target).export_library(str(lib))
        compile_s = (t1 - t0 - tuning_s) + (time.perf_counter() - t1)
        return {"path": lib, "batch": 1, "compile_s": compile_s, "tuning_s": tuning_s}


def _records(tuning_dir: Path) -> int:
    path = tuning_dir / _tuning_module().RECORD_FILE
    return sum(1 for _ in open(path, encoding="utf-8")) if path.is_file() else 0


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The whole measurement; returns the figures (also printed)."""
    import tvm

    standalone = args.inputs is not None
    t0 = time.perf_counter()
    if standalone:
        cands, x_all, model = _read_inputs(args.inputs)
        how = f"read from {args.inputs}"
    else:
        cands, x_all, model = _study_candidates(args.study, work)
        how = f"built by the study in {time.perf_counter() - t0:.1f} s"
    x = x_all[: args.samples]
    print(
        f"{model}: candidates {how}; TVM {tvm.__version__}, target {json.dumps(args.target)}; "
        f"agreement on {len(x)} of {len(x_all)} evaluation images; latency median of {args.repeats} runs",
        flush=True,
    )
    tuning_dir = work / "tuning" / _sha256(cands[0]["path"])[:16]
    rows = []
    for c in cands:
        ort_result = _ort(c["path"], c["disabled"], x, args.repeats, standalone)
        row: dict[str, Any] = {
            "candidate": c["name"],
            "size_bytes": c["path"].stat().st_size,
            "ort_latency_ms": ort_result["latency_ms"],
        }
        if standalone:
            direct = _DirectBuilder(work / "libs", args.target)
            t = time.perf_counter()
            built = direct.build(c["path"], 0, None)
            row["compile_s"] = time.perf_counter() - t
            lib, batch = built["path"], built["batch"]
        else:
            from tuneqn.agent.backends.tvm_build import BuildSpec, CompileCache

            cache = CompileCache(work / "cache", 10 << 30)
            sha = _sha256(c["path"])
            untuned = BuildSpec(target=args.target)
            t = time.perf_counter()
            cached_build = cache.get_or_build(c["path"], sha, untuned)
            row["compile_s"] = time.perf_counter() - t
            t = time.perf_counter()
            again = cache.get_or_build(c["path"], sha, untuned)
            row["cached_s"] = time.perf_counter() - t
            row["cache_hit"] = again.cache_hit
            lib, batch = cached_build.path, cached_build.batch
        r = _TvmRun(lib, args.target)
        row["tvm_untuned_ms"] = r.latency_ms(x[:1], args.repeats)
        row["untuned_top1_eq_ort"] = float((r.top1(x, batch) == ort_result["top1"]).mean())
        del r
        if args.trials > 0:
            before = _records(tuning_dir)
            t = time.perf_counter()
            if standalone:
                built = _DirectBuilder(work / "libs", args.target).build(c["path"], args.trials, tuning_dir)
                lib, batch = built["path"], built["batch"]
                row["tuning_s"], row["tuned_compile_s"] = built["tuning_s"], built["compile_s"]
            else:
                spec = BuildSpec(target=args.target, tuning_trials=args.trials, tuning_dir=tuning_dir)
                tuned = cache.get_or_build(c["path"], sha, spec)
                lib, batch = tuned.path, tuned.batch
                row["tuning_s"], row["tuned_compile_s"] = tuned.tuning_seconds, tuned.compile_seconds
            row["tuned_build_s"] = time.perf_counter() - t
            row["new_records"] = _records(tuning_dir) - before
            r = _TvmRun(lib, args.target)
            row["tvm_tuned_ms"] = r.latency_ms(x[:1], args.repeats)
            row["tuned_top1_eq_ort"] = float((r.top1(x, batch) == ort_result["top1"]).mean())
            del r
        rows.append(row)
        _print_row(row, args.trials)
    return {
        "model": model,
        "tvm": tvm.__version__,
        "target": args.target,
        "trials": args.trials,
        "samples": len(x),
        "repeats": args.repeats,
        "standalone": standalone,
        "rows": rows,
        "wall_s": time.perf_counter() - t0,
    }


def _print_row(row: dict[str, Any], trials: int) -> None:
    ort_ms = row["ort_latency_ms"]
    cached = f"cached {row['cached_s']:5.2f} s ({'hit' if row['cache_hit'] else 'MISS'})  " if "cached_s" in row else ""
    line = (
        f"  {row['candidate']:<18} {row['size_bytes'] / 1e6:6.2f} MB  compile {row['compile_s']:5.1f} s  "
        f"{cached}ORT {ort_ms:7.2f} ms  "
        f"TVM untuned {row['tvm_untuned_ms']:8.2f} ms ({row['tvm_untuned_ms'] / ort_ms:5.1f}x ORT)  "
        f"top-1 = ORT {row['untuned_top1_eq_ort']:.3f}"
    )
    if trials > 0:
        line += (
            f"\n  {'':<18} {'':>9}  tuned ({trials} trials): tuning {row['tuning_s']:5.1f} s + compile "
            f"{row['tuned_compile_s']:5.1f} s, {row['new_records']} new records  "
            f"TVM tuned {row['tvm_tuned_ms']:8.2f} ms ({row['tvm_tuned_ms'] / ort_ms:5.1f}x ORT, "
            f"{row['tvm_untuned_ms'] / row['tvm_tuned_ms']:4.1f}x faster than untuned)  "
            f"top-1 = ORT {row['tuned_top1_eq_ort']:.3f}"
        )
    print(line, flush=True)


# ---------------------------------------------------------------------------------------- CLI


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", type=Path, default=Path("examples/lite0/study.toml"))
    ap.add_argument("--target", default='{"kind": "llvm"}', help="TVM target as a JSON dict")
    ap.add_argument("--trials", type=int, default=32, help="MetaSchedule trials per candidate (0 = no tuning)")
    ap.add_argument("--samples", type=int, default=50, help="evaluation images for the top-1 agreement")
    ap.add_argument("--repeats", type=int, default=20, help="timed runs per latency")
    ap.add_argument(
        "--work", type=Path, help="work dir (study out dir, compile cache, tuning database); default a temporary one"
    )
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--export-inputs", type=Path, metavar="DIR", help="only write the candidates and images to DIR")
    ap.add_argument(
        "--inputs",
        type=Path,
        metavar="DIR",
        help="measure the candidates --export-inputs wrote (no study, no tuneqn install needed)",
    )
    args = ap.parse_args(argv)
    try:
        args.target = json.loads(args.target)
    except json.JSONDecodeError as e:
        raise BadInput(f"--target: not JSON ({e.msg})") from None
    if not isinstance(args.target, dict) or "kind" not in args.target:
        raise BadInput('--target: a JSON dict with "kind", e.g. {"kind": "cuda"}')
    for name, low in (("trials", 0), ("samples", 1), ("repeats", 1)):
        if getattr(args, name) < low:
            raise BadInput(f"--{name}: must be >= {low}")
    if args.inputs is not None and args.export_inputs is not None:
        raise BadInput("--inputs and --export-inputs exclude each other")
    if args.inputs is None and not args.study.is_file():
        raise BadInput(f"--study: no such file: {args.study}")
    return args


def _check_environment(args: argparse.Namespace) -> None:
    if args.inputs is None:
        from tuneqn.controller.config import load_config

        model_path = Path(load_config(args.study).models[0].path or "")
        if not model_path.is_file():
            raise BadInput(f"example not prepared ({model_path}): run `make example`")
    if args.export_inputs is not None:
        return
    try:
        import tvm  # noqa: F401
    except ImportError:
        raise BadInput("apache-tvm is not installed: pip install 'tuneqn[tvm]'") from None
    problem = _tuning_module().environment_problem() if args.trials > 0 else ""
    if problem:
        raise BadInput(problem)


def main(argv: list[str] | None = None) -> int:
    """Run the bench; print the figures."""
    logging.basicConfig(level=logging.WARNING)
    try:
        args = _args(argv)
        _check_environment(args)
        if args.export_inputs is not None:
            _export_inputs(args, args.export_inputs)
            return 0
        if args.work is not None:
            args.work.mkdir(parents=True, exist_ok=True)
            result = run(args, args.work)
        else:
            with tempfile.TemporaryDirectory(prefix="tuneqn-tvm-bench-") as tmp:
                result = run(args, Path(tmp))
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"whole bench: {result['wall_s']:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
