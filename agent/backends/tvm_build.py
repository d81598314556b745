"""Compile ONNX models with Apache TVM, with a content-addressed cache of the libraries.

Import with ``tvm.relax.frontend.onnx.from_onnx`` (weights bound as constants), compile
with ``tvm.compile`` for a target given as a JSON dict (plus a host target when
cross-compiling), ``export_library`` with a configurable compiler command (an Android NDK
clang in a real lab). Feasibility is decided before importing: a model with op types the
frontend has no converter for is :class:`Infeasible` with those op types, and so is a model
the frontend fails on (deterministic for a model and a TVM version). Compiler and
toolchain failures are ordinary errors, not infeasibility.

Batch: one library serves both the predictions (chunks) and single-sample latency. A
symbolic batch dimension is kept symbolic (a dynamic build); only when TVM cannot import or
compile it that way, or when the build is tuned (MetaSchedule tunes static shapes), the
batch is fixed to 1 and samples run one by one. Measured with TVM 0.27 on this machine's
CPU (untuned ``{"kind": "llvm"}``): EfficientNet-Lite0 (pre-processed) compiles in 4.1 s
dynamic vs 3.7 s with batch 1, and one sample takes 286-306 ms either way (batch 1:
299-371 ms); the small test CNNs compile in under 1 s both ways.

:class:`CompileCache` keeps the libraries under a root folder (the agent's
``<state>/tvm``), keyed by sha256 of (model sha256, target, host, TVM version, compiler,
tuning trials and the tuning database's digest): built in a temporary folder and renamed
into place, one build per key at a time (a thread lock plus an flock, so other processes
using the same root wait too), least recently used entries evicted beyond ``max_bytes``.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tuneqn.agent.backends.base import Infeasible, pick_input

__all__ = [
    "BuildSpec",
    "Built",
    "CompileCache",
    "Infeasible",
    "ModelInput",
    "cache_key",
    "make_target",
    "model_input",
    "supported_ops",
    "target_json",
    "tvm_version",
    "unsupported_ops",
]

log = logging.getLogger(__name__)

LIBRARY_NAME = "lib.so"
META_NAME = "meta.json"
#: TVM's Python frontend and Relax builder keep process-wide state (``BlockBuilder.current()``
#: is a class attribute): two imports or compiles in two threads corrupt each other (measured:
#: a spurious ``AssertionError`` in ``from_onnx`` with two lanes compiling at once, which would
#: be recorded as "infeasible"). Every import, tuning and compile in the process runs under it.
_TVM_LOCK = threading.RLock()


@dataclass(frozen=True)
class BuildSpec:
    """How to compile: target, host, compiler and tuning."""

    target: dict[str, Any]  # the target JSON dict
    host: dict[str, Any] | None = None  # host target (cross-compilation)
    compiler: str = ""  # export_library compiler command; "" = TVM's default
    tuning_trials: int = 0  # 0 = untuned
    tuning_dir: Path | None = None  # MetaSchedule work dir/database of (tuning group, target)
    runner: Any | None = None  # MetaSchedule runner for remote tuning (None = local)


@dataclass(frozen=True)
class Built:
    """A compiled library in the cache."""

    path: Path  # the compiled library (.so) in the cache
    key: str  # cache key (sha256 hex)
    compile_seconds: float  # of the build that produced it (0.0 when cache_hit)
    tuning_seconds: float
    tuned: bool
    cache_hit: bool
    batch: int | None  # fixed batch size compiled in, None = dynamic


@dataclass(frozen=True)
class ModelInput:
    """The model input the agent feeds: name, numpy dtype and dims (None/str = symbolic)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]

    @property
    def fixed_batch(self) -> int | None:
        """The batch size when the first axis is a fixed positive integer, else None."""
        first = self.dims[0] if self.dims else None
        return first if isinstance(first, int) and first > 0 else None


def tvm_version() -> str:
    """The installed TVM version."""
    import tvm

    return str(tvm.__version__)


@functools.cache
def supported_ops() -> frozenset[str]:
    """ONNX op types the installed TVM's ONNX frontend has a converter for."""
    from tvm.relax.frontend.onnx import onnx_frontend

    return frozenset(onnx_frontend._get_convert_map())


def _graph_ops(graph: onnx.GraphProto) -> Iterator[str]:
    for node in graph.node:
        yield node.op_type
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graph_ops(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graph_ops(sub)


#: Tensor element types TVM cannot load from an ONNX file (TVM 0.27: a 4-bit initializer fails with
#: "TensorCopyFromBytes: size mismatch"), named among the unsupported "op types" of an infeasible answer (e.g. a
#: candidate with int4 weights).
UNSUPPORTED_TYPES = frozenset({onnx.TensorProto.INT4, onnx.TensorProto.UINT4})


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Op types of ``model`` (subgraphs included) the frontend cannot convert, and ``<TYPE> tensors`` for its
    initializers of a type TVM cannot load (:data:`UNSUPPORTED_TYPES`), sorted."""
    known = supported_ops()
    types = {
        f"{onnx.TensorProto.DataType.Name(t.data_type)} tensors"
        for t in model.graph.initializer
        if t.data_type in UNSUPPORTED_TYPES
    }
    return sorted({op for op in _graph_ops(model.graph) if op not in known} | types)


def model_input(model: onnx.ModelProto, name: str = "") -> ModelInput:
    """The input ``name`` (default: the first graph input that is not an initializer)."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    chosen = pick_input(inputs, name, lambda i: i.name)
    tensor_type = chosen.type.tensor_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"unsupported input type {tensor_type.elem_type} of {chosen.name!r}") from None
    dims: list[int | str | None] = []
    for d in tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or None)
    return ModelInput(name=chosen.name, dtype=dtype, dims=tuple(dims))


def target_json(spec: BuildSpec) -> str:
    """The canonical JSON of the target (with the host inside when there is one)."""
    target = dict(spec.target)
    if spec.host is not None:
        target["host"] = spec.host
    return json.dumps(target, sort_keys=True, separators=(",", ":"))


def make_target(spec: BuildSpec) -> Any:
    """The ``tvm.target.Target`` of a build spec (raises TVM's error for a bad dict)."""
    import tvm

    if spec.host is not None:
        return tvm.target.Target(dict(spec.target), host=dict(spec.host))
    return tvm.target.Target(dict(spec.target))


def cache_key(model_sha256: str, spec: BuildSpec, tuning_digest: str = "") -> str:
    """The cache key of a build: sha256 of everything that determines the library's bytes."""
    import hashlib

    ident = {
        "model_sha256": model_sha256,
        "target": json.loads(target_json(spec)),
        "tvm": tvm_version(),
        "compiler": spec.compiler,
        "tuning_trials": spec.tuning_trials,
        "tuning_digest": tuning_digest if spec.tuning_trials > 0 else "",
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    # TVM errors carry a traceback first; the message is the last line
    return f"{type(exc).__name__}: {lines[-1].strip() if lines else ''}".rstrip(": ")


def _import(model: onnx.ModelProto, shape_dict: dict[str, list[int]] | None) -> Any:
    """``from_onnx`` with weights as constants; a frontend failure is :class:`Infeasible`."""
    from tvm.relax.frontend.onnx import from_onnx

    try:
        return from_onnx(model, shape_dict=shape_dict, keep_params_in_input=False)
    except Exception as exc:  # the frontend raises any type (OpNotImplemented, AttributeError,
        # ValueError, TVMError...); it is deterministic for this model and TVM version, so it
        # is reported as infeasible with its message, not swallowed.
        raise Infeasible(f"TVM {tvm_version()} cannot import the model ({_first_line(exc)})") from exc


def _fcompile(compiler: str) -> Any:
    """The export_library compile function for a compiler command (None = TVM's default)."""
    if not compiler:
        return None
    from tvm.support import cc

    words = shlex.split(compiler)
    return cc.cross_compiler(words[0], options=words[1:] or None)


class CompileCache:
    """Content-addressed cache of compiled TVM libraries under ``root``."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._busy: set[str] = set()  # keys being looked up or built in this process
        self._pins: dict[str, int] = {}  # key -> how many holders (jobs, compile-ahead results)

    # ------------------------------------------------------------------ public

    def get_or_build(self, model_path: Path, model_sha256: str, spec: BuildSpec, pin: bool = False) -> Built:
        """The library for this model and spec: from the cache, or built now (and cached).

        With ``pin`` the entry is pinned before it is returned (no eviction in between) until
        :meth:`unpin` with its key. Raises :class:`Infeasible` when the model has op types the
        frontend cannot convert (checked before importing) or the frontend fails on it; other
        errors (compiler, toolchain, tuning) propagate as they are.
        """
        digest = self._tuning_digest(spec)
        key = cache_key(model_sha256, spec, digest)
        with self._key_lock(key):
            built = self._lookup(key)
            if built is None:
                built = self._build(key, Path(model_path), model_sha256, spec)
            if pin:
                self._pin(key)
            return built

    def lookup(self, model_sha256: str, spec: BuildSpec, pin: bool = False) -> Built | None:
        """The cached library for this model and spec, or None (never builds); ``pin`` as in
        :meth:`get_or_build` (only when found)."""
        key = cache_key(model_sha256, spec, self._tuning_digest(spec))
        with self._key_lock(key):
            built = self._lookup(key)
            if built is not None and pin:
                self._pin(key)
            return built

    def unpin(self, key: str) -> None:
        """Drop one pin of ``key`` (from ``get_or_build``/``lookup`` with ``pin``); once no pin is
        left, entries over ``max_bytes`` that eviction had to keep are evicted now."""
        with self._guard:
            count = self._pins.get(key, 0) - 1
            if count > 0:
                self._pins[key] = count
                return
            self._pins.pop(key, None)
        self._evict(protect=None)

    def pinned(self) -> dict[str, int]:
        """Pinned keys and their holder counts (a copy)."""
        with self._guard:
            return dict(self._pins)

    def usage(self) -> tuple[int, int]:
        """Bytes used by the cached entries, and how many built libraries they are (one scan)."""
        entries = self._entries()
        return sum(size for _, size, _ in entries), len(entries)

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _tuning_digest(spec: BuildSpec) -> str:
        if spec.tuning_trials <= 0:
            return ""
        if spec.tuning_dir is None:
            raise ValueError("a tuned build (tuning_trials > 0) needs a tuning_dir")
        from tuneqn.agent.backends import tvm_tuning

        return tvm_tuning.database_digest(spec.tuning_dir)

    @property
    def _entries_dir(self) -> Path:
        return self.root / "entries"

    @contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        """One lookup/build of ``key`` at a time, across threads and processes."""
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            locks = self.root / "locks"
            locks.mkdir(parents=True, exist_ok=True)
            fd = os.open(locks / f"{key}.lock", os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                with self._guard:
                    self._busy.add(key)
                try:
                    yield
                finally:
                    with self._guard:
                        self._busy.discard(key)
            finally:
                os.close(fd)  # also drops the flock

    def _pin(self, key: str) -> None:
        with self._guard:
            self._pins[key] = self._pins.get(key, 0) + 1

    def _lookup(self, key: str) -> Built | None:
        entry = self._entries_dir / key
        try:
            meta = json.loads((entry / META_NAME).read_text())
        except (OSError, ValueError):
            return None
        lib = entry / LIBRARY_NAME
        if not lib.is_file():
            return None
        try:
            os.utime(entry / META_NAME)  # least recently used = oldest meta mtime
        except OSError:
            return None
        batch = meta.get("batch")
        return Built(
            path=lib,
            key=key,
            compile_seconds=0.0,
            tuning_seconds=0.0,
            tuned=bool(meta.get("tuned", False)),
            cache_hit=True,
            batch=int(batch) if batch is not None else None,
        )

    def _build(self, key: str, model_path: Path, model_sha256: str, spec: BuildSpec) -> Built:
        model = onnx.load(str(model_path))
        ops = unsupported_ops(model)
        if ops:
            raise Infeasible(f"TVM {tvm_version()} has no ONNX converter for: {', '.join(ops)}", ops)
        target = make_target(spec)
        tmp_root = self.root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{key[:16]}.", dir=tmp_root))
        try:
            lib = tmp / LIBRARY_NAME
            batch, compile_seconds, tuning_seconds = self._compile(model, target, spec, lib)
            meta = {
                "key": key,
                "model_sha256": model_sha256,
                "target": json.loads(target_json(spec)),
                "tvm": tvm_version(),
                "compiler": spec.compiler,
                "tuning_trials": spec.tuning_trials,
                "tuned": spec.tuning_trials > 0,
                "batch": batch,
                "compile_seconds": compile_seconds,
                "tuning_seconds": tuning_seconds,
                "created": time.time(),
            }
            (tmp / META_NAME).write_text(json.dumps(meta, indent=1))
            for f in (lib, tmp / META_NAME):
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            self._entries_dir.mkdir(parents=True, exist_ok=True)
            entry = self._entries_dir / key
            if entry.exists():  # a stale, incomplete entry (no meta): replace it
                shutil.rmtree(entry)
            os.rename(tmp, entry)
            if spec.tuning_trials > 0:
                self._alias_after_tuning(entry, model_sha256, spec)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info(
            "compiled %s for %s in %.2f s (tuning %.2f s, batch %s)",
            model_sha256[:12],
            target_json(spec),
            compile_seconds,
            tuning_seconds,
            "dynamic" if batch is None else batch,
        )
        self._evict(protect=key)
        return Built(
            path=entry / LIBRARY_NAME,
            key=key,
            compile_seconds=compile_seconds,
            tuning_seconds=tuning_seconds,
            tuned=spec.tuning_trials > 0,
            cache_hit=False,
            batch=batch,
        )

    def _alias_after_tuning(self, entry: Path, model_sha256: str, spec: BuildSpec) -> None:
        """Also file a tuned library under the key of the database as tuning left it.

        The key holds the database digest from before this build; tuning added records, so
        the same request made right after would otherwise miss and tune again.
        """
        after = cache_key(model_sha256, spec, self._tuning_digest(spec))
        alias = self._entries_dir / after
        if alias.exists() or after == entry.name:
            return
        tmp = Path(tempfile.mkdtemp(prefix=f"{after[:16]}.", dir=self.root / "tmp"))
        os.link(entry / LIBRARY_NAME, tmp / LIBRARY_NAME)
        meta = json.loads((entry / META_NAME).read_text())
        meta["key"] = after
        (tmp / META_NAME).write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, alias)
        except OSError:  # another process filed it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)

    def _compile(
        self, model: onnx.ModelProto, target: Any, spec: BuildSpec, lib: Path
    ) -> tuple[int | None, float, float]:
        """Import, (tune,) compile and export to ``lib``; returns (batch, compile s, tuning s).

        Runs under :data:`_TVM_LOCK` (TVM's frontend and builder are not thread-safe)."""
        with _TVM_LOCK:
            inp = model_input(model)
            rest = inp.dims[1:]
            fixed_rest = [d for d in rest if isinstance(d, int)]
            static_one = {inp.name: [1, *fixed_rest]} if len(fixed_rest) == len(rest) else None
            fixed = inp.fixed_batch
            if fixed is not None or not inp.dims:  # a fixed batch (or a scalar input): as it is
                return self._compile_as(model, None, fixed, target, spec, lib)
            if spec.tuning_trials > 0 and static_one is not None:
                return self._compile_as(model, static_one, 1, target, spec, lib)
            try:
                return self._compile_as(model, None, None, target, spec, lib)
            except Exception as exc:  # any import or compile failure of the dynamic build: fall back
                # to a batch-1 build (logged); that build's own errors propagate.
                if static_one is None:
                    raise
                log.info("dynamic-batch build failed (%s); compiling with batch 1", _first_line(exc))
                return self._compile_as(model, static_one, 1, target, spec, lib)

    @staticmethod
    def _compile_as(
        model: onnx.ModelProto,
        shape_dict: dict[str, list[int]] | None,
        batch: int | None,
        target: Any,
        spec: BuildSpec,
        lib: Path,
    ) -> tuple[int | None, float, float]:
        import tvm

        t0 = time.perf_counter()
        mod = _import(model, shape_dict)
        import_seconds = time.perf_counter() - t0
        tuning_seconds = 0.0
        if spec.tuning_trials > 0:
            from tuneqn.agent.backends import tvm_tuning

            if spec.tuning_dir is None:
                raise ValueError("a tuned build (tuning_trials > 0) needs a tuning_dir")
            spec.tuning_dir.mkdir(parents=True, exist_ok=True)
            mod, tuning_seconds = tvm_tuning.tune(
                mod, target, spec.tuning_dir, spec.tuning_trials, spec.runner, compiler=spec.compiler
            )
        t1 = time.perf_counter()
        executable = tvm.compile(mod, target=target)
        fcompile = _fcompile(spec.compiler)
        if fcompile is None:
            executable.export_library(str(lib))
        else:
            executable.export_library(str(lib), fcompile=fcompile)
        compile_seconds = import_seconds + time.perf_counter() - t1
        return batch, compile_seconds, float(tuning_seconds)

    def _entries(self) -> list[tuple[Path, int, float]]:
        """(folder, bytes, last use) of each complete entry."""
        out: list[tuple[Path, int, float]] = []
        try:
            folders = list(self._entries_dir.iterdir())
        except FileNotFoundError:
            return out
        for folder in folders:
            try:
                used = (folder / META_NAME).stat().st_mtime
                size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            except OSError:
                continue
            out.append((folder, size, used))
        return out

    def _evict(self, protect: str | None) -> None:
        """Remove least recently used entries until the cache fits ``max_bytes``.

        Never the entry ``protect``, one being looked up or built, or a pinned one (a job
        holds it from its compile or lookup until it releases it): the cache may stay over
        its limit until those are unpinned."""
        entries = sorted(self._entries(), key=lambda e: e[2])
        total = sum(size for _, size, _ in entries)
        for folder, size, _ in entries:
            if total <= self.max_bytes:
                break
            if folder.name == protect:
                continue
            doomed = self.root / "tmp" / f"evicted.{folder.name}.{os.getpid()}"
            with self._guard:  # checked and renamed at once: a pin comes before or after, never between
                if folder.name in self._busy or folder.name in self._pins:
                    continue
                try:
                    (self.root / "tmp").mkdir(parents=True, exist_ok=True)
                    os.rename(folder, doomed)  # gone from the cache at once, then deleted
                except OSError:
                    continue
            shutil.rmtree(doomed, ignore_errors=True)
            total -= size
            log.info("evicted compiled library %s (%d bytes)", folder.name[:12], size)
