"""Real TVM RPC trackers and servers on 127.0.0.1 for the tests (helpers and fixtures).

``tvm.rpc.tracker.Tracker`` and ``tvm.rpc.Server`` run in TVM's own popen workers
(``python -m tvm.exec.popen_worker``); a server forks one more process per session. Such
workers outlive their parent unless ended (their serving thread is not a daemon), so every
server here runs in its own process group, and dies with the test process
(``PR_SET_PDEATHSIG``): :meth:`RpcServer.kill` signals the whole group (worker and session
processes: a phone's RPC app dying), and :meth:`TvmLab.close` checks /proc that nothing is
left. Create servers from the main thread (``PR_SET_PDEATHSIG`` follows the thread that
started the process).

The workers run without torch: ``tvm_ffi`` imports torch whenever it is installed (here
only for the example model's export), which costs ~9 s per process on this machine; a
``sitecustomize`` on the workers' ``PYTHONPATH`` makes ``import torch`` fail for them
(TVM's RPC does not use it). Everything else is the installed TVM.

Usage: the ``tvm_lab`` fixture (one tracker per test session, servers per test), e.g.
``servers = tvm_lab.start_servers(key, 2)`` then ``tvm_lab.wait_servers(key, 2)``;
``tvm_agent(settings)`` starts an in-process agent with TVM lanes (gRPC on 127.0.0.1:0);
``tvm_models`` are the test CNN pre-processed as the controller does and quantized (QDQ,
QOperator) with ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import free_port

tvm = pytest.importorskip("tvm", reason="Apache TVM (the tuneqn[tvm] extra) is not installed")

from tvm import rpc  # noqa: E402
from tvm.rpc import server as tvm_server  # noqa: E402
from tvm.rpc.tracker import Tracker  # noqa: E402
from tvm.support.popen_pool import PopenWorker  # noqa: E402

HOST = "127.0.0.1"
GROUP_ENV = "TUNEQN_TEST_TVM_GROUP"
POPEN_WORKER = "tvm.exec.popen_worker"
DEADLINE = 60.0

SITECUSTOMIZE = f'''"""Test shim for TVM popen workers (tests/tvm_rpc.py)."""
import os
import sys

sys.modules.setdefault("torch", None)  # tvm_ffi imports torch when installed: ~9 s per process
if os.environ.get("{GROUP_ENV}") == "1":
    os.environ.pop("{GROUP_ENV}", None)
    os.setpgid(0, 0)  # its own process group: a signal to the group ends its sessions too
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG: die with the tests
'''

_env_lock = threading.Lock()


def wait_for(condition: Callable[[], Any], what: str, timeout: float = DEADLINE, every: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


@contextlib.contextmanager
def _worker_env(shim: Path) -> Iterator[None]:
    """Environment of the popen workers started inside (own group, no torch)."""
    with _env_lock:
        saved = {k: os.environ.get(k) for k in ("PYTHONPATH", GROUP_ENV)}
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), saved["PYTHONPATH"]) if p)
        os.environ[GROUP_ENV] = "1"
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


# ---------------------------------------------------------------------- /proc


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, pgid, state) of a process, None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[2]), fields[0]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def live_processes() -> list[tuple[int, int, int, str]]:
    """(pid, ppid, pgid, cmdline) of every running process (zombies left out)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _stat(int(entry))
        if st is None or st[2] in ("Z", "X"):
            continue
        out.append((int(entry), st[0], st[1], _cmdline(int(entry))))
    return out


def group_members(pgid: int) -> list[int]:
    """Running processes of a process group."""
    return [pid for pid, _, g, _ in live_processes() if g == pgid]


def popen_workers_of(pid: int) -> list[int]:
    """Running children of ``pid`` that are TVM popen workers."""
    return [p for p, ppid, _, cmd in live_processes() if ppid == pid and POPEN_WORKER in cmd]


# ---------------------------------------------------------------------- tracker and servers


class RpcServer:
    """One ``tvm.rpc.Server`` registered at a tracker under a key (its own process group)."""

    def __init__(self, worker: PopenWorker, key: str) -> None:
        self._worker = worker
        self.key = key
        self.port = int(worker.recv())
        self.pid = int(worker._proc.pid)
        self.pgid = self.pid  # the sitecustomize made the worker its group's leader
        self.address = f"{HOST}:{self.port}"

    def processes(self) -> list[int]:
        """Running processes of this server (the worker and its session processes)."""
        return group_members(self.pgid)

    def send_signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the whole server (worker and sessions)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, sig)

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """End the server with ``sig`` (SIGKILL, SIGTERM) and reap its worker."""
        self.send_signal(sig)
        self.send_signal(signal.SIGCONT)  # a stopped process handles SIGTERM only when resumed
        self._worker._proc.wait(timeout=DEADLINE)

    def freeze(self) -> None:
        """SIGSTOP the whole server: it keeps its connections but answers nothing (a hang)."""
        self.send_signal(signal.SIGSTOP)

    @property
    def alive(self) -> bool:
        """Whether the worker process still runs."""
        return self._worker._proc.poll() is None

    def close(self) -> None:
        """Kill what is left of the server (idempotent)."""
        if self.alive or self.processes():
            self.kill(signal.SIGKILL)
        with contextlib.suppress(OSError):
            self._worker._reader.close()
            self._worker._writer.close()
        self._worker._proc = None


class TvmLab:
    """A real tracker on 127.0.0.1 plus the servers the tests start under their keys."""

    def __init__(self, shim_dir: Path) -> None:
        # Popen workers this process already had (in-process TVM compiles of earlier tests keep a pool):
        # not the lab's, so close() does not wait for them.
        self._workers_before = set(popen_workers_of(os.getpid()))
        self.shim = shim_dir
        self.shim.mkdir(parents=True, exist_ok=True)
        (self.shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
        port = free_port()
        with _worker_env(self.shim):
            self.tracker = Tracker(HOST, port=port, port_end=port + 200, silent=True)
        self.port = int(self.tracker.port)
        self.address = f"{HOST}:{self.port}"
        self.tracker_pid = int(self.tracker.proc._proc.pid)
        self.servers: list[RpcServer] = []

    def agent_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for an agent process with ``--backend tvm`` (TVM imported without torch)."""
        env = dict(os.environ if base is None else base)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.shim), env.get("PYTHONPATH")) if p)
        return env

    @staticmethod
    def new_key(prefix: str = "test") -> str:
        """A key no other test uses."""
        return f"{prefix}-{uuid.uuid4().hex[:8]}"

    def start_servers(self, key: str, n: int = 1, tracker: bool = True) -> list[RpcServer]:
        """Start ``n`` servers under ``key`` (registered at the tracker unless ``tracker=False``).

        The workers start in parallel (they import TVM) but are all created from this thread.
        """
        workers = []
        with _worker_env(self.shim):
            for _ in range(n):
                worker = PopenWorker()
                port = free_port()
                worker.send(
                    tvm_server._popen_start_rpc_server,
                    [
                        HOST,
                        port,
                        port + 200,
                        False,
                        (HOST, self.port) if tracker else None,
                        key,
                        None,
                        None,
                        True,
                        False,
                        None,
                        True,
                        None,
                    ],
                )
                workers.append(worker)
        started = [RpcServer(w, key) for w in workers]
        self.servers.extend(started)
        return started

    def summary(self) -> dict[str, Any]:
        """The tracker's summary."""
        link = rpc.connect_tracker(HOST, self.port)
        try:
            return dict(link.summary())
        finally:
            link.close()

    def registered(self, key: str) -> list[str]:
        """HOST:PORT of the servers registered under ``key``."""
        return sorted(
            f"{s['addr'][0]}:{s['addr'][1]}" for s in self.summary()["server_info"] if s.get("key") == f"server:{key}"
        )

    def free(self, key: str) -> int:
        """Servers of ``key`` the tracker could hand out now."""
        return int(self.summary()["queue_info"].get(key, {}).get("free", 0))

    def wait_servers(self, key: str, n: int, free: bool = True) -> list[str]:
        """Wait until ``n`` servers are registered (and free) under ``key``."""

        def ready() -> list[str] | None:
            servers = self.registered(key)
            if len(servers) != n or (free and self.free(key) < n):
                return None
            return servers

        return wait_for(ready, f"{n} server(s) registered under {key!r}")

    def stop_servers(self) -> None:
        """Kill every server started so far and wait until their processes are gone."""
        for server in self.servers:
            server.close()
        for server in self.servers:
            wait_for(lambda s=server: not s.processes(), f"server {server.address} to exit")
        self.servers.clear()

    def leftovers(self) -> list[str]:
        """Running TVM worker processes that should not be there (tracker excluded)."""
        me = os.getpid()
        return [
            f"{pid} (parent {ppid}, group {pgid}): {cmd}"
            for pid, ppid, pgid, cmd in live_processes()
            if POPEN_WORKER in cmd
            and pid != self.tracker_pid
            and (ppid == me or pgid in {s.pgid for s in self.servers})
        ]

    def close(self) -> None:
        """Stop the servers and the tracker; fail if a worker process is left."""
        self.stop_servers()
        self.tracker.terminate()
        wait_for(lambda: _stat(self.tracker_pid) is None or _stat(self.tracker_pid)[2] == "Z", "the tracker to exit")
        wait_for(
            lambda: not set(popen_workers_of(os.getpid())) - self._workers_before, "no TVM popen worker of the lab left"
        )


@pytest.fixture(scope="session")
def tvm_session_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TvmLab]:
    """One tracker for the whole test session (servers are stopped per test by ``tvm_lab``)."""
    lab = TvmLab(tmp_path_factory.mktemp("tvm-shim"))
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def tvm_lab(tvm_session_lab: TvmLab) -> Iterator[TvmLab]:
    """The session's tracker; the servers a test starts are killed after it, leaving nothing."""
    yield tvm_session_lab
    pgids = [s.pgid for s in tvm_session_lab.servers]
    tvm_session_lab.stop_servers()
    left = [pid for pgid in pgids for pid in group_members(pgid)]
    assert not left, f"TVM server processes left behind: {left}"
    assert not tvm_session_lab.leftovers(), tvm_session_lab.leftovers()


# ---------------------------------------------------------------------- models and agents


def quantized_models(folder: Path, seed: int = 0) -> dict[str, Path]:
    """The test CNN (``onnx_models.cnn``, 3x16x16, dynamic batch) as candidates.

    ``fp32``: pre-processed as the controller does (``quant_pre_process``: ORT basic
    optimizations + shape inference); ``qdq`` and ``qoperator``: that model statically
    quantized by ONNX Runtime (uint8 activations, int8 weights).
    """
    from onnx_models import cnn
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folder.mkdir(parents=True, exist_ok=True)
    raw = cnn(folder / "raw.onnx", seed=seed)
    fp32 = folder / "fp32.onnx"
    quant_pre_process(str(raw), str(fp32), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(cnn_samples(16, seed=99))

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {"input": x[None]}

    out = {"fp32": fp32}
    for name, fmt in (("qdq", QuantFormat.QDQ), ("qoperator", QuantFormat.QOperator)):
        out[name] = folder / f"{name}.onnx"
        quantize_static(
            str(fp32),
            str(out[name]),
            Reader(),
            quant_format=fmt,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return out


def cnn_samples(n: int, seed: int = 1) -> np.ndarray:
    """``n`` float32 inputs of the test CNN (3x16x16)."""
    return np.random.default_rng(seed).normal(0, 1, (n, 3, 16, 16)).astype(np.float32)


def ort_scores(model: Path, data: np.ndarray) -> np.ndarray:
    """ONNX Runtime's class scores of ``data``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: data})[0])


@pytest.fixture(scope="session")
def tvm_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """:func:`quantized_models` built once per test session (read-only)."""
    return quantized_models(tmp_path_factory.mktemp("tvm-models"))


@pytest.fixture(scope="session")
def tvm_shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TVM compile cache shared by the agents of the tests that are not about compiling, in every pytest-xdist
    worker of the run (the cache is safe across threads and processes: a file lock per key, atomic renames)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # <run's base>/popen-gwN: the run's base is shared by its workers
        root = root.parent
    cache = root / "tvm-compile-cache"
    cache.mkdir(exist_ok=True)
    return cache


@pytest.fixture
def tvm_agent(tmp_path: Path, tvm_shared_cache: Path) -> Iterator[Callable[..., Any]]:
    """Start in-process agents with TVM lanes: ``tvm_agent(settings, state_dir=None, name="phone")``.

    Returns the started ``AgentServer`` (its lanes: ``server.backends``; the shared pool:
    ``lane.pool``). All are stopped at teardown. ``shared_cache=True``: the agent's compile cache is
    :func:`tvm_shared_cache` (libraries another test built are hits), for tests whose claims do not
    depend on whether a library is compiled or found.
    """
    from tuneqn.agent.backends.tvm import create_lanes
    from tuneqn.agent.config import AgentConfig, TvmSettings
    from tuneqn.agent.server import AgentServer

    started: list[AgentServer] = []

    def start(
        settings: TvmSettings | None = None,
        state_dir: Path | None = None,
        name: str = "phone",
        device_class: str = "phone-class",
        shared_cache: bool = False,
    ) -> AgentServer:
        state = state_dir or tmp_path / f"tvm-agent-{len(started)}"
        if shared_cache:  # the agent keeps its cache in <state>/tvm/cache (TvmPool)
            (state / "tvm").mkdir(parents=True, exist_ok=True)
            (state / "tvm" / "cache").symlink_to(tvm_shared_cache, target_is_directory=True)
        lanes = create_lanes(name, device_class, settings or TvmSettings(), state)
        server = AgentServer(AgentConfig(state_dir=state, host=HOST, port=0), lanes)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server.running:
            server.stop(grace=0.5)
