"""How the agent measures one job on its device: load the model, predict the dataset chunk by chunk (top-k
indices), time it (warm-up until steady, then the job's repeats, under the quiet lock), release it.

The job manager (:mod:`tuneqn.agent.jobs`) decides which job runs when and what its states are; this module
knows nothing of queues or states, only how one job is measured.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np

from tuneqn.agent.backends.base import Backend, Interrupted, LoadOptions, PreparedModel, topk_indices
from tuneqn.agent.blobs import BlobStore
from tuneqn.v1 import agent_pb2 as pb

DEFAULT_TOP_K = 5
DEFAULT_CHUNK_SIZE = 32
DEFAULT_LATENCY_WARMUP = 3
DEFAULT_LATENCY_REPEATS = 20

#: Warm-up continues in rounds until two consecutive rounds' medians agree within this ratio...
WARMUP_STABLE_RATIO = 1.05
#: ...or this many seconds of warm-up have passed (caches and clocks settle; a cap keeps slow
#: candidates, e.g. 150 ms dynamic ConvInteger models, from spending seconds on warm-up).
WARMUP_MAX_SECONDS = 1.0
WARMUP_ROUND = 5


def warm_up(measure: Callable[[int], list[float]], min_runs: int) -> int:
    """Run ``measure(n)`` (timed runs, ms) until the device is at its steady speed; returns runs made.

    At least ``min_runs`` runs; then rounds of :data:`WARMUP_ROUND` runs until the medians
    of two consecutive rounds differ by less than :data:`WARMUP_STABLE_RATIO`, for at most
    :data:`WARMUP_MAX_SECONDS`.
    """
    start = time.monotonic()
    runs = 0
    if min_runs > 0:
        measure(min_runs)
        runs += min_runs
    previous = float(np.median(measure(WARMUP_ROUND)))
    runs += WARMUP_ROUND
    while time.monotonic() - start < WARMUP_MAX_SECONDS:
        current = float(np.median(measure(WARMUP_ROUND)))
        runs += WARMUP_ROUND
        if max(current, previous) <= WARMUP_STABLE_RATIO * min(current, previous):
            break
        previous = current
    return runs


def latency_stats(times_ms: list[float]) -> pb.LatencyStats:
    """Summary statistics of latency samples in milliseconds."""
    if not times_ms:
        return pb.LatencyStats()
    a = np.asarray(times_ms, dtype=np.float64)
    p10, median, p90 = np.percentile(a, [10, 50, 90])
    return pb.LatencyStats(
        median_ms=float(median),
        p90_ms=float(p90),
        p10_ms=float(p10),
        mean_ms=float(a.mean()),
        std_ms=float(a.std()),
        min_ms=float(a.min()),
        max_ms=float(a.max()),
        count=len(times_ms),
    )


def predicts_only(spec: pb.JobSpec) -> bool:
    """Whether a job only predicts (a screen: ``latency_repeats`` set to 0), so it may share its device with others
    like it (:meth:`Backend.prediction_slots`); a job that times latency always has the device to itself."""
    return spec.HasField("latency_repeats") and spec.latency_repeats == 0


@dataclass(frozen=True)
class Measurement:
    """What measuring a job gives: its predictions' top-k indices, the model's size and its latency."""

    num_samples: int
    top_k: int
    topk_indices: bytes  # int32 little-endian, (num_samples, top_k), row-major
    model_size_bytes: int
    latency: pb.LatencyStats
    inference_seconds: float

    def fill(self, result: pb.JobResult) -> None:
        """Copy the measurement into a job result."""
        result.num_samples = self.num_samples
        result.top_k = self.top_k
        result.topk_indices = self.topk_indices
        result.model_size_bytes = self.model_size_bytes
        result.latency.CopyFrom(self.latency)
        result.inference_seconds = self.inference_seconds


def measure(
    spec: pb.JobSpec,
    backend: Backend,
    blobs: BlobStore,
    stop: threading.Event,
    progress: Callable[[str, int, int], None],
    quiet: Callable[[], AbstractContextManager[None]],
    loaded: Callable[[PreparedModel | None], None],
) -> Measurement:
    """Load ``spec``'s model on ``backend`` (``loaded`` is told the prepared model, or None before loading), measure
    it (:func:`measure_loaded`) and release it, also when the measurement fails."""
    model_path = blobs.path(spec.model_sha256)
    dataset_path = blobs.path(spec.dataset_sha256)
    for sha, path in ((spec.model_sha256, model_path), (spec.dataset_sha256, dataset_path)):
        if not path.exists():
            blobs.forget(sha)  # HasBlobs now says absent: the client uploads it again
            raise FileNotFoundError(f"blob {sha} is no longer in the agent's cache")
        blobs.touch(sha)
    loaded(None)
    handle = backend.load(
        model_path,
        LoadOptions(
            input_name=spec.input_name,
            backend_options=spec.backend_options,
            stop=stop,
            predicts_only=predicts_only(spec),
        ),
    )
    loaded(handle)
    try:
        return measure_loaded(spec, backend, handle, blobs, stop, progress, quiet)
    finally:
        backend.release(handle)


def measure_loaded(
    spec: pb.JobSpec,
    backend: Backend,
    handle: PreparedModel,
    blobs: BlobStore,
    stop: threading.Event,
    progress: Callable[[str, int, int], None],
    quiet: Callable[[], AbstractContextManager[None]],
) -> Measurement:
    """Predictions (``progress("predicting", done, total)`` after each chunk) and latency (``progress("latency",
    …)`` first; timed inside ``quiet()``) of a loaded model. Raises :class:`Interrupted` once ``stop`` is set."""
    top_k = spec.top_k if spec.HasField("top_k") else DEFAULT_TOP_K
    chunk_size = spec.chunk_size if spec.HasField("chunk_size") else DEFAULT_CHUNK_SIZE
    warmup = spec.latency_warmup if spec.HasField("latency_warmup") else DEFAULT_LATENCY_WARMUP
    repeats = spec.latency_repeats if spec.HasField("latency_repeats") else DEFAULT_LATENCY_REPEATS
    model_size = blobs.path(spec.model_sha256).stat().st_size
    data = np.load(blobs.path(spec.dataset_sha256), mmap_mode="r", allow_pickle=False)
    if not isinstance(data, np.ndarray) or data.ndim < 1 or data.shape[0] == 0:
        raise ValueError("dataset must be a .npy array with at least one sample on axis 0")
    n = int(data.shape[0])
    chunk = handle.fixed_batch or chunk_size
    progress("predicting", 0, n)

    topk: np.ndarray | None = None
    classes = 0
    t0 = time.perf_counter()
    for start in range(0, n, chunk):
        if stop.is_set():
            raise Interrupted()
        batch = np.asarray(data[start : start + chunk])
        scores = backend.predict(handle, batch, stop=stop)
        if topk is None:
            classes = int(scores.shape[1])
            if classes == 0:
                raise ValueError("model output 0 is empty")
            topk = np.empty((n, min(top_k, classes)), dtype="<i4")
        elif scores.shape[1] != classes:
            raise ValueError(f"output size changed from {classes} to {scores.shape[1]}")
        topk[start : start + batch.shape[0]] = topk_indices(scores, topk.shape[1])
        progress("predicting", start + batch.shape[0], n)
    inference_seconds = time.perf_counter() - t0
    if topk is None:  # unreachable: n > 0
        raise ValueError("no samples were predicted")

    stats = pb.LatencyStats()
    if repeats > 0:
        if stop.is_set():
            raise Interrupted()
        progress("latency", n, n)
        one = np.asarray(data[:1])
        with quiet():
            warm_up(lambda k: backend.latency(handle, one, 0, k, stop=stop), warmup)
            times = backend.latency(handle, one, 0, repeats, stop=stop)
        stats = latency_stats(times)
    return Measurement(
        num_samples=n,
        top_k=int(topk.shape[1]),
        topk_indices=topk.astype("<i4", copy=False).tobytes(order="C"),
        model_size_bytes=model_size,
        latency=stats,
        inference_seconds=inference_seconds,
    )
