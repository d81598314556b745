"""A study: the controller's pipeline before any device is involved.

prepare (models + data) → calibrate once per (model, data, settings) → fully quantize
→ analyze and rank layers → plan candidates → build candidates (calibration reused).
Everything is recorded in the study store and reused on re-runs unless ``fresh``.

Reuse keys cover everything that determines the bytes of what is reused: the prepared
model's sha256 and whether it was pre-processed (``quantization.preprocess``), the data
samples' sha256 (and the calibration cache's content), every quantization setting, the
exclusion list and the tool versions (:func:`tool_versions`).

One process at a time works on an out dir: :class:`StudyLock` (an ``flock`` on
``<out>/tuneqn.lock``, held for the Study's life and released by the kernel when its
process dies) refuses a second one before it touches anything.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization.calibrate import load_tensors_data

from tuneqn import __version__
from tuneqn.controller.common import yielding
from tuneqn.controller.common.errors import UserError
from tuneqn.controller.common.files import atomic_write_text, file_digest, file_sha256
from tuneqn.controller.common.versions import tool_versions
from tuneqn.controller.config import PREPROCESS_PRESETS, StudyConfig
from tuneqn.controller.prepare.dataset import (
    PreparedData,
    Split,
    describe_preprocess,
    model_hw,
    prepare_data,
    save_split,
)
from tuneqn.controller.prepare.modelio import PreparedModel, prepare_model
from tuneqn.controller.quantize.analysis import (
    CONFIDENCE_SAMPLES,
    ConfidenceCheck,
    LayerError,
    analyze_dynamic,
    analyze_qoperator,
    analyze_static,
    fp32_confidence,
    rank_layers,
    static_layers,
)
from tuneqn.controller.quantize.auto import META as GATE_META
from tuneqn.controller.quantize.auto import auto_recipes
from tuneqn.controller.quantize.edits import (
    CandidateIndex,
    Derivations,
    Derived,
    QdqIndex,
    Unsupported,
    unsupported_settings,
)
from tuneqn.controller.quantize.edits_qop import QOperatorEditor
from tuneqn.controller.quantize.levels import (
    Activations16,
    Int4Cache,
    apply_levels,
    fits,
    float_layers,
    level_tag,
    normalize_levels,
    runtime_float,
)
from tuneqn.controller.quantize.quantizer import (
    QuantSettings,
    calibrate,
    quantize_candidate,
    runtime_options,
    runtime_options_of,
)
from tuneqn.controller.store import Store, layer_entry

log = logging.getLogger(__name__)

#: CPU priority (``os.nice``) of a min/max calibration in its child process, below the histogram calibrations'.
_SHORT_NICE = 10
#: Calibration sample bytes × model bytes from which a calibration runs in a child process that gives way to a
#: local agent's timing (:mod:`.yielding`): EfficientNet-Lite0 on 50 images is 5e14 (calibrating takes 8–25 s),
#: the test suite's models 1e10 (milliseconds; a child's start would take a second).
_YIELDING_WORK = 1e12


def _calibrate_from(
    model_path: Path,
    input_name: str,
    model_batch: int | str,
    samples: Path,
    settings: QuantSettings,
    cache_path: Path,
    fully_quantized: tuple[tuple[Path, QuantSettings], ...] = (),
) -> list[tuple[Path, str, int, Any]]:
    """:func:`calibrate` on the samples stored at ``samples`` (read where it runs: a yielding child gets the path,
    not 35 MB of pickled samples); then the fully quantized models ``(out, settings)`` of the recipes that share the
    calibration, each as the builder would write it (ORT's quantizer: 3 s for a per-channel Lite1), here where the
    calibration runs: in a child process, in parallel with the study's other calibration and its builder.
    Returns (out, sha256, size, runtime options) per model built; one that fails is left to the builder, which
    builds it again and reports why."""
    calibrate(model_path, input_name, model_batch, np.load(samples, allow_pickle=False), settings, cache_path)
    built = []
    for out, recipe in fully_quantized:
        try:
            quantize_candidate(model_path, out, recipe, [], cache_path)
            sha, size = file_digest(out)
            built.append((out, sha, size, runtime_options(onnx.load(str(out), load_external_data=False), [])))
        except Exception as exc:  # noqa: BLE001 - the builder builds it again and reports the error
            log.info("building %s with the calibration: %s: %s", out, type(exc).__name__, exc)
    return built


@dataclass(frozen=True)
class CandidatePlan:
    """A candidate to build: which layers of (model, mode) stay in float, and the precision levels
    (:mod:`tuneqn.controller.quantize.levels`) of the layers that are neither fp32 nor the recipe's int8."""

    id: str
    model: str
    mode: str  # the recipe's name (default recipes are named after their mode)
    k: int  # how many layers stay in float
    kind: str  # "set" (proposed by a search) | "explicit" (search.exclusion_sets)
    label: str
    excluded: tuple[str, ...]  # sorted: the float layers (fp32 and fp16)
    levels: tuple[tuple[str, str], ...] = ()  # sorted (layer, level) of the fp16 and int4 layers

    def level_map(self) -> dict[str, str]:
        """Every layer whose level is not the recipe's int8: ``{layer: level}``."""
        return {**dict.fromkeys(self.excluded, "fp32"), **dict(self.levels)}


def set_tag(excluded: tuple[str, ...] | list[str], levels: tuple[tuple[str, str], ...] = ()) -> str:
    """``fq`` for the fully quantized model, else ``x`` + 10 hex digits of the sha256 of the sorted set (and of
    the other levels, when a layer has one: an exclusion set alone is tagged as it always was)."""
    if not excluded and not levels:
        return "fq"
    text = "\n".join(sorted(excluded)) + (f"\n#levels\n{level_tag(levels)}" if levels else "")
    return "x" + hashlib.sha256(text.encode()).hexdigest()[:10]


def candidate_id(
    model: str, recipe: str, excluded: tuple[str, ...] | list[str], levels: tuple[tuple[str, str], ...] = ()
) -> str:
    """Stable candidate id from its content: ``model:recipe:fq`` or ``model:recipe:x1a2b3c4d5e``.

    One exclusion set (with its levels) of one recipe is one candidate, whichever search (or how many)
    proposed it, so it is built and evaluated once.
    """
    return f"{model}:{recipe}:{set_tag(excluded, levels)}"


def _finite(x: float | None) -> float:
    return float(x) if x is not None and x == x else float("-inf")


def _hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


LOCK_NAME = "tuneqn.lock"
SCRATCH_PREFIX = ".scratch-"


@dataclass(frozen=True)
class PreparedInput:
    """Model ``index`` of the study, prepared with its data samples, not registered yet (:meth:`Study.add_model`)."""

    index: int
    model: PreparedModel
    data: PreparedData


class StudyBusy(UserError):
    """Another process is working on the study's out dir (exit 2)."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a study's lock, as it wrote itself into the lock file."""

    pid: int | None
    command: str
    started_at: float | None
    host: str

    def describe(self) -> str:
        """``pid 123 on host (tuneqn tune study.toml, started 2025-01-01 12:00:00)``."""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at)) if self.started_at else "?"
        pid = f"pid {self.pid}" if self.pid is not None else "a process that is still starting"
        host = f" on {self.host}" if self.host and self.host != socket.gethostname() else ""
        return f"{pid}{host} ({self.command or '?'}, started {when})"


def default_command() -> str:
    """This process's command line, for the lock file."""
    return " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]])


def ensure_out_dir(path: Path, what: str = "out_dir") -> Path:
    """Create the study folder ``path`` (with parents); one-line UserError when that is impossible."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what}: {path} is an existing file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{what}: cannot create folder {path} ({exc.strerror or exc.__class__.__name__})") from None
    return path


class StudyLock:
    """Exclusive lock on a study's out dir: an ``flock`` on ``<out>/tuneqn.lock``.

    The holder writes its pid, command and start time into the file; a process that
    cannot get the lock raises :class:`StudyBusy` naming the holder, having changed
    nothing (the file is opened without truncation). The kernel releases the lock when
    the holding process dies, so a lock left by a killed run never blocks the next one.
    The file itself is never deleted (deleting an flock file races with its next opener).
    """

    def __init__(self, out_dir: Path, command: str | None = None) -> None:
        self.path = Path(out_dir) / LOCK_NAME
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise UserError(f"{self.path}: cannot open the study lock ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"{self.path}: cannot lock the study ({exc.strerror})") from None
            running = holder.describe() if holder else "another process"
            raise StudyBusy(
                f"{out_dir}: the study is in use by {running}; wait for it to finish or use another --out"
            ) from None
        self._fd: int | None = fd
        info = {
            "pid": os.getpid(),
            "command": command or default_command(),
            "started_at": time.time(),
            "host": socket.gethostname(),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        """Give the lock up (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> StudyLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> LockHolder | None:
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode()) if raw else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(info, dict):
        return None
    pid = info.get("pid")
    started = info.get("started_at")
    return LockHolder(
        pid if isinstance(pid, int) else None,
        str(info.get("command") or ""),
        float(started) if isinstance(started, int | float) else None,
        str(info.get("host") or ""),
    )


class Study:
    """The controller side of one study (one out dir, one store, one process at a time).

    Opening a Study takes the out dir's :class:`StudyLock` before anything in it is read or
    written (:class:`StudyBusy` when another process holds it); :meth:`close` releases it.
    """

    def __init__(self, cfg: StudyConfig, fresh: bool = False, command: str | None = None) -> None:
        self.cfg = cfg
        self.out_dir = ensure_out_dir(Path(cfg.out_dir))
        self.lock = StudyLock(self.out_dir, command)
        self._scratch: Path | None = None
        self._scratch_lock = threading.Lock()
        try:
            for stale in self.out_dir.glob(f"{SCRATCH_PREFIX}*"):  # left by a killed run (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            self.store = Store.open(self.out_dir)
            if fresh:
                self.store.reset()
            self.store.set_meta("config", cfg.model_dump_json())
            self.store.set_meta("name", cfg.name or "study")
            self.store.set_meta("tuneqn_version", __version__)
        except BaseException:
            self.lock.release()
            raise
        self.models: dict[str, PreparedModel] = {}
        self.data: dict[str, PreparedData] = {}
        self._auto: dict[str, list[str]] = {}  # model -> the recipes auto tries on it (recipes = "auto")
        self._auto_notes: dict[str, str] = {}
        self._calibrating: dict[Path, threading.Lock] = {}  # one calibration per cache file at a time
        self._building: dict[str, threading.Lock] = {}  # one build per candidate at a time
        #: fully quantized models a calibration built (:meth:`_calibrate`): path -> (build key, sha256, size, runtime)
        self._prebuilt: dict[Path, tuple[str, str, int, dict[str, list[str]]]] = {}
        self._layers: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._listed: dict[tuple[str, str], list[dict[str, Any]]] = {}  # quantized_layers (not analyzed)
        self._derivations = Derivations()
        self._sizes: dict[str, int | str] = {}  # candidate id -> predicted size, or "build" (see _predict)
        self._float_protos: dict[str, onnx.ModelProto] = {}  # model -> its prepared float model (precision levels)
        self._int4_cache: dict[str, Int4Cache] = {}  # model -> its int4 weights so far (levels.apply_levels)
        self._levels_lock = threading.Lock()
        self._warned_sets: set[tuple[str, str, str]] = set()  # explicit sets left out of a recipe (said once)
        self._ranges: dict[tuple[str, str], tuple[Path, dict[str, tuple[float, float]]]] = {}  # calibrated, a16
        self._fits: dict[tuple[str, str, str, str], bool] = {}  # (model, recipe, layer, level) -> level_fits
        self._fq_protos: dict[tuple[str, str], tuple[str, onnx.ModelProto]] = {}  # (model, recipe) -> (sha256, fq)

    def close(self) -> None:
        """Close the store, remove scratch files and release the out dir's lock."""
        try:
            self.store.close()
        finally:
            if self._scratch is not None:
                shutil.rmtree(self._scratch, ignore_errors=True)
                self._scratch = None
            self.lock.release()

    def __enter__(self) -> Study:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def quantizer_input(self, model: str, pm: PreparedModel | None = None) -> Path:
        """A private link (or copy) of the prepared model for the ORT quantizer and the analysis.

        ORT writes ``<model stem>-inferred.onnx`` next to the file it is given and deletes it
        afterwards: two runs (or two threads) given the shared ``models/<name>.onnx`` write and
        delete the same file (FileNotFoundError). Each thread of this Study gets its own folder
        under ``<out>/.scratch-*`` (removed by :meth:`close`, or by the next Study after a crash).
        """
        pm = pm or self.models[model]
        with self._scratch_lock:
            if self._scratch is None:
                self._scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=self.out_dir))
            folder = self._scratch / f"t{threading.get_ident()}"
        path = folder / f"{pm.name}-{pm.sha256[:16]}.onnx"
        if not path.is_file():
            folder.mkdir(exist_ok=True)
            tmp = folder / f"{path.name}.part"
            tmp.unlink(missing_ok=True)
            try:
                os.link(pm.path, tmp)
            except OSError:  # a file system without hard links
                shutil.copyfile(pm.path, tmp)
            os.replace(tmp, path)
        return path

    # ------------------------------------------------------------------ prepare
    def prepare(self) -> None:
        """Load and prepare every model and its data samples."""
        for i in range(len(self.cfg.models)):
            self.add_model(self.prepare_model(i))
        self.finish_prepare()

    def prepare_model(self, i: int) -> PreparedInput:
        """Prepare model ``i`` of the study and its data samples (with the FP32 confidence check) without
        registering it: safe on a worker thread while other models are in use; :meth:`add_model` registers it."""
        spec = self.cfg.models[i]
        pm = prepare_model(
            spec,
            self.out_dir / "models",
            self.cfg.hub_cache_dir,
            label=f"models[{i}]",
            preprocess_model=self.cfg.quantization.preprocess,
        )
        data = prepare_data(self.cfg.dataset, pm.input_shape, self.out_dir / "data" / pm.name)
        warning = self.confidence_warning(pm, data)
        if warning is not None:
            pm.notes.append(f"WARNING: {warning}")
        return PreparedInput(i, pm, data)

    def add_model(self, prepared: PreparedInput) -> None:
        """Register a prepared model (in the store too): its recipes, its exclusion sets checked, its stale
        candidates forgotten. The model maps are replaced, not changed in place, so a thread iterating the
        models seen so far is never disturbed."""
        pm, data = prepared.model, prepared.data
        self.models = {**self.models, pm.name: pm}
        self.data = {**self.data, pm.name: data}
        self.store.put_model(pm.to_row())
        for split in (data.eval, data.calibration, data.analysis):
            # Every split of a model carries the same list of images skipped while preparing its data.
            self.store.put_dataset(
                f"{pm.name}/{split.name}", split.path, split.sha256, split.items, split.labels, skipped=data.skipped
            )
        self._choose_recipes(pm.name)
        self._check_exclusion_sets(pm)

    def finish_prepare(self) -> None:
        """Every model is registered: the recipes chosen for all of them are kept in the store."""
        self._choose_recipes()

    def confidence_warning(self, pm: PreparedModel, data: PreparedData) -> str | None:
        """Whether the FP32 model looks confused on the first images of the calibration sample (the usual sign
        of wrong preprocessing): the warning, also logged, or None. Classifier-like outputs only; the
        measurement is stored and reused while the prepared model and the sample are unchanged."""
        key = _hash("confidence", pm.sha256, data.calibration.sha256, CONFIDENCE_SAMPLES, __version__)
        meta = f"fp32_confidence/{pm.name}"
        stored = json.loads(self.store.get_meta(meta) or "{}")
        if stored.get("key") == key:
            check = ConfidenceCheck(**stored["check"]) if stored["check"] else None
        else:
            check = fp32_confidence(self.quantizer_input(pm.name, pm), pm.input_name, data.calibration.load())
            self.store.set_meta(meta, json.dumps({"key": key, "check": asdict(check) if check else None}))
        problem = check.problem() if check is not None else None
        if problem is None:
            return None
        pp = self.cfg.dataset.preprocess
        fix = (
            f"(now {describe_preprocess(pp, model_hw(pm.input_shape, pp))}); give the model's with --preprocess "
            f"({', '.join(PREPROCESS_PRESETS)}) or --scale/--offset/--mean/--std ([dataset.preprocess])"
            if self.cfg.dataset.images is not None
            else "(check how dataset.tensors were prepared)"
        )
        warning = f"{problem}, the usual sign of wrong preprocessing {fix}"
        log.warning("%s: %s", pm.name, warning)
        return warning

    def _choose_recipes(self, model: str | None = None) -> None:
        """With ``recipes = "auto"``: the recipes ``model`` tries (``quantize.auto.auto_recipes``); the choices of every
        model registered so far are kept in the store."""
        if model is not None and self.cfg.quantization.auto:
            chosen, self._auto_notes[model] = auto_recipes(self.models[model].path, self.cfg.search.layer_op_types)
            self._auto = {**self._auto, model: chosen}
            log.info("%s: recipes chosen automatically: %s (%s)", model, ", ".join(chosen), self._auto_notes[model])
        self.store.set_meta(
            GATE_META, json.dumps({"auto": self.cfg.quantization.auto, "models": self._auto, "notes": self._auto_notes})
        )

    def _check_exclusion_sets(self, pm: PreparedModel) -> None:
        if not self.cfg.search.exclusion_sets:
            return
        names = {n.name for n in onnx.load(str(pm.path), load_external_data=False).graph.node}
        for i, ex in enumerate(self.cfg.search.exclusion_sets):
            unknown = [layer for layer in ex.layers if layer not in names]
            if unknown:
                raise UserError(f"search.exclusion_sets[{i}].layers: unknown layer '{unknown[0]}' in model '{pm.name}'")

    def recipes(self, model: str | None = None) -> list[str]:
        """Names of the study's quantization recipes (``[[quantization.recipes]]``, else its modes); with
        ``recipes = "auto"`` those auto tries on ``model`` (on any model: in :data:`AUTO_RECIPES`' order)."""
        names = self.cfg.quantization.recipe_names()
        if not self._auto:
            return names
        chosen = self._auto.get(model, []) if model is not None else {r for rs in self._auto.values() for r in rs}
        return [r for r in names if r in chosen]

    @property
    def auto(self) -> bool:
        """Whether the recipes were chosen automatically (the recipe gate decides which are searched)."""
        return bool(self._auto)

    def modes(self) -> list[str]:
        """The study's recipes (older name: a default recipe is named after its mode)."""
        return self.recipes()

    def settings(self, recipe: str) -> QuantSettings:
        """Quantizer settings of a recipe (a study recipe, a preset or a variant such as ``static.qdq``)."""
        return QuantSettings.from_spec(self.cfg.quantization, recipe)

    def variant_base(self, recipe: str) -> str | None:
        """The study recipe a variant recipe (``<recipe>.qdq``, ``<recipe>.float-Conv``) derives from; None
        for a study recipe or a name that is no variant of one."""
        if recipe in self.recipes():
            return None
        name = recipe
        while "." in name:
            name = name.rpartition(".")[0]
            if name in self.recipes():
                try:
                    self.cfg.quantization.resolve(recipe)
                except ValueError:
                    return None
                return name
        return None

    def is_recipe(self, recipe: str) -> bool:
        """A study recipe or a variant of one."""
        return recipe in self.recipes() or self.variant_base(recipe) is not None

    # ------------------------------------------------------------------ calibration
    def calibration_cache(self, model: str, mode: str) -> Path | None:
        """ORT calibration cache of (model, calibration sample, the settings it depends on); created once and
        shared by the recipes that differ only in how the ranges are applied (per-tensor and per-channel)."""
        key = self._calibration_key(model, mode)
        if key is None:
            return None
        path = self._calibration_file(model, key)
        with self._scratch_lock:
            lock = self._calibrating.setdefault(path, threading.Lock())
        with lock:  # a candidate's build and an analysis on another thread may need it at once
            if not path.is_file():
                self._calibrate(model, self.settings(mode), key, path)
        return path

    def calibration_path(self, model: str, mode: str) -> Path | None:
        """Where (model, mode)'s calibration cache is or will be (:meth:`calibration_cache`); None when the recipe
        is not calibrated (dynamic). Nothing is calibrated."""
        key = self._calibration_key(model, mode)
        return None if key is None else self._calibration_file(model, key)

    def _calibration_key(self, model: str, mode: str) -> str | None:
        """What (model, mode)'s calibration depends on; None when the recipe is not calibrated (dynamic)."""
        settings = self.settings(mode)
        if settings.mode != "static":
            return None
        pm, data = self.models[model], self.data[model]
        return _hash(
            "calibration",
            pm.sha256,
            pm.preprocessed,
            data.calibration.sha256,
            settings.calibration_key(),
            tool_versions(),
        )

    def _calibration_file(self, model: str, key: str) -> Path:
        return self.out_dir / "calibration" / f"{model}-{key}.json"

    def _calibrate(self, model: str, settings: QuantSettings, key: str, path: Path) -> None:
        pm, data = self.models[model], self.data[model]
        t0 = time.perf_counter()
        source = self.quantizer_input(model)
        fq = [self.make_plan(model, r, ()) for r in self.recipes(model) if self._calibration_key(model, r) == key]
        args = (
            source,
            pm.input_name,
            pm.input_shape[0],
            data.calibration.path,
            settings,
            path,
            tuple((self.candidate_path(p), self.settings(p.mode)) for p in fq),
        )
        # a long call (Lite1's percentile calibration: ~25 s) runs in a child process that pauses while a local
        # agent times (yielding.run); a small one here, where starting a child would cost more than the call
        if data.calibration.path.stat().st_size * source.stat().st_size >= _YIELDING_WORK:
            # min/max is the short one (Lite1: 5 s vs 20-30 s for percentile): it leaves the long one, which the
            # recipe gate waits for, its core
            built = yielding.run(
                _calibrate_from, *args, nice=_SHORT_NICE if settings.calibration_method == "minmax" else 0
            )
        else:
            built = _calibrate_from(*args)
        log.info("%s: calibrated on %d samples in %.1fs", model, data.calibration.size, time.perf_counter() - t0)
        self.store.put_calibration(key, model, settings.__dict__, path)
        calibration_sha = file_sha256(path)
        keys = {self.candidate_path(plan): self._build_key(plan, calibration_sha) for plan in fq}
        with self._scratch_lock:  # the builder records them with its plan's label when it gets to them
            self._prebuilt.update({out: (keys[out], sha, size, runtime) for out, sha, size, runtime in built})

    # ------------------------------------------------------------------ analysis
    def calibration_sha256(self, model: str, mode: str) -> str | None:
        """sha256 of the calibration cache's content (static; calibrates first if needed), else None."""
        cache = self.calibration_cache(model, mode)
        return file_sha256(cache) if cache is not None else None

    def analysis_key(self, model: str, mode: str) -> str:
        """What the ranking of (model, mode) depends on."""
        pm, data = self.models[model], self.data[model]
        s = self.cfg.search
        return _hash(
            "analysis",
            pm.sha256,
            pm.preprocessed,
            data.calibration.sha256,
            self.calibration_sha256(model, mode),
            data.analysis.sha256,
            self.settings(mode).key(),
            s.layer_op_types,
            s.xmodel_weight,
            tool_versions(),
        )

    def analyze(self, model: str, mode: str) -> list[dict[str, Any]]:
        """Ranked layers of (model, mode): stored ones when still valid, else measured now."""
        key = self.analysis_key(model, mode)
        stored = self.store.analysis(model, mode)
        if stored is not None and stored["key"] == key:
            rows = self.store.layers(model, mode)
            if rows:
                self._layers[(model, mode)] = rows
                return rows
        pm = self.models[model]
        src = self.quantizer_input(model)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="tuneqn-fq-") as tmp:
            fq = Path(tmp) / "fq.onnx"
            settings = self.settings(mode)
            cache = self.calibration_cache(model, mode)
            quantize_candidate(src, fq, settings, [], cache)
            analysis_data = self.data[model].analysis.load()
            op_types = self.cfg.search.layer_op_types
            if settings.mode == "static" and settings.format == "qoperator":
                # qdq_err from the QDQ form (same settings and calibration cache → same scales),
                # xmodel_err from the real QOperator model (see analysis.analyze_qoperator).
                fq_qdq = Path(tmp) / "fq-qdq.onnx"
                quantize_candidate(src, fq_qdq, settings.model_copy(update={"format": "qdq"}), [], cache)
                errors = analyze_qoperator(src, fq_qdq, fq, pm.input_name, analysis_data, op_types)
            elif settings.mode == "static":
                errors = analyze_static(src, fq, pm.input_name, analysis_data, op_types)
            else:
                errors = analyze_dynamic(src, fq, pm.input_name, analysis_data, op_types, self.settings(mode))
            fq_sha, _ = file_digest(fq)
        if not errors:
            if self.variant_base(mode) is not None:  # a variant that leaves every searched layer in float
                log.warning(
                    "model %s: variant recipe %s quantizes no layer of types %s",
                    model,
                    mode,
                    ", ".join(self.cfg.search.layer_op_types),
                )
                self._layers[(model, mode)] = []
                return []
            raise UserError(
                f"model '{model}': no quantized layer of types {', '.join(self.cfg.search.layer_op_types)} "
                f"in {mode} mode"
            )
        ranked: list[LayerError] = rank_layers(errors, self.cfg.search.xmodel_weight)
        rows = [e.to_dict() for e in ranked]
        self.store.put_analysis(model, mode, key, fq_sha, time.perf_counter() - t0, rows)
        rows = self.store.layers(model, mode)
        self._layers[(model, mode)] = rows
        return rows

    def analyze_all(self) -> list[dict[str, Any]]:
        """Analyze every (model, recipe); write layers.json; forget stale candidates."""
        rows: list[dict[str, Any]] = []
        for model in self.models:
            for mode in [] if self.auto else self.recipes(model):  # auto: once the gate passes them
                rows.extend(self.analyze(model, mode))
        self.write_layer_outputs(rows)
        self.forget_stale_candidates()
        return rows

    def forget_stale_candidates(self, model: str | None = None) -> int:
        """Drop the stored candidates of this study's recipes (of ``model``, when given) whose inputs changed
        (new weights, data, settings or tools: their ``build_key`` is no longer today's) and delete their
        files; their results stay in the store. Returns how many were dropped."""
        n = 0
        for row in self.store.candidates():
            if row["kind"] == "fp32" or row["model"] not in self.models or not self.is_recipe(row["mode"]):
                continue
            if model is not None and row["model"] != model:
                continue
            plan = self.make_plan(
                row["model"], row["mode"], row["excluded"], row["label"], row["kind"], row.get("levels") or {}
            )
            if plan.id != row["id"] or self.build_key(plan) != row.get("build_key"):
                self.store.delete_candidate(row["id"])
                Path(row["path"]).unlink(missing_ok=True)
                n += 1
        if n:
            log.info("forgot %d candidates built from earlier inputs", n)
        return n

    @property
    def error_ranked(self) -> bool:
        """Whether a search of the study orders layers by the error analysis (``paper``, ``qdq``, ``xmodel``).
        A study whose every search measures its own ranking (``measured``, the default) needs only the list of
        quantized layers: :meth:`search_layers` takes it from the fully quantized model, without the analysis
        (on EfficientNet-Lite1 25–65 s of CPU per recipe, before the first screen)."""
        return any(run.ranking != "measured" for run in self.cfg.search.runs())

    def search_layers(self, model: str, mode: str) -> list[dict[str, Any]]:
        """What the searches of (model, mode) need before they start: the ranked layers (:meth:`analyze`) when
        :attr:`error_ranked`, else only the quantized layers (:meth:`quantized_layers`)."""
        return self.analyze(model, mode) if self.error_ranked else self.quantized_layers(model, mode)

    def quantized_layers(self, model: str, mode: str) -> list[dict[str, Any]]:
        """The layers of ``search.layer_op_types`` that the fully quantized model of a static recipe runs
        quantized (``name``, ``op_type``, ``idx``, ``output``, ``fused_activation``; graph order), read from
        that model (built first if need be) without measuring errors: the layers :meth:`analyze` would rank.
        Stored analysis rows when valid; other recipes (dynamic) are analyzed."""
        known = self._layers.get((model, mode))
        if known is not None:
            return known
        if self.settings(mode).mode != "static":
            return self.analyze(model, mode)
        stored = self.store.analysis(model, mode)
        if stored is not None and stored["key"] == self.analysis_key(model, mode):
            return self.analyze(model, mode)  # the stored ranking (nothing measured)
        listed = self._listed.get((model, mode))
        if listed is None:
            row = self.build(self.make_plan(model, mode, ()))  # the builder's own build when it has one
            layers = static_layers(
                onnx.load(str(self.quantizer_input(model))), onnx.load(row["path"]), self.cfg.search.layer_op_types
            )
            if not layers:
                return self.analyze(model, mode)  # says why (no quantized layer), as without this shortcut
            listed = [{"model": model, "mode": mode, **la} for la in layers]
            self._listed[(model, mode)] = listed
        return listed

    def analyzed_rows(self) -> list[dict[str, Any]]:
        """The ranked layers of every (model, recipe) analyzed so far by this Study, in the study's order."""
        return [
            r for model in self.models for recipe in self.recipes(model) for r in self._layers.get((model, recipe), [])
        ]

    def write_layer_outputs(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``layers.json`` (rank order within each (model, mode)); returns its entries, which the report draws
        (:func:`tuneqn.controller.report.layer_plot.write_layer_plot`). Nothing without an analysis (a study
        whose searches all measure their ranking analyzes no layer, see :attr:`error_ranked`)."""
        if not rows:
            return []
        out = [layer_entry(r) for r in rows]
        atomic_write_text(self.out_dir / "layers.json", json.dumps(out, indent=1, allow_nan=True))
        return out

    # ------------------------------------------------------------------ candidates
    def _layer_rows(self, model: str, recipe: str) -> list[dict[str, Any]]:
        rows = self._layers.get((model, recipe))
        return rows if rows is not None else self.analyze(model, recipe)

    def layer_names(self, model: str, recipe: str) -> list[str]:
        """The quantizable layers of (model, recipe) in graph order."""
        rows = self._layer_rows(model, recipe) if self.error_ranked else self.quantized_layers(model, recipe)
        return [r["name"] for r in sorted(rows, key=lambda r: r["idx"])]

    def ranking(self, model: str, recipe: str, name: str = "paper") -> list[str]:
        """Layers of (model, recipe), most sensitive first, by an error ranking.

        ``paper``: the score (``xmodel_weight``·norm_xmodel + the rest·norm_qdq), as analyzed;
        ``qdq``: the local error alone; ``xmodel``: the error seen at the fully quantized model's
        layer output. Ties keep graph order. (``measured`` needs evaluations: see ``search/``.)
        """
        rows = self._layer_rows(model, recipe)
        key = {"paper": "score", "qdq": "qdq_err", "xmodel": "xmodel_err"}.get(name)
        if key is None:
            raise ValueError(f"ranking {name!r} is not an error ranking (paper, qdq, xmodel)")
        if key == "score":
            return [r["name"] for r in sorted(rows, key=lambda r: r["rank"])]
        return [r["name"] for r in sorted(rows, key=lambda r: (-_finite(r[key]), r["idx"]))]

    def make_plan(
        self,
        model: str,
        recipe: str,
        excluded: tuple[str, ...] | list[str],
        label: str = "",
        kind: str = "set",
        levels: Mapping[str, str] | None = None,
    ) -> CandidatePlan:
        """The candidate of (model, recipe) that keeps ``excluded`` in float and gives the layers of ``levels`` their
        level (``fp32``, ``fp16``, ``int8``, ``int4``; a layer in both takes its level)."""
        chosen = {**dict.fromkeys(excluded, "fp32"), **(levels or {})}
        pairs = normalize_levels(chosen)
        ex = float_layers(pairs)
        other = tuple((layer, lv) for layer, lv in pairs if lv != "fp32")
        if not label:
            label = f"k={len(ex)}" if ex else "fq"
            counts = Counter(lv for _, lv in other)
            label += "".join(f" +{n} {lv}" for lv, n in sorted(counts.items()))
        return CandidatePlan(candidate_id(model, recipe, ex, other), model, recipe, len(ex), kind, label, ex, other)

    def prefix_plans(
        self, model: str, recipe: str, order: list[str], label: str = "k=", base: Mapping[str, str] | None = None
    ) -> list[CandidatePlan]:
        """The paper's candidates over ``order``: k = 0, step, … ≤ max_k (every k with step 1); with ``base``
        (precision levels of some layers) each keeps those levels but for its float layers."""
        s = self.cfg.search
        top = len(order) if s.max_k is None else min(s.max_k, len(order))
        if not base:
            return [self.make_plan(model, recipe, order[:k], f"{label}{k}") for k in range(0, top + 1, s.step)]
        out = []
        for k in range(0, top + 1, s.step):
            levels = {**base, **dict.fromkeys(order[:k], "fp32")}
            tail = "".join(
                f" +{n} {lv}" for lv, n in sorted(Counter(v for v in levels.values() if v != "fp32").items())
            )
            out.append(self.make_plan(model, recipe, (), f"{label}{k}{tail}", levels=levels))
        return out

    def explicit_plans(self, model: str, recipe: str) -> list[CandidatePlan]:
        """The study's ``search.exclusion_sets`` as candidates of (model, recipe)."""
        out = []
        for ex in self.cfg.search.exclusion_sets:
            misfit = [
                f"{layer} ({lv})" for layer, lv in ex.levels.items() if not self.level_fits(model, recipe, layer, lv)
            ]
            if misfit:  # a recipe without levels (dynamic, QOperator), or a layer that cannot take its level
                if (model, recipe, ex.name) not in self._warned_sets:
                    self._warned_sets.add((model, recipe, ex.name))
                    log.warning(
                        "%s/%s: exclusion set %s left out: %s cannot take those levels here",
                        model,
                        recipe,
                        ex.name,
                        ", ".join(misfit),
                    )
                continue
            out.append(self.make_plan(model, recipe, ex.layers, ex.name, kind="explicit", levels=ex.levels))
        return out

    def plan(self, model: str, mode: str) -> list[CandidatePlan]:
        """The paper's candidates of (model, recipe) over its error ranking, then the explicit sets."""
        return self.prefix_plans(model, mode, self.ranking(model, mode)) + self.explicit_plans(model, mode)

    def all_plans(self) -> list[CandidatePlan]:
        """The paper's candidates of every (model, recipe)."""
        return [p for model in self.models for mode in self.recipes(model) for p in self.plan(model, mode)]

    def candidate_path(self, plan: CandidatePlan) -> Path:
        """Where a candidate's file lives in the study."""
        return self.out_dir / "candidates" / plan.model / plan.mode / f"{set_tag(plan.excluded, plan.levels)}.onnx"

    def build_key(self, plan: CandidatePlan) -> str:
        """What a candidate's bytes depend on: the prepared model (and whether it was pre-processed),
        the calibration cache's content, every quantization setting, the exclusion list and the
        tool versions."""
        return self._build_key(plan, self.calibration_sha256(plan.model, plan.mode))

    def _build_key(self, plan: CandidatePlan, calibration_sha: str | None) -> str:
        pm = self.models[plan.model]
        parts: tuple[object, ...] = (
            "candidate",
            pm.sha256,
            pm.preprocessed,
            calibration_sha,
            self.settings(plan.mode).key(),
            sorted(plan.excluded),
            tool_versions(),
        )
        return _hash(*parts, [list(p) for p in plan.levels]) if plan.levels else _hash(*parts)

    def build(self, plan: CandidatePlan, out: Path | None = None) -> dict[str, Any]:
        """Build (or reuse) a candidate file and record it; returns its row.

        A stored candidate is reused only when its ``build_key`` is today's and its file still
        has the stored sha256. With ``out`` the candidate is written there and not recorded.
        One build of a candidate at a time: a thread that asks while another builds it gets that build.
        """
        if out is not None:
            return self._build(plan, out)
        with self._scratch_lock:
            lock = self._building.setdefault(plan.id, threading.Lock())
        with lock:
            return self._build(plan, None)

    def _build(self, plan: CandidatePlan, out: Path | None) -> dict[str, Any]:
        settings = self.settings(plan.mode)
        key = self.build_key(plan)
        stored = self.store.candidate(plan.id)
        path = out or self.candidate_path(plan)
        if (
            out is None
            and stored is not None
            and stored.get("build_key") == key
            and Path(stored["path"]) == path
            and path.is_file()
            and file_sha256(path) == stored["sha256"]
        ):
            return stored
        derived = self.derive(plan) if plan.excluded or plan.levels else None
        with self._scratch_lock:
            prebuilt = self._prebuilt.pop(path, None) if out is None else None
        if (
            derived is None
            and prebuilt is not None
            and prebuilt[0] == key
            and path.is_file()
            and file_sha256(path) == prebuilt[1]
        ):
            _, sha, size, runtime = prebuilt  # built with the calibration
        elif derived is None:
            quantize_candidate(
                self.quantizer_input(plan.model),
                path,
                settings,
                list(plan.excluded),
                self.calibration_cache(plan.model, plan.mode),
            )
            if plan.levels:
                self._with_levels(plan, onnx.load(str(path))).write(path)
            sha, size = file_digest(path)
            floats = runtime_float(plan.excluded, dict(plan.levels))
            runtime = runtime_options(onnx.load(str(path), load_external_data=False), floats)
        else:
            derived.write(path)
            sha, size = derived.sha256(), derived.size
            floats = runtime_float(plan.excluded, dict(plan.levels))
            runtime = runtime_options_of(derived.nodes, derived.initializer_names, floats)
        row = self._row(plan, key, path, size, sha, runtime)
        if out is None:
            self.store.put_candidate(row)
        return row

    def _row(
        self, plan: CandidatePlan, key: str, path: Path, size: int, sha: str, runtime: dict[str, list[str]]
    ) -> dict[str, Any]:
        """A built candidate's row in the store."""
        return {
            "id": plan.id,
            "model": plan.model,
            "mode": plan.mode,
            "k": plan.k,
            "kind": plan.kind,
            "label": plan.label,
            "excluded": list(plan.excluded),
            "levels": dict(plan.levels),
            "settings_key": self.settings(plan.mode).key(),
            "build_key": key,
            "path": str(path),
            "size_bytes": size,
            "sha256": sha,
            "runtime": runtime,
        }

    # ------------------------------------------------------------------ candidates by graph edits
    def _edit_index(self, model: str, recipe: str, build_fq: bool) -> CandidateIndex | str | None:
        """The graph-edit index of (model, recipe) (:mod:`tuneqn.controller.quantize.edits`): built from its fully
        quantized candidate (built first when ``build_fq``); a string says why there is none; None while
        the fully quantized candidate is not built."""
        settings = self.settings(recipe)
        why = self._no_edits(settings)
        if why is not None:
            return why
        fq = self.make_plan(model, recipe, ())
        key = self.build_key(fq)
        ready = self._derivations.ready(model, recipe, key)
        if ready is not None:
            return ready
        row = self.store.candidate(fq.id)
        if row is None or row.get("build_key") != key or not Path(row["path"]).is_file():
            if not build_fq:
                return None
            row = self.build(fq)
        fq_path, cache = Path(row["path"]), self.calibration_cache(model, recipe) or Path()

        def load() -> CandidateIndex:
            if settings.format == "qoperator":
                return QOperatorEditor(
                    onnx.load(str(fq_path)),
                    onnx.load(str(self.quantizer_input(model))),
                    cache if cache.is_file() else None,
                    settings,
                )
            return QdqIndex.load(self.quantizer_input(model), fq_path, cache, settings)

        index = self._derivations.index(model, recipe, key, load)
        return index if index is not None else self._derivations.ready(model, recipe, key)

    @staticmethod
    def _no_edits(settings: QuantSettings) -> str | None:
        """Why a recipe's candidates are not derived by graph edits (None: they are): static QDQ recipes by
        :class:`edits.QdqIndex`, static QOperator recipes by ``edits_qop.QOperatorEditor``."""
        if settings.mode == "static" and settings.format == "qoperator":
            return unsupported_settings(settings.model_copy(update={"format": "qdq"}))  # the same type limits
        return unsupported_settings(settings)

    def derive(self, plan: CandidatePlan) -> Derived | None:
        """The candidate derived by graph edits from its recipe's fully quantized model (built first if need be),
        or None: the quantizer builds it (the reason logged at debug).

        Static QDQ recipes: :class:`tuneqn.controller.quantize.edits.QdqIndex` (the same bytes as the quantizer's).
        QOperator recipes: :class:`tuneqn.controller.quantize.edits_qop.QOperatorEditor` (the same bytes too).
        """
        index = self._edit_index(plan.model, plan.mode, build_fq=True)
        if index is None or isinstance(index, str):
            log.debug("%s: built by the quantizer (%s)", plan.id, index)
            return None
        try:
            derived = index.derive(plan.excluded)
        except Unsupported as exc:
            log.debug("%s: built by the quantizer (%s)", plan.id, exc)
            return None
        return self._with_levels(plan, onnx.load_from_string(derived.to_bytes())) if plan.levels else derived

    def takes_levels(self, recipe: str) -> bool:
        """Whether ``recipe``'s candidates can take precision levels other than fp32 and int8 (static QDQ)."""
        settings = self.settings(recipe)
        return settings.mode == "static" and settings.format == "qdq"

    def _float_proto(self, model: str) -> onnx.ModelProto:
        """The prepared float model, loaded once (the levels read its weights; never changed)."""
        with self._levels_lock:
            known = self._float_protos.get(model)
            if known is None:
                known = self._float_protos[model] = onnx.load(str(self.models[model].path))
            return known

    def level_fits(self, model: str, recipe: str, layer: str, level: str) -> bool:
        """Whether ``layer`` can take ``level`` in (model, recipe)'s candidates (checked once on its fully quantized
        model, built first if need be; fp32 and int8 always fit)."""
        if level in ("fp32", "int8"):
            return True
        if not self.takes_levels(recipe):
            return False
        key = (model, recipe, layer, level)
        known = self._fits.get(key)
        if known is None:
            row = self.build(self.make_plan(model, recipe, ()))
            float_model = self._float_proto(model)
            with self._levels_lock:
                fq = self._fq_protos.get((model, recipe))
                if fq is None or fq[0] != row["sha256"]:
                    fq = self._fq_protos[(model, recipe)] = (row["sha256"], onnx.load(row["path"]))
            a16 = self._activations16(model, recipe) if level == "a16" else None
            why = fits(fq[1], float_model, layer, level, a16)
            if why is not None:
                log.debug("%s/%s: %s", model, recipe, why)
            known = self._fits[key] = why is None
        return known

    def _with_levels(self, plan: CandidatePlan, model: onnx.ModelProto) -> Derived:
        """``model`` (the candidate of ``plan``'s float layers) with ``plan``'s other levels applied; a level that
        does not fit a layer raises :class:`~tuneqn.controller.quantize.edits.Unsupported`."""
        if not self.takes_levels(plan.mode):
            raise Unsupported(f"precision levels need a static QDQ recipe ({plan.mode} is not)")
        float_model = self._float_proto(plan.model)
        with self._levels_lock:
            cache = self._int4_cache.setdefault(plan.model, {})
        a16 = self._activations16(plan.model, plan.mode) if "a16" in dict(plan.levels).values() else None
        return Derived.of_model(apply_levels(model, float_model, dict(plan.levels), cache, a16))

    def _activations16(self, model: str, recipe: str) -> Activations16 | None:
        """The calibrated ranges the ``a16`` level quantizes a layer's input with (None: the recipe has none)."""
        cache = self.calibration_cache(model, recipe)
        if cache is None or not cache.is_file():
            return None
        with self._levels_lock:
            known = self._ranges.get((model, recipe))
            if known is None or known[0] != cache:
                data = load_tensors_data(cache)
                ranges = {
                    name: (float(np.asarray(td.range_value[0]).min()), float(np.asarray(td.range_value[1]).max()))
                    for name, td in data.data.items()
                }
                known = self._ranges[(model, recipe)] = (cache, ranges)
        settings = self.settings(recipe)
        return Activations16(known[1], settings.activation_type == "int8", settings.activation_symmetric)

    def predicted_size(self, plan: CandidatePlan) -> int | None:
        """A candidate's exact file size without building it (None: not predictable now, see
        :meth:`size_needs_build`). Never runs the quantizer."""
        size = self._predict(plan)
        return size if isinstance(size, int) else None

    def size_needs_build(self, plan: CandidatePlan) -> bool:
        """Whether a candidate's size is known only once it is built (its recipe's candidates are not derived, or
        this one is not); False while a prediction is pending (its fully quantized model not built yet)."""
        return self._predict(plan) == "build"

    def _predict(self, plan: CandidatePlan) -> int | str:
        """The predicted size, or "build" (only a build tells) or "pending" (the fully quantized model first).
        Kept per candidate for the Study's life (its inputs do not change while it runs)."""
        known = self._sizes.get(plan.id)
        if known is not None:
            return known
        if plan.levels:
            return "build"  # only a build tells (the levels' weights and scales)
        index = self._edit_index(plan.model, plan.mode, build_fq=False)
        if index is None:
            return "pending"
        if isinstance(index, str):
            answer: int | str = "build"
        else:
            try:
                answer = index.size(plan.excluded)
            except Unsupported:
                answer = "build"
        self._sizes[plan.id] = answer
        return answer

    def eval_split(self, model: str) -> Split:
        """The evaluation sample of a model."""
        return self.data[model].eval

    def screen_split(
        self,
        model: str,
        recipe: str,
        fq_topk: list[np.ndarray],
        fp32_topk: list[np.ndarray],
        classes: list[str] | None = None,
    ) -> Split:
        """The screening sample of (model, recipe): ``search.screen_samples`` samples of the evaluation
        sample where the recipe's fully quantized model is weakest.

        Given the fully quantized model's and FP32's top-k on the evaluation sample (one array per
        device, of ``classes``), samples are taken first where the top-1 classes differ on the most
        devices, then by the lowest top-k overlap with FP32 (the least sure agreements), then in order.
        That is where excluding a layer can win agreement back (or lose it), so a screen on 32 samples
        tells what a full evaluation would, at a fraction of its cost. The choice is kept in the store
        (:meth:`kept_screen_split` gives it back on a resume, whatever classes are connected then) and
        the split stored as ``<model>/screen/<recipe>`` (its items name the chosen samples).
        """
        full = self.data[model].eval
        chosen = screen_positions(fq_topk, fp32_topk, min(self.cfg.search.screen_samples, full.size))
        self.store.put_screen(model, recipe, full.sha256, chosen, list(classes or []))
        return self._screen_of(model, recipe, chosen)

    def kept_screen_split(self, model: str, recipe: str) -> Split | None:
        """The screening sample chosen for (model, recipe) before (by :meth:`screen_split`, maybe in an earlier
        run), or None when none was or it was chosen from another evaluation sample or size."""
        row = self.store.screen(model, recipe)
        full = self.data[model].eval
        n = min(self.cfg.search.screen_samples, full.size)
        if row is None or row["eval_sha256"] != full.sha256 or len(row["positions"]) != n:
            return None
        return self._screen_of(model, recipe, [int(i) for i in row["positions"]])

    def _screen_of(self, model: str, recipe: str, chosen: list[int]) -> Split:
        """The split of the evaluation sample's samples at positions ``chosen`` (saved and recorded)."""
        full = self.data[model].eval
        n = len(chosen)
        arr = full.load()[chosen]
        path, sha = save_split(self.out_dir / "data" / model, f"screen-{recipe}-{n}", arr)
        items = [full.items[i] for i in chosen]
        labels = [full.labels[i] for i in chosen] if full.labels else None
        split = Split(f"screen/{recipe}", path, sha, items, labels)
        self.store.put_dataset(f"{model}/screen/{recipe}", split.path, split.sha256, split.items, split.labels)
        return split


def screen_positions(fq_topk: list[np.ndarray], fp32_topk: list[np.ndarray], n: int) -> list[int]:
    """The ``n`` positions of the evaluation sample to screen on (sorted), from the fully quantized model's and
    FP32's top-k there (one array per device): where the top-1 classes differ on the most devices, then the
    lowest top-k overlap with FP32 summed over the devices, then the earliest."""
    size = len(fq_topk[0])
    differs = np.zeros(size)
    overlap = np.zeros(size)
    for q, f in zip(fq_topk, fp32_topk, strict=True):
        differs += q[:, 0] != f[:, 0]
        overlap += (q[:, :, None] == f[:, None, :]).any(axis=2).mean(axis=1)
    order = sorted(range(size), key=lambda i: (-differs[i], overlap[i], i))
    return sorted(order[:n])


def _mb(n: Any) -> str:
    return f"{n / 1e6:.3g} MB" if isinstance(n, int | float) else "? MB"


def find_candidate(store: Store, which: str, model: str | None = None, recipe: str | None = None) -> dict[str, Any]:
    """The stored candidate ``export --candidate WHICH`` names, from the store alone (nothing is built).

    WHICH is a candidate id, its ``fq``/``x…`` tag, an exclusion set's name or a candidate's label, a label a
    search gave it (``greedy/measured step 3``, ``measured k=18``) or a bare number k: the top-k layers of
    the paper's ranking *and* any candidate a search labelled ``k=<k>``.  ``model``/``recipe`` narrow the
    search (default: every model and recipe of the study).  More than one candidate matching is refused
    with the choices listed (:class:`UserError`, one line), as is none.
    """
    rows = [c for c in store.candidates() if c["kind"] != "fp32"]
    models = list(dict.fromkeys(c["model"] for c in rows))
    if model is not None and model not in models:
        raise UserError(f"--model: unknown model '{model}' (known: {', '.join(models) or 'none'})")
    rows = [c for c in rows if model is None or c["model"] == model]
    recipes = list(dict.fromkeys(c["mode"] for c in rows))
    if recipe is not None and recipe not in recipes:
        raise UserError(
            f"--recipe: no candidate of recipe '{recipe}' in the study (recipes: {', '.join(recipes) or 'none'})"
        )
    rows = [c for c in rows if recipe is None or c["mode"] == recipe]
    by_id = {c["id"]: c for c in rows}
    if which in by_id:
        return by_id[which]
    matches: dict[str, list[str]] = {}  # candidate id -> how it matched

    def hit(cid: str, how: str) -> None:
        if cid in by_id and how not in matches.setdefault(cid, []):
            matches[cid].append(how)

    number = which.isdigit()
    for c in rows:
        if which == c["id"].rsplit(":", 1)[-1]:
            hit(c["id"], f"tag {which}")
        if which == c["label"] or (number and c["label"].split()[-1:] == [f"k={which}"]):
            hit(c["id"], f"label '{c['label']}'")
    for p in store.proposals(model=model, mode=recipe):
        label, full = p["label"], f"{p['search']} {p['label']}"
        if which in (label, full) or (number and label.split()[-1:] == [f"k={which}"]):
            hit(p["candidate_id"], f"'{full}'")
    unbuilt: list[str] = []
    if number:
        for m, r in dict.fromkeys((c["model"], c["mode"]) for c in rows):
            order = [layer["name"] for layer in store.layers(m, r)]  # rank order
            if int(which) > len(order):
                continue
            cid = candidate_id(m, r, order[: int(which)])
            if cid in by_id:
                hit(cid, f"the paper's k={which}")
            else:
                unbuilt.append(f"{m}/{r}")
    if len(matches) == 1:
        return by_id[next(iter(matches))]
    if len(matches) > 1:
        choices = "; ".join(
            f"{cid} ({', '.join(how)}, {_mb(by_id[cid]['size_bytes'])})" for cid, how in matches.items()
        )
        raise UserError(f"--candidate: {which!r} matches {len(matches)} candidates: {choices}; give one of these ids")
    if unbuilt:
        raise UserError(
            f"--candidate: the paper's k={which} of {', '.join(unbuilt)} was never built or evaluated "
            "(give a candidate id or a label from the report)"
        )
    where = "/".join(x for x in (model, recipe) if x) or "the study"
    raise UserError(
        f"--candidate: no candidate {which!r} in {where} (give a candidate id, its tag, an exclusion "
        "set's name, a label from the report or a number k)"
    )
