"""Apache TVM backend: compile candidates with TVM, run them locally or over TVM RPC.

One :class:`TvmPool` per agent holds what the devices share: the compile cache
(:mod:`tuneqn.agent.backends.tvm_build`, under ``<state>/tvm``), one background compile
thread (compile-ahead: a job's model is compiled as soon as the job is queued, so compiling
job N+1 overlaps running job N) and, with a tracker, a poller that reads the tracker's
summary every ``poll_seconds``. Each device lane is a :class:`TvmBackend`:

* local (no tracker, no RPC): one lane ``<device-name>`` running on this host's CPU/GPU
  (the TVM device of the target's kind);
* tracker (``--tvm-tracker``/``--tvm-key``): lanes ``<device-name>.<i>``, one per server
  registered under the key (at least one). Servers joining the tracker add lanes to the
  running agent; a lane beyond the current server count is unhealthy and says so. A job
  requests a session from the tracker (any free server of the key) with a bounded wait,
  shown in the device status;
* direct RPC (``--tvm-rpc``, repeatable): lane ``<device-name>.<i>`` talks to server i.

Per job: load = compile (or take the compile-ahead build or the cached library), open a
session, upload the library, ``load_module`` and a Relax VM; predictions run chunk by
chunk; latency uses ``time_evaluator`` (number, min_repeat_ms and cooldown from
``JobSpec.backend_options.tvm``, repeat = the job manager's count; milliseconds per repeat).
The session is released when the job ends, success or not (with TVM 0.27 a session left
open blocks the key's next request for the whole session timeout).

Faults: every remote call runs under a watchdog (``call_timeout``); a connection error or a
call that takes longer (a hung server: the call is abandoned and its socket shut down)
makes the lane unhealthy, and the backend requests a session again with backoff (the
tracker hands out another server of the key, or the restarted one), uploads the library
again and retries the chunk that failed. After ``max_reconnects`` failed reconnects the
job fails normally (the controller retries it).
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import logging
import platform
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx

from tuneqn.agent.backends.base import (
    Backend,
    DeviceDescription,
    Interrupted,
    LoadOptions,
    PreparedModel,
    pad_to_batch,
    scores_of,
)
from tuneqn.agent.backends.tvm_build import (
    BuildSpec,
    Built,
    CompileCache,
    ModelInput,
    make_target,
    model_input,
    supported_ops,
    target_json,
    tvm_version,
)
from tuneqn.agent.backends.tvm_session import (
    Lost,
    Runtime,
    TrackerLink,
    cut_connections,
    is_connection_error,
    limit_socket_waits,
)
from tuneqn.agent.config import TvmSettings, hostport

log = logging.getLogger(__name__)

T = TypeVar("T")

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CPU_DEVICE_TYPE = 1  # kDLCPU


def base_spec(settings: TvmSettings) -> BuildSpec:
    """The untuned build spec of the agent's configuration."""
    return BuildSpec(target=dict(settings.target), host=settings.host, compiler=settings.compiler)


class NoFreeDevice(RuntimeError):
    """No server of the key became free within the request timeout."""


def runtime_versions() -> dict[str, str]:
    """Versions of the stack that produced a TVM result."""
    versions = {"python": platform.python_version(), "tvm": tvm_version()}
    for dist in ("onnx", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = ""
    return versions


@dataclass
class TvmModel(PreparedModel):
    """A compiled model plus the open device running it."""

    built: Built | None = None
    model_input: ModelInput | None = None
    library: bytes = b""
    timing: tuple[int, int, int] = (1, 0, 0)  # time_evaluator number, min_repeat_ms, cooldown ms
    runtime: Runtime | None = None
    pinned: str = ""  # the compile-cache key this job pins until release ("" = none)


@dataclass
class BuildRecord:
    """One compile request: why (``ahead`` when a job was queued, ``load`` when it ran), when."""

    model_sha256: str
    reason: str
    started: float  # unix seconds
    finished: float = 0.0
    cache_hit: bool | None = None
    error: str = ""


# ---------------------------------------------------------------------- the pool


class TvmPool:
    """What the TVM lanes of one agent share: compile cache and thread, tracker poller."""

    def __init__(
        self,
        settings: TvmSettings,
        device_name: str,
        device_class: str,
        state_dir: Path,
    ) -> None:
        self.settings = settings
        self.device_name = device_name
        self.device_class = device_class or device_name
        self.cache = CompileCache(Path(state_dir) / "tvm" / "cache", settings.cache_bytes)
        self.tuning_root = Path(state_dir) / "tvm" / "tuning"
        self.target = make_target(base_spec(settings))
        self.target_json = target_json(base_spec(settings))
        self.device_type = int(self.target.get_target_device_type())
        self.versions = runtime_versions()
        self.supported = tuple(sorted(supported_ops()))
        is_gpu = self.device_type != _CPU_DEVICE_TYPE
        caps = ["tvm", "qdq", "static", "compile-ahead", "gpu" if is_gpu else "cpu"]
        if settings.mode != "local":
            caps.append("remote")
        if importlib.util.find_spec("tuneqn.agent.backends.tvm_tuning") is not None:
            caps.append("tuning")
        self.capabilities = tuple(caps)
        self.gpu = ""
        if is_gpu:
            self.gpu = " ".join(str(settings.target[k]) for k in ("kind", "device") if settings.target.get(k))
        self.cpu = ""
        if settings.mode == "local" and not is_gpu:
            from tuneqn.agent.backends.ort import cpu_model_name

            self.cpu = cpu_model_name()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._closed = False
        self._add_backend: Callable[[Backend], None] | None = None
        self._ahead: dict[tuple[str, str], Future[Built]] = {}
        self._compile_queue: queue.Queue[tuple[Future[Built], Path, str, LoadOptions]] = queue.Queue()
        self._builds: deque[BuildRecord] = deque(maxlen=1000)
        self._servers: list[str] = []  # tracker: servers registered under the key
        self._tracker_error = ""
        self._link: TrackerLink | None = None
        self.lanes: list[TvmBackend] = []
        if settings.mode == "tracker":
            self.poll()
            count = max(1, len(self._servers))
        elif settings.mode == "rpc":
            count = len(settings.rpc)
        else:
            count = 1
        for _ in range(count):
            self._new_lane()

    # ------------------------------------------------------------------ lanes

    def _new_lane(self) -> TvmBackend:
        index = len(self.lanes)
        name = self.device_name if self.settings.mode == "local" else f"{self.device_name}.{index}"
        lane = TvmBackend(self, index, name)
        self.lanes.append(lane)
        return lane

    @property
    def server_count(self) -> int:
        """Servers registered under the key at the last tracker poll."""
        with self._lock:
            return len(self._servers)

    def tracker_problem(self) -> str:
        """Why the tracker cannot be read now (empty when it can)."""
        with self._lock:
            return self._tracker_error

    def poll(self) -> None:
        """Read the tracker's summary once; servers beyond the lanes add lanes."""
        tracker = self.settings.tracker
        if tracker is None:
            return
        try:
            if self._link is None:
                self._link = TrackerLink(tracker)
            summary = self._link.summary()
        except (OSError, ValueError) as exc:
            if self._link is not None:
                self._link.close()
                self._link = None
            with self._lock:
                self._tracker_error = f"tracker {hostport(tracker)} unreachable: {exc}"
            return
        want = f"server:{self.settings.key}"
        servers = sorted(
            hostport((str(s["addr"][0]), int(s["addr"][1])))
            for s in summary.get("server_info", [])
            if s.get("key") == want and isinstance(s.get("addr"), list | tuple)
        )
        new: list[TvmBackend] = []
        with self._lock:
            self._servers = servers
            self._tracker_error = ""
            add = self._add_backend
            while add is not None and len(self.lanes) < len(servers):
                new.append(self._new_lane())
        for lane in new:
            log.info("server joined key %r: new device %s", self.settings.key, lane.name)
            if add is not None:
                add(lane)

    def start(self, add_backend: Callable[[Backend], None]) -> None:
        """Start the compile thread and the tracker poller (once)."""
        with self._lock:
            if self._started or self._closed:
                return
            self._started = True
            self._add_backend = add_backend
        self._spawn(self._compile_loop, "tuneqn-tvm-compile")
        if self.settings.tracker is not None:
            self._spawn(self._poll_loop, "tuneqn-tvm-tracker")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def close(self) -> None:
        """Stop the threads (once); a build in progress finishes in the background."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5.0)
        if self._link is not None:
            self._link.close()
            self._link = None

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.settings.poll_seconds):
            self.poll()

    # ------------------------------------------------------------------ compiling

    def build_spec(self, options: LoadOptions, model_sha256: str) -> BuildSpec:
        """The build spec of a job: the agent's target and compiler, the job's tuning."""
        spec = base_spec(self.settings)
        tvm_options = options.backend_options.tvm
        if tvm_options.tuning_trials <= 0:
            return spec
        if self.settings.mode == "rpc":
            raise ValueError(
                "tuning (tuning_trials > 0) measures through a tracker or on this host; "
                "it is not available with --tvm-rpc (use --tvm-tracker)"
            )
        group = tvm_options.tuning_group or model_sha256
        ident = hashlib.sha256(f"{group}\n{self.target_json}".encode()).hexdigest()[:32]
        runner = None
        if self.settings.tracker is not None:
            from tuneqn.agent.backends import tvm_tuning

            host, port = self.settings.tracker
            runner = tvm_tuning.rpc_runner(host, port, self.settings.key, self.settings.session_timeout)
        return replace(
            spec,
            tuning_trials=int(tvm_options.tuning_trials),
            tuning_dir=self.tuning_root / ident,
            runner=runner,
        )

    @staticmethod
    def model_sha256(model_path: Path) -> str:
        """The model's sha256: the blob's file name, or the hash of its bytes."""
        name = Path(model_path).name
        if _SHA256_RE.match(name):
            return name
        h = hashlib.sha256()
        with open(model_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    @staticmethod
    def _ahead_key(sha: str, options: LoadOptions) -> tuple[str, str]:
        tvm_options = options.backend_options.tvm
        return sha, f"{tvm_options.tuning_trials}:{tvm_options.tuning_group}"

    def compile_ahead(self, model_path: Path, options: LoadOptions) -> None:
        """Queue a background build of the model (no-op when one is queued); never blocks."""
        sha = self.model_sha256(model_path)
        key = self._ahead_key(sha, options)
        with self._lock:
            if self._closed or key in self._ahead:
                return
            future: Future[Built] = Future()
            self._ahead[key] = future
            while len(self._ahead) > 256:  # forget the oldest (a job cancelled before it ran)
                oldest = next(iter(self._ahead))
                self._drop_ahead(self._ahead.pop(oldest))
        self._compile_queue.put((future, Path(model_path), sha, options))

    def _compile_loop(self) -> None:
        while not self._stop.is_set():
            try:
                future, path, sha, options = self._compile_queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if not future.set_running_or_notify_cancel():
                continue  # its job loaded it itself
            try:
                future.set_result(self._build(path, sha, self.build_spec(options, sha), "ahead"))
            except BaseException as exc:  # thread boundary: the job that loads it re-raises it
                future.set_exception(exc)

    def forget_ahead(self, model_path: Path, options: LoadOptions) -> None:
        """The queued job of this model was cancelled: its compile-ahead build (if any) is not
        waited for by anyone, and its library is unpinned once built."""
        key = self._ahead_key(self.model_sha256(model_path), options)
        with self._lock:
            future = self._ahead.pop(key, None)
        if future is not None:
            self._drop_ahead(future)

    def _drop_ahead(self, future: Future[Built]) -> None:
        """Forget a compile-ahead build nobody will load: its pin goes once it is done."""
        if future.cancel():
            return

        def unpin(done: Future[Built]) -> None:
            if not done.cancelled() and done.exception() is None:
                self.cache.unpin(done.result().key)

        future.add_done_callback(unpin)

    def _build(self, path: Path, sha: str, spec: BuildSpec, reason: str) -> Built:
        """The library, pinned in the cache for the job that loads it (see :meth:`TvmBackend.release`)."""
        record = BuildRecord(model_sha256=sha, reason=reason, started=time.time())
        with self._lock:
            self._builds.append(record)
        try:
            built = self.cache.get_or_build(path, sha, spec, pin=True)
        except BaseException as exc:
            record.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            record.finished = time.time()
        record.cache_hit = built.cache_hit
        return built

    def builds(self) -> list[BuildRecord]:
        """The recent compile requests, oldest first."""
        with self._lock:
            return list(self._builds)

    def built_for(self, model_path: Path, options: LoadOptions, stop: threading.Event | None) -> Built:
        """The library for a job: its compile-ahead build, the cache, or a build now.

        The entry comes pinned in the cache (the compile-ahead build's pin passes to the job);
        the caller drops it with ``cache.unpin(built.key)`` when the job ends."""
        sha = self.model_sha256(model_path)
        key = self._ahead_key(sha, options)
        with self._lock:
            future = self._ahead.pop(key, None)
        if future is not None and not future.cancel():
            while True:  # started (or done) in the background: wait for it
                try:
                    return future.result(timeout=0.25)
                except TimeoutError:
                    if stop is not None and stop.is_set():
                        self._drop_ahead(future)
                        raise Interrupted() from None
                except CancelledError:
                    break
        return self._build(Path(model_path), sha, self.build_spec(options, sha), "load")


# ---------------------------------------------------------------------- one lane


class TvmBackend(Backend):
    """One device lane of a :class:`TvmPool` (local, a tracker slot, or one RPC server)."""

    name = "tvm"

    def __init__(self, pool: TvmPool, index: int, device_name: str) -> None:
        self.pool = pool
        self.index = index
        self.device_name = device_name
        self._lock = threading.Lock()
        self._activity = ""  # what the lane waits for or runs on now (status text)
        self._trouble = ""  # why the lane is unhealthy now (a lost session)

    # ------------------------------------------------------------------ description

    @property
    def settings(self) -> TvmSettings:
        """The agent's TVM settings."""
        return self.pool.settings

    def _remote(self) -> str:
        s = self.settings
        if s.mode == "tracker" and s.tracker is not None:
            return f"tracker {hostport(s.tracker)}"
        if s.mode == "rpc":
            return f"rpc {hostport(s.rpc[self.index])}"
        return ""

    def describe(self) -> DeviceDescription:
        """Backend "tvm" with its target, key, remote, supported ops and server count."""
        s = self.settings
        pool = self.pool
        return DeviceDescription(
            name=self.device_name,
            device_class=pool.device_class,
            backend=self.name,
            runtime_versions=dict(pool.versions),
            cpu=pool.cpu,
            gpu=pool.gpu,
            capabilities=pool.capabilities,
            target=pool.target_json,
            rpc_key=s.key if s.mode != "local" else "",
            remote=self._remote(),
            supported_ops=pool.supported,
            remote_servers=pool.server_count if s.mode == "tracker" else 0,
        )

    def health(self) -> tuple[bool, str]:
        """Unhealthy while reconnecting, or beyond the tracker's server count; else what it waits for."""
        with self._lock:
            trouble, waiting = self._trouble, self._activity
        if trouble:
            return False, trouble
        s = self.settings
        if s.mode == "tracker" and s.tracker is not None:
            problem = self.pool.tracker_problem()
            if problem:
                return False, problem
            count = self.pool.server_count
            if self.index >= count and not waiting.startswith("running on "):
                return False, (
                    f"no server for this lane: {count} server(s) registered under key "
                    f"{s.key!r} on tracker {hostport(s.tracker)}"
                )
        return True, waiting

    def _set_activity(self, text: str) -> None:
        with self._lock:
            self._activity = text

    def _set_trouble(self, text: str) -> None:
        with self._lock:
            self._trouble = text

    # ------------------------------------------------------------------ hooks

    def start(self, add_backend: Callable[[Backend], None]) -> None:
        """Start the pool's threads (once per agent)."""
        self.pool.start(add_backend)

    def prepare_ahead(self, model_path: Path, options: LoadOptions) -> None:
        """Queue the model's build on the pool's compile thread."""
        self.pool.compile_ahead(model_path, options)

    def forget_ahead(self, model_path: Path, options: LoadOptions) -> None:
        """Drop the cancelled job's compile-ahead build (its library's pin)."""
        self.pool.forget_ahead(model_path, options)

    def close(self) -> None:
        """Stop the pool's threads (once per agent)."""
        self.pool.close()

    # ------------------------------------------------------------------ jobs

    def load(self, model_path: Path, options: LoadOptions) -> TvmModel:
        """Compile (or reuse), then open the device and load the library on it."""
        stop = options.stop
        model = onnx.load(str(model_path), load_external_data=False)
        inp = model_input(model, options.input_name)
        del model
        sha = self.pool.model_sha256(model_path)
        self._set_activity(f"compiling model {sha[:12]} for {self.pool.target_json}")
        try:
            built = self.pool.built_for(model_path, options, stop)
        finally:
            self._set_activity("")
        try:
            return self._load_built(built, inp, options)
        except BaseException:
            self.pool.cache.unpin(built.key)  # no handle, so no release(): the job ends here
            raise

    def _load_built(self, built: Built, inp: ModelInput, options: LoadOptions) -> TvmModel:
        """The job's handle for a pinned library, the library opened on the device."""
        stop = options.stop
        fixed = built.batch if built.batch is not None else inp.fixed_batch
        tvm_options = options.backend_options.tvm
        handle = TvmModel(
            input_name=inp.name,
            fixed_batch=fixed,
            sample_shape=tuple(inp.dims[1:]),
            compile_seconds=built.compile_seconds,
            tuning_seconds=built.tuning_seconds,
            tuned=built.tuned,
            compile_cache_hit=built.cache_hit,
            built=built,
            model_input=inp,
            library=built.path.read_bytes() if self.settings.mode != "local" else b"",  # uploads
            timing=(
                max(1, tvm_options.latency_number),
                tvm_options.latency_min_repeat_ms,
                tvm_options.latency_cooldown_ms,
            ),
        )
        self._with_device(handle, "loading the library", lambda rt: None, stop)
        handle.pinned = built.key  # from here on release() unpins it (before: load() does)
        return handle

    def release(self, handle: PreparedModel) -> None:
        """Close the job's session (the tracker hands the server to the next request) and
        unpin its library in the compile cache (it may be evicted from now on)."""
        if not isinstance(handle, TvmModel):
            return
        pinned, handle.pinned = handle.pinned, ""
        if pinned:
            self.pool.cache.unpin(pinned)
        runtime, handle.runtime = handle.runtime, None
        if runtime is not None:
            runtime.close()
            del runtime
            gc.collect()  # the C++ session closes when its last Python reference is gone
        self._set_trouble("")
        self._set_activity("")

    def predict(self, handle: PreparedModel, batch: np.ndarray, stop: threading.Event | None = None) -> np.ndarray:
        """Class scores of one chunk (padded to a fixed batch, padded rows dropped)."""
        model = self._check(handle)
        n = batch.shape[0]
        x = self._feed(model, batch)

        def run(rt: Runtime) -> np.ndarray:
            out = rt.main(rt.input(x))
            if not hasattr(out, "numpy"):
                out = out[0]
            return np.asarray(out.numpy())

        out = self._with_device(model, f"predicting {n} sample(s)", run, stop)
        return scores_of(out, x.shape[0], n)

    def latency(
        self, handle: PreparedModel, sample: np.ndarray, warmup: int, repeats: int, stop: threading.Event | None = None
    ) -> list[float]:
        """Milliseconds per repeat of ``time_evaluator`` (``warmup`` untimed runs first)."""
        model = self._check(handle)
        x = self._feed(model, sample[:1])
        number, min_repeat_ms, cooldown_ms = model.timing
        for _ in range(warmup):
            self.predict(model, sample[:1], stop)
        if repeats <= 0:
            return []

        def measure(rt: Runtime) -> list[float]:
            rt.vm.set_input("main", rt.input(x))
            timer = rt.vm.time_evaluator(
                "invoke_stateful",
                rt.device,
                number=number,
                repeat=repeats,
                min_repeat_ms=min_repeat_ms,
                cooldown_interval_ms=cooldown_ms,
            )
            return [float(r) * 1000.0 for r in timer("main").results]

        return self._with_device(model, f"timing {repeats} repeat(s)", measure, stop)

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _check(handle: PreparedModel) -> TvmModel:
        if not isinstance(handle, TvmModel) or handle.model_input is None:
            raise TypeError("handle was not prepared by the TVM backend")
        return handle

    @staticmethod
    def _feed(model: TvmModel, batch: np.ndarray) -> np.ndarray:
        """``batch`` in the input's dtype, zero-padded to the fixed batch size if there is one."""
        dtype = model.model_input.dtype if model.model_input is not None else np.dtype(np.float32)
        return pad_to_batch(batch, dtype, model.fixed_batch)

    def _with_device(
        self,
        model: TvmModel,
        what: str,
        fn: Callable[[Runtime], T],
        stop: threading.Event | None,
    ) -> T:
        """Run ``fn`` on the model's open device, (re)opening it after a lost session.

        A lost session (connection error, hung call) makes the lane unhealthy; the device
        is opened again with backoff (another server of the key, or the restarted one) and
        ``fn`` runs again. After ``max_reconnects`` failed attempts the error propagates.
        """
        s = self.settings
        failures = 0
        while True:
            if stop is not None and stop.is_set():
                raise Interrupted()
            runtime = model.runtime
            try:
                if runtime is None:
                    runtime = self._open(model, stop)
                    model.runtime = runtime
                    model.executed_on = runtime.executed_on
                    if runtime.executed_on:
                        self._set_activity(f"running on {runtime.executed_on}")
                opened = runtime
                result = self._call(opened.executed_on, what, lambda: fn(opened), stop)  # noqa: B023 - called here
            except Lost as exc:
                where = exc.where or "the device"
                model.runtime = None
                if runtime is not None:
                    cut_connections(runtime.executed_on)  # its remote objects now free without waiting
                    runtime.close()
                    runtime = None
                failures += 1
                if failures > s.max_reconnects:
                    self._set_trouble("")
                    raise RuntimeError(f"{what}: lost the device {failures} times, giving up; last: {exc}") from None
                backoff = min(s.reconnect_backoff * 2 ** (failures - 1), 10.0)
                self._set_trouble(
                    f"lost {where} while {what} ({exc}); reconnecting in {backoff:g} s "
                    f"(attempt {failures} of {s.max_reconnects})"
                )
                log.warning("%s: lost %s while %s: %s", self.device_name, where, what, exc)
                if stop is not None:
                    if stop.wait(backoff):
                        raise Interrupted() from None
                else:
                    time.sleep(backoff)
                continue
            if failures:
                log.info("%s: continuing on %s", self.device_name, opened.executed_on)
                self._set_trouble("")
            return result

    def _call(self, address: str, what: str, fn: Callable[[], T], stop: threading.Event | None) -> T:
        """Run one remote call under the watchdog (local calls run directly).

        A connection error or a call exceeding ``call_timeout`` raises :class:`Lost`; a hung
        call's connection is shut down so that its thread ends. A stop request abandons the
        call (:class:`Interrupted`; the session is released by the job's end).
        """
        if self.settings.mode == "local":
            return fn()
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # thread boundary: re-raised in the caller below
                box["error"] = exc
            finally:
                done.set()

        thread = threading.Thread(target=run, name=f"tuneqn-tvm-call-{self.device_name}", daemon=True)
        thread.start()
        limit = self.settings.call_timeout
        deadline = time.monotonic() + limit
        while not done.wait(min(0.25, max(deadline - time.monotonic(), 0.0))):
            if stop is not None and stop.is_set():
                raise Interrupted()
            if time.monotonic() >= deadline:
                where = address or "the device"
                cut_connections(address)
                raise Lost(f"{what} on {where} took longer than {limit:g} s (hung server)", address)
        if "error" in box:
            exc = box["error"]
            if is_connection_error(exc):
                text = str(exc).strip()
                raise Lost(text.splitlines()[-1] if text else type(exc).__name__, address) from exc
            raise exc
        return box["value"]

    def _open(self, model: TvmModel, stop: threading.Event | None) -> Runtime:
        """Open the device (local, tracker session or direct RPC) and load the library on it."""
        import tvm
        from tvm import relax

        s = self.settings
        if model.built is None:
            raise TypeError("the model was not compiled")
        if s.mode == "local":
            device = tvm.device(self.pool.device_type, 0)
            library = tvm.runtime.load_module(str(model.built.path))
            vm = relax.VirtualMachine(library, device)
            return Runtime("", None, device, library, vm, vm["main"])
        if s.mode == "tracker":
            url, port, matchkey = self._request(stop)
        else:
            url, port = s.rpc[self.index]
            matchkey = s.key
        address = hostport((url, port))
        from tvm import rpc

        timeout = int(s.session_timeout) if s.session_timeout > 0 else 0

        def connect() -> Any:
            session = rpc.connect(url, port, matchkey, session_timeout=timeout)
            limit_socket_waits(address, s.call_timeout)
            return session

        try:
            session = self._call(address, f"connecting to {address}", connect, stop)
        except (RuntimeError, OSError) as exc:  # any failure to connect is a lost device
            raise Lost(f"cannot connect to {address}: {exc}", address) from exc
        name = f"tuneqn-{model.built.key[:16]}.so"

        def upload_and_load() -> Runtime:
            session.upload(bytearray(model.library), name)
            library = session.load_module(name)
            device = session.device(self.pool.device_type, 0)
            vm = relax.VirtualMachine(library, device)
            return Runtime(address, session, device, library, vm, vm["main"])

        try:
            runtime = self._call(address, f"loading the library on {address}", upload_and_load, stop)
        except BaseException:
            cut_connections(address)  # nothing of this session is used again
            session = None
            raise
        log.info("%s: session on %s", self.device_name, address)
        return runtime

    def _request(self, stop: threading.Event | None) -> tuple[str, int, str]:
        """Ask the tracker for a free server of the key, waiting at most ``request_timeout``.

        The wait is shown in the device status. On timeout (or stop) the request's socket is
        closed: the tracker then skips this request when a server becomes free.
        """
        from tvm.rpc import base

        s = self.settings
        tracker = s.tracker
        if tracker is None:
            raise ValueError("no tracker configured")
        where = f"key {s.key!r} on tracker {hostport(tracker)}"
        start = time.monotonic()
        try:
            link = TrackerLink(tracker)
        except OSError as exc:
            raise Lost(f"cannot reach tracker {hostport(tracker)}: {exc}") from exc
        try:
            link.send([base.TrackerCode.REQUEST, s.key, f"tuneqn-agent {self.device_name}", s.priority])
            link.sock.settimeout(1.0)

            def waiting() -> None:
                elapsed = time.monotonic() - start
                if stop is not None and stop.is_set():
                    raise Interrupted()
                if elapsed >= s.request_timeout:
                    raise NoFreeDevice(f"no free device of {where} within {s.request_timeout:g} s")
                self._set_activity(
                    f"waiting for a free device of {where} ({int(elapsed)} s of {s.request_timeout:g} s)"
                )

            self._set_activity(f"waiting for a free device of {where} (0 s of {s.request_timeout:g} s)")
            try:
                value = link.recv(on_timeout=waiting)
            except OSError as exc:
                raise Lost(f"tracker {hostport(tracker)}: {exc}") from exc
        finally:
            link.close()
            self._set_activity("")
        if not isinstance(value, list) or value[0] != base.TrackerCode.SUCCESS:
            raise Lost(f"unexpected tracker answer {value!r}")
        url, port, matchkey = value[1]
        return str(url), int(port), str(matchkey)


def create_lanes(
    device_name: str,
    device_class: str = "",
    settings: TvmSettings | None = None,
    state_dir: Path | None = None,
) -> list[TvmBackend]:
    """The device lanes of a new :class:`TvmPool` (the backend factory of ``--backend tvm``)."""
    if state_dir is None:
        raise ValueError("the TVM backend needs the agent's state dir (for its compile cache)")
    pool = TvmPool(settings or TvmSettings(), device_name, device_class, state_dir)
    return list(pool.lanes)
