"""Prometheus metrics of one agent, served on an opt-in HTTP port (``--metrics-listen``).

Each :class:`AgentMetrics` has its own :class:`~prometheus_client.CollectorRegistry`
(not the process-global one), so several agents in one process never collide.

Metrics (``device`` is the device name, ``state`` a final job state):

* ``tuneqn_agent_jobs_finished_total{device,state}``: executions that ended SUCCEEDED,
  FAILED or CANCELLED;
* ``tuneqn_agent_jobs_interrupted_total{device}``: executions interrupted by a stop (the
  job stays queued and runs again after restart);
* ``tuneqn_agent_job_duration_seconds{device,state}``: histogram of execution durations
  (load, predictions and latency; final states only);
* ``tuneqn_agent_queue_length{device}``: jobs waiting per device;
* ``tuneqn_agent_running_jobs{device}``: 1 while the device runs a job;
* ``tuneqn_agent_blob_cache_bytes`` and ``tuneqn_agent_blob_cache_limit_bytes``;
* ``tuneqn_agent_compile_cache_bytes`` and ``..._limit_bytes`` (TVM backend only).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

#: Job durations run from under a second (a tiny model on a CPU) to hours (tuning on a phone).
DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, float("inf"))
FINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")


class _LiveCollector(Collector):
    """Gauges read at scrape time from the agent's job manager and caches."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = self._read()
        queue = GaugeMetricFamily("tuneqn_agent_queue_length", "Jobs waiting to run, per device", labels=["device"])
        for device, length in sorted(now["queues"].items()):
            queue.add_metric([device], length)
        yield queue
        running = GaugeMetricFamily("tuneqn_agent_running_jobs", "Jobs running now, per device", labels=["device"])
        for device in sorted(now["queues"]):
            running.add_metric([device], 1 if device in now["running"] else 0)
        yield running
        caches = now["caches"]  # the agent's CacheUsage list, as GetInfo reports it
        blobs = next(c for c in caches if c.name == "blobs")
        yield GaugeMetricFamily(
            "tuneqn_agent_blob_cache_bytes",
            "Bytes held by the blob cache",
            value=blobs.used_bytes,
        )
        yield GaugeMetricFamily(
            "tuneqn_agent_blob_cache_limit_bytes",
            "Blob cache size before LRU eviction",
            value=blobs.limit_bytes,
        )
        compiled = [c for c in caches if c.name == "tvm-compile"]
        if compiled:
            used = sum(c.used_bytes for c in compiled)
            limit = sum(c.limit_bytes for c in compiled)
            yield GaugeMetricFamily(
                "tuneqn_agent_compile_cache_bytes",
                "Bytes held by the TVM compile cache",
                value=used,
            )
            yield GaugeMetricFamily(
                "tuneqn_agent_compile_cache_limit_bytes",
                "TVM compile cache size before LRU eviction",
                value=limit,
            )


def compile_caches(backends: Iterable[Any]) -> list[Any]:
    """The distinct TVM compile caches of ``backends`` (lanes of one pool share one)."""
    caches: dict[int, Any] = {}
    for backend in backends:
        cache = getattr(getattr(backend, "pool", None), "cache", None)
        if cache is not None and hasattr(cache, "usage"):
            caches[id(cache)] = cache
    return list(caches.values())


class AgentMetrics:
    """The metrics of one agent and (once :meth:`serve` ran) their HTTP endpoint."""

    def __init__(self, read_live: Callable[[], dict[str, Any]]) -> None:
        """``read_live()`` returns ``queues`` (device -> queued jobs), ``running`` (devices
        running a job) and ``caches`` (the ``tuneqn.v1.CacheUsage`` list of ``GetInfo``:
        "blobs", and "tvm-compile" on TVM agents)."""
        self.registry = CollectorRegistry()
        self.finished = Counter(
            "tuneqn_agent_jobs_finished",
            "Job executions that ended in a final state",
            ["device", "state"],
            registry=self.registry,
        )
        self.interrupted = Counter(
            "tuneqn_agent_jobs_interrupted",
            "Job executions interrupted by a stop (the job stays queued)",
            ["device"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "tuneqn_agent_job_duration_seconds",
            "Duration of job executions that ended in a final state",
            ["device", "state"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_LiveCollector(read_live))
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def job_finished(self, device: str, state: str, seconds: float) -> None:
        """Count an execution that ended (see :class:`~tuneqn.agent.jobs.JobManager`)."""
        if state in FINAL_STATES:
            self.finished.labels(device=device, state=state).inc()
            self.duration.labels(device=device, state=state).observe(seconds)
        else:
            self.interrupted.labels(device=device).inc()

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over HTTP on ``host:port`` (0 = a free port); returns the port."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._server.server_address[1])
        return self.port

    def close(self) -> None:
        """Stop the HTTP endpoint (if serving)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
