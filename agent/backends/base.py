"""The small interface every execution backend of the agent implements."""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tuneqn.v1 import agent_pb2 as pb


class Interrupted(Exception):
    """Raised by a backend when its ``stop`` event was set during a run."""


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


@dataclass(frozen=True)
class LoadOptions:
    """Per-job options for preparing a model.

    ``backend_options`` is the job's ``tuneqn.v1.BackendOptions``: each backend reads
    its own message (ORT: ``backend_options.ort``) and ignores the others.
    """

    input_name: str = ""
    backend_options: pb.BackendOptions = field(default_factory=pb.BackendOptions)


@dataclass
class PreparedModel:
    """A model loaded by a backend and ready to run.

    ``fixed_batch`` is the model's batch size when its first input axis is a fixed
    integer (each run then takes exactly that many rows) and ``None`` when dynamic.
    """

    input_name: str
    fixed_batch: int | None
    sample_shape: tuple[int | str | None, ...]


class Backend(abc.ABC):
    """Runs prepared models on one device."""

    name: str = ""

    @abc.abstractmethod
    def describe(self) -> DeviceDescription:
        """Describe the device this backend drives."""

    @abc.abstractmethod
    def load(self, model_path: Path, options: LoadOptions) -> PreparedModel:
        """Prepare the model at ``model_path`` for running."""

    @abc.abstractmethod
    def predict(
        self, handle: PreparedModel, batch: np.ndarray, stop: threading.Event | None = None
    ) -> np.ndarray:
        """Class scores ``[len(batch), classes]`` for one chunk of samples.

        With a fixed batch size the chunk may be shorter than the batch (it is padded
        and the padded rows are dropped). Raises :class:`Interrupted` if ``stop`` is set.
        """

    @abc.abstractmethod
    def latency(
        self,
        handle: PreparedModel,
        one_sample: np.ndarray,
        warmup: int,
        repeats: int,
        stop: threading.Event | None = None,
    ) -> list[float]:
        """Milliseconds of ``repeats`` timed runs on ``one_sample`` after ``warmup`` runs."""

    def health(self) -> tuple[bool, str]:
        """Whether the device can take jobs now, and why not (free text; empty when healthy)."""
        return True, ""

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release resources held by the backend."""


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores per row, highest first, ties by lower index (int32)."""
    order = np.argsort(-scores.astype(np.float64, copy=False), axis=1, kind="stable")[:, :k]
    return order.astype("<i4", copy=False)
