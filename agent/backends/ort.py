"""ONNX Runtime CPU backend."""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tuneqn.agent.backends.base import (
    Backend,
    DeviceDescription,
    Interrupted,
    LoadOptions,
    PreparedModel,
    pad_to_batch,
    pick_input,
    scores_of,
)

log = logging.getLogger(__name__)

# ORT tensor type strings -> numpy dtypes for the inputs we can feed from a float dataset.
_ORT_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
}

#: ``queue-ahead``: the controller may submit the next job while one runs (it starts when the current one ends).
CAPABILITIES = ("ort", "cpu", "qdq", "qoperator", "dynamic", "static", "queue-ahead")


def runtime_versions() -> dict[str, str]:
    """Versions of the runtime stack that produced a result."""
    versions = {"python": platform.python_version(), "onnxruntime": ort.__version__}
    for dist in ("onnx", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = ""
    return versions


def cpu_model_name() -> str:
    """The CPU model name from /proc/cpuinfo, else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: Screens an ORT device runs at once (:meth:`OrtBackend.prediction_slots`).
_SCREEN_SLOTS = 2


def _cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class OrtModel(PreparedModel):
    """An ORT session plus what is needed to feed it."""

    session: ort.InferenceSession | None = None
    input_dtype: np.dtype = _ORT_DTYPES["tensor(float)"]
    output_name: str = ""


class OrtBackend(Backend):
    """Runs models with ONNX Runtime's CPU execution provider.

    ``simulated_latency_ms_per_sample`` adds a fixed sleep per predicted sample to
    emulate a slow device; it is always reported as simulated and never enters the
    measured latency.
    """

    name = "ort"

    def __init__(
        self,
        device_name: str,
        device_class: str = "",
        simulated_latency_ms_per_sample: float = 0.0,
    ) -> None:
        if simulated_latency_ms_per_sample < 0:
            raise ValueError("simulated_latency_ms_per_sample must be >= 0")
        self.device_name = device_name
        self.device_class = device_class or device_name
        self.simulated_latency_ms_per_sample = float(simulated_latency_ms_per_sample)
        self._versions = runtime_versions()
        self._cpu = cpu_model_name()
        self._cores = _cores()

    def describe(self) -> DeviceDescription:
        """Describe the CPU device."""
        return DeviceDescription(
            name=self.device_name,
            device_class=self.device_class,
            backend=self.name,
            runtime_versions=dict(self._versions),
            cpu=self._cpu,
            gpu="",
            capabilities=CAPABILITIES,
            simulated=self.simulated_latency_ms_per_sample > 0,
            simulated_latency_ms_per_sample=self.simulated_latency_ms_per_sample,
            prediction_slots=self.prediction_slots(),
        )

    def prediction_slots(self) -> int:
        """Two screens at once on a CPU with two cores or more, each on half of them: two inferences on one core each
        scale better than one on both, and one screen's session build overlaps the other's inference (20 Lite1
        screens of 32 images on 2 cores: 5.3-5.7 s instead of 6.5-7.4 s). A simulated device stays one."""
        return 1 if self.simulated_latency_ms_per_sample > 0 else min(_SCREEN_SLOTS, self._cores)

    def load(self, model_path: Path, options: LoadOptions) -> OrtModel:
        """Create an ORT session for the model (quiet logging, ``backend_options.ort`` applied)."""
        ort_options = options.backend_options.ort
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if ort_options.intra_op_threads:
            so.intra_op_num_threads = ort_options.intra_op_threads
        elif options.predicts_only and self.prediction_slots() > 1:
            # always this many threads, alone or beside another screen: the predictions do not depend on timing
            so.intra_op_num_threads = max(1, self._cores // self.prediction_slots())
        session = ort.InferenceSession(
            str(model_path),
            so,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=list(ort_options.disabled_optimizers),
        )
        model_input = pick_input(list(session.get_inputs()), options.input_name, lambda i: i.name)
        dtype = _ORT_DTYPES.get(model_input.type)
        if dtype is None:
            raise ValueError(f"unsupported input type {model_input.type} of {model_input.name!r}")
        shape = tuple(model_input.shape)
        batch_dim = shape[0] if shape else None
        fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        return OrtModel(
            input_name=model_input.name,
            fixed_batch=fixed_batch,
            sample_shape=shape[1:],
            session=session,
            input_dtype=dtype,
            output_name=session.get_outputs()[0].name,
        )

    @staticmethod
    def _feed(handle: OrtModel, batch: np.ndarray) -> np.ndarray:
        """``batch`` in the input's dtype, zero-padded to the fixed batch size if there is one."""
        return pad_to_batch(batch, handle.input_dtype, handle.fixed_batch)

    @staticmethod
    def _session_run(handle: OrtModel, x: np.ndarray) -> np.ndarray:
        if handle.session is None:
            raise ValueError("model handle has no session")
        return np.asarray(handle.session.run([handle.output_name], {handle.input_name: x})[0])

    def _scores(self, handle: OrtModel, batch: np.ndarray) -> np.ndarray:
        """Output 0 flattened to ``[n, classes]`` for ``batch``, padded rows dropped."""
        n = batch.shape[0]
        x = self._feed(handle, batch)
        return scores_of(self._session_run(handle, x), x.shape[0], n)

    def predict(self, handle: PreparedModel, batch: np.ndarray, stop: threading.Event | None = None) -> np.ndarray:
        """Class scores for one chunk; sleeps the simulated latency per sample afterwards."""
        if not isinstance(handle, OrtModel):
            raise TypeError("handle was not prepared by the ORT backend")
        scores = self._scores(handle, batch)
        if self.simulated_latency_ms_per_sample > 0:
            delay = self.simulated_latency_ms_per_sample * batch.shape[0] / 1000.0
            if stop is None:
                time.sleep(delay)
            elif stop.wait(delay):
                raise Interrupted()
        return scores

    def latency(
        self, handle: PreparedModel, sample: np.ndarray, warmup: int, repeats: int, stop: threading.Event | None = None
    ) -> list[float]:
        """Real wall-clock milliseconds per run of one sample (``time.perf_counter``)."""
        if not isinstance(handle, OrtModel):
            raise TypeError("handle was not prepared by the ORT backend")
        x = self._feed(handle, sample[:1])
        for _ in range(warmup):
            if stop is not None and stop.is_set():
                raise Interrupted()
            self._session_run(handle, x)
        times: list[float] = []
        for _ in range(repeats):
            if stop is not None and stop.is_set():
                raise Interrupted()
            t0 = time.perf_counter()
            self._session_run(handle, x)
            times.append((time.perf_counter() - t0) * 1000.0)
        return times
