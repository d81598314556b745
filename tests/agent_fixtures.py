"""Helpers and fixtures of the agent tests: a pytest plugin (``pytest_plugins`` in ``tests/conftest.py``), so
test modules use the fixtures by name without importing them, and import the helpers (models, data, job
specs) from here. ``tests/agent/test_agent_helpers.py`` checks the helpers themselves."""

from __future__ import annotations

import io
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tuneqn.agent.backends.ort import OrtBackend
from tuneqn.agent.config import AgentConfig
from tuneqn.agent.server import AgentServer
from tuneqn.controller.farm.client import AgentClient
from tuneqn.v1 import agent_pb2 as pb

OPSET = 17
INPUT_SHAPE = (3, 8, 8)
NUM_CLASSES = 10
DEVICE = "testdev"
READY_TIMEOUT = 30.0


# ---------------------------------------------------------------------- models and data


def build_cnn(batch: int | str = "N", seed: int = 0) -> bytes:
    """conv1+Relu -> conv2+Relu -> Flatten -> fc (Gemm), 10 classes; same weights per seed."""
    rng = np.random.default_rng(seed)
    c, (ch, h, w) = 4, INPUT_SHAPE

    def init(name: str, arr: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(arr.astype(np.float32), name)

    inits = [
        init("conv1.W", rng.normal(0, 0.5, (c, ch, 3, 3))),
        init("conv1.B", rng.normal(0, 0.1, c)),
        init("conv2.W", rng.normal(0, 0.4, (c, c, 3, 3))),
        init("conv2.B", rng.normal(0, 0.1, c)),
        init("fc.W", rng.normal(0, 0.3, (NUM_CLASSES, c * h * w))),
        init("fc.B", rng.normal(0, 0.1, NUM_CLASSES)),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv1.W", "conv1.B"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.W", "conv2.B"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.W", "fc.B"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, *INPUT_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, NUM_CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def build_qdq_cnn(tmp: Path, exclude: tuple[str, ...] = ("conv2",)) -> bytes:
    """The tiny CNN statically quantized to QDQ with ``exclude`` left in float."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(dataset(8, seed=7))

        def get_next(self) -> dict[str, np.ndarray] | None:
            sample = next(self._it, None)
            return None if sample is None else {"input": sample[None]}

    src, dst = tmp / "float.onnx", tmp / "qdq.onnx"
    src.write_bytes(build_cnn())
    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=list(exclude),
    )
    return dst.read_bytes()


def dataset(n: int, seed: int = 1) -> np.ndarray:
    """``n`` random float32 samples of the CNN's input shape."""
    return np.random.default_rng(seed).normal(0, 1, (n, *INPUT_SHAPE)).astype(np.float32)


def npy_bytes(arr: np.ndarray) -> bytes:
    """``arr`` as .npy file bytes."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def direct_topk(model: bytes, data: np.ndarray, k: int = 5, disabled_optimizers: tuple[str, ...] = ()) -> np.ndarray:
    """Top-k class indices of a plain ORT run of the whole dataset (highest first)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(
        model, so, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled_optimizers)
    )
    scores = sess.run(None, {sess.get_inputs()[0].name: data})[0]
    return np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int32)


def job_spec(job_id: str, model_sha: str, data_sha: str, **kw: Any) -> pb.JobSpec:
    """A JobSpec with quick latency settings unless overridden."""
    kw.setdefault("latency_warmup", 1)
    kw.setdefault("latency_repeats", 3)
    return pb.JobSpec(job_id=job_id, model_sha256=model_sha, dataset_sha256=data_sha, **kw)


def executions(state_dir: Path, job_id: str) -> int:
    """How often the job started executing, read from the agent's SQLite file."""
    with sqlite3.connect(state_dir / "agent.db") as conn:
        (count,) = conn.execute("SELECT COUNT(*) FROM executions WHERE job_id = ?", [job_id]).fetchone()
    return int(count)


def jobs_recorded(state_dir: Path) -> int:
    """Rows in the agent's jobs table."""
    with sqlite3.connect(state_dir / "agent.db") as conn:
        (count,) = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()
    return int(count)


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def cnn_bytes() -> bytes:
    """The tiny CNN with a dynamic batch dimension."""
    return build_cnn()


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., AgentServer]]:
    """Start in-process agents on 127.0.0.1:0; all are stopped at teardown.

    Keyword arguments: ``state_dir`` (default ``tmp_path/"agent"``),
    ``simulated_ms`` and any :class:`AgentConfig` field.
    """
    started: list[AgentServer] = []

    def start(state_dir: Path | None = None, simulated_ms: float = 0.0, **config: Any) -> AgentServer:
        backend = OrtBackend(DEVICE, "test-class", simulated_latency_ms_per_sample=simulated_ms)
        cfg = AgentConfig(state_dir=state_dir or tmp_path / "agent", host="127.0.0.1", port=0, **config)
        server = AgentServer(cfg, [backend])
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server.running:
            server.stop(grace=0.5)


@pytest.fixture
def client_factory() -> Iterator[Callable[..., AgentClient]]:
    """Open AgentClients on an agent's address; all are closed at teardown."""
    opened: list[AgentClient] = []

    def connect(server: AgentServer | str, **kw: Any) -> AgentClient:
        address = server if isinstance(server, str) else f"127.0.0.1:{server.port}"
        kw.setdefault("timeout", 10.0)
        client = AgentClient(address, **kw)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


class AgentProcess:
    """A ``python -m tuneqn.agent`` subprocess started with port 0."""

    def __init__(self, state_dir: Path, *args: str, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed by kill()/terminate()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tuneqn.agent",
                "--listen",
                "127.0.0.1:0",
                "--state-dir",
                str(state_dir),
                "--device-name",
                DEVICE,
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        self.address = self._wait_ready()

    def _wait_ready(self) -> str:
        """Read the readiness line (with a timeout) and return HOST:PORT."""
        lines: queue.Queue[bytes] = queue.Queue()
        stdout = self.proc.stdout
        if stdout is None:
            raise RuntimeError("agent stdout is not a pipe")
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=READY_TIMEOUT).decode().strip()
        except queue.Empty:
            self.kill()
            raise RuntimeError(f"agent not ready in {READY_TIMEOUT} s: {self.log_path.read_text()}") from None
        prefix = "tuneqn-agent listening on "
        if not line.startswith(prefix):
            self.kill()
            raise RuntimeError(f"unexpected agent output {line!r}: {self.log_path.read_text()}")
        return line[len(prefix) :]

    def kill(self) -> None:
        """SIGKILL the agent and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=READY_TIMEOUT)
        self._close()

    def terminate(self) -> int:
        """SIGTERM the agent; returns its exit code."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=READY_TIMEOUT)
        self._close()
        return code

    def _close(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start agent subprocesses (``start(state_dir, *extra_args)``); killed at teardown."""
    procs: list[AgentProcess] = []

    def start(state_dir: Path, *args: str) -> AgentProcess:
        p = AgentProcess(state_dir, *args, log_path=tmp_path / f"agent-{len(procs)}.log")
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.proc.poll() is None:
            p.kill()
