"""MetaSchedule tuning for the TVM backend: one database per (tuning group, target), shared by candidates.

``tune`` prepares an imported Relax module the way ``relax.pipeline.static_shape_tuning_pipeline``
does (decompose, legalize, fold, fuse), extracts its tuning tasks (one per distinct fused
operator), tunes the tasks the database does not cover yet, and applies the database's best
schedules. Candidates of one model share most fused operators (a QDQ candidate differs from the
fully quantized one only around its excluded layers), so the second candidate tunes only what is
new to it: a task is covered once it holds ``ceil(trials / tasks)`` valid records, whichever
candidate measured them. The trial budget goes to the uncovered tasks in order of estimated work
(FLOPs × occurrences), ``per_task`` trials each, never more than ``trials`` in one call.

The database is MetaSchedule's ``JSONDatabase`` in ``work_dir`` (``database_workload.json``,
``database_tuning_record.json``; TVM's logs under ``logs/``); a file lock serialises tuning and
reading per ``work_dir`` across threads and processes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import inspect
import logging
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tvm
from tvm import relax
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.builder.local_builder import default_export
from tvm.s_tir.meta_schedule.runner import PyRunner, RunnerFuture, RunnerInput
from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

log = logging.getLogger(__name__)

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
LOCK_FILE = ".tuning.lock"
_MS_LOGGER = "tvm.s_tir.meta_schedule"


def _release(dist: str) -> tuple[int, ...]:
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ()
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return tuple(int(g) for g in m.groups()) if m else ()


def environment_problem() -> str:
    """Why MetaSchedule would crash in this Python environment ("" when it should work).

    Measured: apache-tvm 0.27.0.post1 with apache-tvm-ffi 0.1.15.post1/post2 dies with SIGSEGV in
    ``tvm::ffi::ToJSONGraph`` on any TIR node (``tvm.ir.save_json(tvm.tirx.const(1))``), which
    MetaSchedule's database and mutators call; with apache-tvm-ffi 0.1.14.post1 it works.
    """
    tvm_release, ffi_release = _release("apache-tvm"), _release("apache-tvm-ffi")
    if tvm_release[:2] == (0, 27) and ffi_release >= (0, 1, 15):
        return (
            f"apache-tvm {tvm.__version__} with apache-tvm-ffi {importlib.metadata.version('apache-tvm-ffi')} "
            "crashes serializing TIR (MetaSchedule tuning needs it): install 'apache-tvm-ffi<0.1.15'"
        )
    return ""


@contextlib.contextmanager
def _locked(work_dir: Path, exclusive: bool) -> Iterator[None]:
    """Hold ``work_dir``'s tuning lock (flock: other threads and processes wait)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(work_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _database(work_dir: Path) -> ms.database.JSONDatabase:
    return ms.database.JSONDatabase(
        path_workload=str(work_dir / WORKLOAD_FILE),
        path_tuning_record=str(work_dir / RECORD_FILE),
        allow_missing=True,
    )


def database_digest(work_dir: Path) -> str:
    """A digest of the database's records ("" when empty): part of the compile-cache key."""
    work_dir = Path(work_dir)
    records = work_dir / RECORD_FILE
    if not records.is_file() or records.stat().st_size == 0:
        return ""
    h = hashlib.sha256()
    with _locked(work_dir, exclusive=False):
        for name in (WORKLOAD_FILE, RECORD_FILE):  # records refer to workloads by their index
            path = work_dir / name
            h.update(name.encode() + b"\0")
            if path.is_file():
                with open(path, "rb") as f:
                    for block in iter(functools.partial(f.read, 1 << 20), b""):
                        h.update(block)
    return h.hexdigest()


def prepare(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The module as MetaSchedule sees it: decomposed, legalized, constants folded, operators fused
    (the first steps of ``relax.pipeline.static_shape_tuning_pipeline``)."""
    with target:
        return tvm.transform.Sequential(
            [
                relax.transform.DecomposeOpsForInference(),
                relax.transform.CanonicalizeBindings(),
                relax.pipeline.zero_pipeline(),
            ]
        )(mod)


def _physical_cores() -> int:
    try:
        import psutil  # pylint: disable=import-outside-toplevel  # comes with apache-tvm[rpc]
    except ImportError:
        return os.cpu_count() or 1
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def runs_here(target: tvm.target.Target) -> bool:
    """Whether code for ``target`` runs on this machine (a local runner can measure it): a CPU
    target for this machine's architecture, or a GPU kind with a device present."""
    kind = target.kind.name
    if kind in ("llvm", "c"):
        triple = str(target.attrs.get("mtriple", "") or "")
        return not triple or triple.split("-")[0] in (platform.machine(), {"arm64": "aarch64"}.get(platform.machine()))
    try:
        return bool(tvm.device(kind, 0).exist)
    except ValueError:  # a kind with no device type (e.g. "hexagon" on this build)
        return False


def tuning_target(target: tvm.target.Target, local: bool) -> tvm.target.Target:
    """``target`` with the ``num-cores`` MetaSchedule needs for CPU targets: this machine's physical
    cores when tuning locally; a remote CPU must say it in the target dict (ValueError otherwise)."""
    if target.kind.name not in ("llvm", "c") or "num-cores" in target.attrs:
        return target
    if not local:
        raise ValueError(
            'tuning a CPU target on a remote device needs its core count: add "num-cores": N '
            "(the cores the runtime's thread pool uses) to the target dict"
        )
    spec = {**target.export(), "num-cores": _physical_cores()}
    spec.pop("host", None)
    return tvm.target.Target(spec, host=target.host)


def _records(db: ms.database.JSONDatabase, task_mod: tvm.IRModule) -> int:
    """Valid records of one task's workload in ``db`` (without adding the workload to it)."""
    if not db.has_workload(task_mod):
        return 0
    return len(db.get_top_k(db.commit_workload(task_mod), 1 << 30))


def _work(task: Any) -> float:
    """Estimated FLOPs of one task times its occurrences (weight) in the model."""
    try:
        flops = float(tvm.s_tir.analysis.estimate_tir_flops(task.dispatched[0]))
    except tvm.TVMError:  # an operator whose FLOPs TVM cannot estimate: tune it last
        flops = 0.0
    return flops * float(task.weight)


def _export_so(compiler: str, rt_mod: Any) -> str:
    """MetaSchedule builder export: a shared library linked by ``compiler`` (a phone's NDK clang)."""
    path = os.path.join(tempfile.mkdtemp(prefix="tuneqn-ms-"), "tvm_tmp_mod.so")
    rt_mod.export_library(path, cc=compiler)
    return path


_intrin_lock = threading.Lock()


def import_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (MetaSchedule needs it in every process that tunes or builds).

    Its ~500 ``T.prim_func`` definitions each call ``inspect.stack()``, whose ``inspect.getmodule``
    scans all of ``sys.modules`` for every frame of TVMScript's ``eval`` (file ``<ast>``): 69 s of
    CPU on this machine. For a frame whose code comes from no file (``<...>``) ``getmodule``
    returns None after that scan, so it answers None at once while the import runs (6 s).
    """
    with _intrin_lock:
        if "tvm.s_tir.tensor_intrin" in sys.modules:
            return
        slow = inspect.getmodule

        def getmodule(object: object, _filename: str | None = None) -> types.ModuleType | None:  # inspect's names
            if inspect.isframe(object) and object.f_code.co_filename.startswith("<"):
                return None
            return slow(object, _filename)

        inspect.getmodule = getmodule
        try:
            import tvm.s_tir.tensor_intrin  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
        finally:
            inspect.getmodule = slow


@derived_object
class ThreadBuilder(PyBuilder):
    """MetaSchedule builder that compiles the measured candidates on threads of this process.

    MetaSchedule's ``LocalBuilder`` starts fresh worker processes for every batch, and each pays
    for importing TVM and its tensor intrinsics (~10 s on 2 cores): with the small per-task batches
    of a small budget that was most of the tuning time. LLVM code generation runs outside the GIL.
    ``compiler``: link each candidate into a shared library with this command (an NDK clang)
    instead of MetaSchedule's tar (which the local runner or a Python RPC server links itself).
    """

    def __init__(self, max_workers: int, compiler: str = "") -> None:
        super().__init__()
        self.f_export = functools.partial(_export_so, compiler) if compiler else None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ms-build")
        self.artifacts: list[str] = []

    def _build_one(self, b: BuilderInput) -> BuilderResult:
        try:  # MetaSchedule's default_build (without its deprecated tvm.build), then the export
            mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(b.mod)
            rt_mod = tvm.tirx.build(mod, target=b.target)
            path = self.f_export(rt_mod) if self.f_export is not None else default_export(rt_mod)
        except (tvm.TVMError, RuntimeError, ValueError, OSError) as e:  # the candidate fails, tuning goes on
            return BuilderResult(None, f"build failed: {e}")
        self.artifacts.append(path)
        return BuilderResult(path, None)

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        """Build (and export) each input; a failure becomes that result's error message."""
        return list(self.pool.map(self._build_one, build_inputs))

    def close(self) -> None:
        """Wait for the build threads to end; delete the built files (each in a temporary folder of its
        own, which MetaSchedule's local runner leaves behind)."""
        self.pool.shutdown()
        for path in self.artifacts:
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
        self.artifacts.clear()


def _cost_model() -> str:
    """``xgb`` when xgboost is installed (``apache-tvm[meta-schedule]``), else ``random``."""
    try:
        import xgboost  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        return "random"
    return "xgb"


@contextlib.contextmanager
def _quiet_meta_schedule() -> Iterator[None]:
    """MetaSchedule logs DEBUG to stdout unless its logger has a level: give it WARNING meanwhile."""
    logger = logging.getLogger(_MS_LOGGER)
    if logger.level != logging.NOTSET:
        yield
        return
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(logging.NOTSET)


def tune(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    work_dir: Path,
    trials: int,
    runner: Any | None = None,
    *,
    compiler: str = "",
) -> tuple[tvm.IRModule, float]:
    """MetaSchedule-tune `mod` (imported, before tvm.compile) with at most `trials` trials, records in work_dir's
    database (shared by all candidates of one model on one target); returns the module with the database's best
    schedules applied (ready for tvm.compile) and the tuning seconds.

    ``runner``: a MetaSchedule runner (:func:`rpc_runner`); None measures on this machine (a
    ``LocalRunner``, shut down afterwards). ``compiler``: the command that links each measured
    candidate into a shared library (an Android NDK clang for a phone; "" = MetaSchedule's
    default, a tar that the local runner or a Python RPC server links itself). The tuning seconds
    cover everything but the import: preparing, task extraction, search, measurement, applying.
    """
    if trials < 0:
        raise ValueError(f"trials must be >= 0, got {trials}")
    problem = environment_problem()
    if problem:
        raise RuntimeError(problem)
    work_dir = Path(work_dir)
    t0 = time.perf_counter()
    if runner is None and trials > 0 and not runs_here(target):
        raise ValueError(
            f"tuning for {target.kind.name} target {target} measures on the device: it needs an "
            "RPC runner (a tracker); this machine cannot run that code"
        )
    target = tuning_target(target, local=runner is None)
    mod = prepare(mod, target)
    with _locked(work_dir, exclusive=True), _quiet_meta_schedule():
        db = _database(work_dir)
        tasks = ms.relax_integration.extract_tasks(mod, target)
        todo: list[Any] = []
        per_task = 0
        if tasks and trials > 0:
            per_task = max(1, math.ceil(trials / len(tasks)))
            uncovered = [t for t in tasks if _records(db, t.dispatched[0]) < per_task]
            uncovered.sort(key=_work, reverse=True)
            todo = uncovered[: max(1, trials // per_task)]
            log.info(
                "%s: %d tasks, %d covered by the database, tuning %d with %d trials each",
                work_dir,
                len(tasks),
                len(tasks) - len(uncovered),
                len(todo),
                per_task,
            )
        if todo:
            _tune_tasks(todo, target, work_dir, db, trials, per_task, runner, compiler)
        import_tensor_intrinsics()  # the database's schedules may use them
        with target, db, tvm.transform.PassContext(opt_level=3):
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
    return mod, time.perf_counter() - t0


@contextlib.contextmanager
def _named_handlers() -> Iterator[None]:
    """Hide unnamed handlers of MetaSchedule's logger while it configures its loggers.

    MetaSchedule rebuilds its logging config from the names of the handlers already on its
    logger and fails on a handler without a name (e.g. one a host application or pytest's log
    capture attached); they are put back afterwards.
    """
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    hidden = [h for h in logger.handlers if h.get_name() is None]
    for h in hidden:
        logger.removeHandler(h)
    try:
        yield
    finally:
        for h in hidden:
            logger.addHandler(h)


def _tune_tasks(
    tasks: list[Any],
    target: tvm.target.Target,
    work_dir: Path,
    db: ms.database.JSONDatabase,
    trials: int,
    per_task: int,
    runner: Any | None,
    compiler: str,
) -> None:
    own_runner = runner is None
    starting: concurrent.futures.Future[Any] | None = None
    if own_runner:  # its worker process starts (imports TVM) while this one imports the intrinsics
        starter = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ms-runner")
        starting = starter.submit(ms.runner.LocalRunner)
        starter.shutdown(wait=False)
    builder = ThreadBuilder(max_workers=_physical_cores(), compiler=compiler)
    try:
        import_tensor_intrinsics()
        # MetaSchedule's default population (512 schedules, evolved 4 times per batch) costs ~45 s
        # per task on 2 cores whatever the batch: a small budget gets a population in proportion.
        strategy = ms.search_strategy.EvolutionarySearch(
            population_size=min(512, max(32, 16 * per_task)),
            init_min_unmeasured=min(50, max(8, 4 * per_task)),
            genetic_num_iters=4 if per_task >= 16 else 2,
        )
        with _named_handlers():
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                tasks, str(work_dir), space="post-order-apply", strategy=strategy, seed=0
            )
        if starting is not None:
            runner = starting.result()
        ms.tune.tune_tasks(
            tasks=contexts,
            task_weights=weights,
            work_dir=str(work_dir),
            max_trials_global=min(trials, per_task * len(tasks)),
            max_trials_per_task=per_task,
            num_trials_per_iter=per_task,
            builder=builder,
            runner=runner,
            database=db,
            cost_model=_cost_model(),
            task_scheduler="gradient",
        )
    finally:
        builder.close()
        if starting is not None and starting.exception() is None:  # a failed start raised above
            starting.result().pool.shutdown()
        elif isinstance(runner, TrackerRunner):
            runner.close()


@derived_object
class TrackerRunner(PyRunner):
    """MetaSchedule's ``RPCRunner`` (devices behind a TVM RPC tracker), started on first use.

    ``RPCRunner`` starts a worker process when it is made and keeps it until its pool is shut
    down; this one makes it at the first measurement and :meth:`close` (called by :func:`tune`
    when tuning ends) shuts it down, so a runner made for a job that finds its library in the
    cache costs nothing and none outlives its tuning.
    """

    def __init__(self, rpc_config: ms.runner.RPCConfig, evaluator_config: ms.runner.EvaluatorConfig) -> None:
        super().__init__()
        self.rpc_config = rpc_config
        self.evaluator_config = evaluator_config
        self._inner: Any | None = None
        self._lock = threading.Lock()

    def run(self, runner_inputs: list[RunnerInput]) -> list[RunnerFuture]:
        """Measure on a device of the key (one RPC session per candidate)."""
        with self._lock:
            if self._inner is None:
                self._inner = ms.runner.RPCRunner(
                    rpc_config=self.rpc_config, evaluator_config=self.evaluator_config, max_workers=1
                )
            inner = self._inner
        return inner.run(runner_inputs)

    def close(self) -> None:
        """End the worker process, if one was started (a later measurement starts another)."""
        with self._lock:
            inner, self._inner = self._inner, None
        if inner is not None:
            inner.pool.shutdown()


def rpc_runner(tracker_host: str, tracker_port: int, key: str, session_timeout: float) -> Any:
    """A MetaSchedule runner that measures on devices behind a TVM RPC tracker.

    A :class:`TrackerRunner`: one RPC session per measured candidate, requested under ``key``
    with priority 1 and ``session_timeout`` seconds (number 3, repeat 1, min_repeat_ms 100 per
    candidate, MetaSchedule's defaults); :func:`tune` ends its worker process when tuning ends.
    """
    return TrackerRunner(
        ms.runner.RPCConfig(
            tracker_host=tracker_host,
            tracker_port=int(tracker_port),
            tracker_key=key,
            session_priority=1,
            session_timeout_sec=max(1, int(math.ceil(session_timeout))),
        ),
        ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=100),
    )
