"""The small interface every execution backend of the agent implements."""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from tuneqn.v1 import agent_pb2 as pb

T = TypeVar("T")


class Interrupted(Exception):
    """Raised by a backend when its ``stop`` event was set during a run."""


class Infeasible(Exception):
    """The device cannot run this model at all (e.g. op types its runtime cannot import).

    Deterministic: the job ends FAILED with ``JobResult.infeasible`` and a retry gives the
    same answer. ``ops`` are the unsupported op types (sorted; empty when the failure is
    elsewhere, e.g. in a frontend's import of a supported op).
    """

    def __init__(self, message: str, ops: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.ops: list[str] = sorted(set(ops))


@dataclass(frozen=True)
class DeviceDescription:
    """What a backend reports about the device it drives (mirrors ``tuneqn.v1.Device``)."""

    name: str
    device_class: str
    backend: str
    runtime_versions: dict[str, str] = field(default_factory=dict)
    cpu: str = ""
    gpu: str = ""
    capabilities: tuple[str, ...] = ()
    simulated: bool = False
    simulated_latency_ms_per_sample: float = 0.0
    target: str = ""  # TVM: the target as a JSON dict
    rpc_key: str = ""  # TVM: the device key on the RPC tracker
    remote: str = ""  # "tracker HOST:PORT", "rpc HOST:PORT"; empty = the agent's host
    supported_ops: tuple[str, ...] = ()  # ONNX op types it can import; empty = no known restriction
    remote_servers: int = 0  # TVM tracker: servers registered under rpc_key now
    prediction_slots: int = 1  # jobs that only predict run at once (Backend.prediction_slots)


@dataclass(frozen=True)
class LoadOptions:
    """Per-job options for preparing a model.

    ``backend_options`` is the job's ``tuneqn.v1.BackendOptions``: each backend reads
    its own message (ORT: ``backend_options.ort``) and ignores the others. ``stop`` is
    the job's interrupt event (set on cancel or agent stop) for loads that may wait long,
    e.g. for a free remote device; a backend raises :class:`Interrupted` when it is set.
    """

    input_name: str = ""
    backend_options: pb.BackendOptions = field(default_factory=pb.BackendOptions)
    stop: threading.Event | None = field(default=None, compare=False)
    #: The job only predicts (no latency): it may run beside others like it (:meth:`Backend.prediction_slots`).
    predicts_only: bool = False


@dataclass
class PreparedModel:
    """A model loaded by a backend and ready to run.

    ``fixed_batch`` is the model's batch size when its first input axis is a fixed
    integer (each run then takes exactly that many rows) and ``None`` when dynamic.
    The build fields describe how a compiling backend (TVM) produced what runs; they go
    into the ``JobResult`` as they are when the job ends (``executed_on`` may change while
    it runs, when a remote device is replaced).
    """

    input_name: str
    fixed_batch: int | None
    sample_shape: tuple[int | str | None, ...]
    compile_seconds: float = 0.0  # compiling for the device (0 when cached or not compiled)
    tuning_seconds: float = 0.0  # tuning before compiling (0 when untuned or cached)
    tuned: bool = False  # the latency comes from a tuned build
    compile_cache_hit: bool = False  # the compiled artefact came from the backend's cache
    executed_on: str = ""  # the remote server running it ("HOST:PORT"), empty = this host


class Backend(abc.ABC):
    """Runs prepared models on one device.

    The job manager calls, per job: :meth:`prepare_ahead` when the job is queued,
    :meth:`load`, :meth:`predict` per chunk, :meth:`latency`, and :meth:`release` when
    the job ends (success or not). :meth:`start` is called once when the agent runs.
    Only the abstract methods are required; the hooks are no-ops by default.
    """

    name: str = ""

    @abc.abstractmethod
    def describe(self) -> DeviceDescription:
        """Describe the device this backend drives."""

    @abc.abstractmethod
    def load(self, model_path: Path, options: LoadOptions) -> PreparedModel:
        """Prepare the model at ``model_path`` for running."""

    @abc.abstractmethod
    def predict(self, handle: PreparedModel, batch: np.ndarray, stop: threading.Event | None = None) -> np.ndarray:
        """Class scores ``[len(batch), classes]`` for one chunk of samples.

        With a fixed batch size the chunk may be shorter than the batch (it is padded
        and the padded rows are dropped). Raises :class:`Interrupted` if ``stop`` is set.
        """

    @abc.abstractmethod
    def latency(
        self, handle: PreparedModel, sample: np.ndarray, warmup: int, repeats: int, stop: threading.Event | None = None
    ) -> list[float]:
        """Milliseconds of ``repeats`` timed runs on ``sample`` after ``warmup`` runs."""

    def health(self) -> tuple[bool, str]:
        """Whether the device can take jobs now, and a status text.

        Unhealthy: why not. Healthy: what the device waits for now (e.g. a free remote
        device), or empty.
        """
        return True, ""

    def start(self, add_backend: Callable[[Backend], None]) -> None:  # noqa: B027 - optional hook
        """Called once when the agent starts its workers.

        A backend that discovers devices while the agent runs (a TVM tracker where phones
        join) passes each new device's backend to ``add_backend``.
        """

    def prediction_slots(self) -> int:
        """How many jobs that only predict (screens, no latency) the device runs at once; 1 by default. A job that
        times latency always has the device to itself."""
        return 1

    def prepare_ahead(self, model_path: Path, options: LoadOptions) -> None:  # noqa: B027
        """A job with this model was queued: start preparing it in the background (must not block)."""

    def forget_ahead(self, model_path: Path, options: LoadOptions) -> None:  # noqa: B027
        """A queued job was cancelled before it ran: drop what ``prepare_ahead`` holds for it (must not block)."""

    def release(self, handle: PreparedModel) -> None:  # noqa: B027 - optional hook
        """The job using ``handle`` ended (success or not): free what it holds (remote sessions)."""

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release resources held by the backend."""


def pick_input(inputs: list[T], wanted: str, name_of: Callable[[T], str]) -> T:
    """The model input called ``wanted`` (the first when empty); ValueError naming the inputs
    when it is missing or when the model has several (only single-input models are supported)."""
    if not inputs:
        raise ValueError("model has no input")
    chosen = inputs[0]
    if wanted:
        matching = [i for i in inputs if name_of(i) == wanted]
        if not matching:
            names = ", ".join(name_of(i) for i in inputs)
            raise ValueError(f"model has no input {wanted!r} (inputs: {names})")
        chosen = matching[0]
    if len(inputs) > 1:
        raise ValueError(f"model has {len(inputs)} inputs; only single-input models are supported")
    return chosen


def pad_to_batch(batch: np.ndarray, dtype: np.dtype, fixed_batch: int | None) -> np.ndarray:
    """``batch`` as a contiguous array of ``dtype``, zero-padded to ``fixed_batch`` rows if set."""
    x = np.ascontiguousarray(batch, dtype=dtype)
    n = x.shape[0]
    if fixed_batch is not None and n != fixed_batch:
        if n > fixed_batch:
            raise ValueError(f"chunk of {n} samples exceeds the model's batch size {fixed_batch}")
        x = np.concatenate([x, np.zeros((fixed_batch - n, *x.shape[1:]), dtype=x.dtype)])
    return x


def scores_of(out: np.ndarray, rows: int, n: int) -> np.ndarray:
    """Output 0 of a run on ``rows`` fed rows as ``[n, classes]`` (padded rows dropped)."""
    if out.ndim == 0 or out.shape[0] != rows:
        raise ValueError(f"output 0 has shape {list(out.shape)}; expected the batch of {rows} on axis 0")
    return out.reshape(out.shape[0], -1)[:n]


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores per row, highest first, ties by lower index (int32)."""
    order = np.argsort(-scores.astype(np.float64, copy=False), axis=1, kind="stable")[:, :k]
    return order.astype("<i4", copy=False)
