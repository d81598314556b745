"""What the farm evaluates and with what: agents to reach (:class:`Endpoint`), the run's settings
(:class:`FarmSettings`) and the jobs (:class:`JobPlan`, :func:`make_job`), and a result as the store keeps it.

Job ids are derived from the whole job spec and the device class, so the same work always has the same id:
submitting it again anywhere is idempotent and a result is stored once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneqn.controller.config import AgentSpec, EvaluationSpec
from tuneqn.controller.farm.client import AgentClient, decode_topk
from tuneqn.v1 import agent_pb2 as pb

log = logging.getLogger(__name__)


class Endpoint(AgentSpec):
    """An agent of the lab (:class:`~tuneqn.controller.config.AgentSpec`) with its token read: how to reach it."""

    #: The bearer token (read from ``token_file``, a lab file or ``--token-file``); None: no token.
    token: str | None = None

    def client(self, timeout: float = 30.0) -> AgentClient:
        """A new client of this agent."""
        return AgentClient(
            self.address,
            token=self.token,
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            timeout=timeout,
        )


class FarmSettings(EvaluationSpec):
    """A study's ``[evaluation]`` (every field of :class:`~tuneqn.controller.config.EvaluationSpec`) and what
    only a run decides."""

    #: Deadline of one unary call to an agent.
    rpc_timeout_s: float = 10.0
    #: Non-empty after ``--fresh``: agents re-measure instead of answering with stored results.
    remeasure_token: str = ""
    #: While an agent is live its ``GetInfo`` is asked again this often: devices that appear get slots
    #: (phones joining a tracker), unhealthy ones take no job, vanished ones stop taking jobs.
    info_poll_s: float = 2.0

    @classmethod
    def from_config(cls, evaluation: EvaluationSpec, **overrides: Any) -> FarmSettings:
        """Settings from a study's ``[evaluation]`` section (``overrides`` that are not None win)."""
        values = evaluation.model_dump()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass(frozen=True)
class JobPlan:
    """One evaluation: a candidate (or the FP32 model) on one device class.

    ``spec`` is complete except for what each submission adds (device name, attempt,
    remeasure token, max executions); ``id`` is derived from it and the class.
    """

    id: str
    candidate_id: str
    device: str
    model_path: Path
    dataset_path: Path
    spec: pb.JobSpec = field(compare=False)
    level: str = "full"  # "screen": a subset of the evaluation sample, no latency
    split: str = "eval"  # the split predicted: "eval" or "screen/<recipe>"
    #: What the result is compared with (stored with it): the sha256 of the prepared model the candidate
    #: was built from and of the evaluation sample (a screen's split is a subset of it); "" = unknown.
    source_sha256: str = ""
    sample_sha256: str = ""
    #: Lower goes first among a class's pending jobs (equal: in the order added); not part of the job's identity.
    priority: tuple[int, ...] = field(default=(), compare=False)


def make_job(
    candidate_id: str,
    device_class: str,
    model_path: Path,
    model_sha256: str,
    dataset_path: Path,
    dataset_sha256: str,
    input_name: str,
    runtime: dict[str, Any],
    settings: FarmSettings,
    level: str = "full",
    split: str = "eval",
    tuning_group: str = "",
    sample_sha256: str | None = None,
) -> JobPlan:
    """The job of a candidate on a device class; its id covers everything that changes the result
    (and the candidate it is for).

    A ``screen`` job predicts a subset of the evaluation sample (``dataset_path``) and
    measures no latency: the cheap first look a search takes at a candidate. Every backend
    reads its own options: ORT's disabled optimizers and threads, TVM's tuning trials (its
    tuning records are shared per ``tuning_group``, the model's FP32 sha256) and
    ``time_evaluator`` settings. The result is compared with the FP32 result of the same prepared
    model (``tuning_group``) on the same evaluation sample (``sample_sha256``, default
    ``dataset_sha256``); neither is part of the id (the spec's hashes already cover them).
    """
    screen = level == "screen"
    spec = pb.JobSpec(
        model_sha256=model_sha256,
        dataset_sha256=dataset_sha256,
        input_name=input_name,
        top_k=settings.top_k,
        chunk_size=settings.chunk_size,
        latency_warmup=0 if screen else settings.latency_warmup,
        latency_repeats=0 if screen else settings.latency_repeats,
        backend_options=pb.BackendOptions(
            ort=pb.OrtOptions(
                disabled_optimizers=list(runtime.get("ort_disabled_optimizers", [])),
                intra_op_threads=settings.intra_op_threads,
            ),
            tvm=pb.TvmOptions(
                tuning_trials=settings.tvm_tuning_trials,
                tuning_group=tuning_group,
                latency_number=settings.tvm_latency_number,
                latency_min_repeat_ms=settings.tvm_min_repeat_ms,
                latency_cooldown_ms=settings.tvm_cooldown_ms,
            ),
        ),
    )
    # The candidate id is part of the key: two candidates can have identical bytes (every layer
    # excluded under two recipes), and each must get its own job and result row.
    key = device_class.encode() + b"\0" + candidate_id.encode() + b"\0" + spec.SerializeToString(deterministic=True)
    spec.job_id = f"tq-{hashlib.sha256(key).hexdigest()[:32]}"
    return JobPlan(
        spec.job_id,
        candidate_id,
        device_class,
        Path(model_path),
        Path(dataset_path),
        spec,
        level,
        split,
        source_sha256=tuning_group,
        sample_sha256=dataset_sha256 if sample_sha256 is None else sample_sha256,
    )


def twin_key(plan: JobPlan) -> str:
    """Jobs with the same key measure the same thing: the same file on the same sample with the same options, on one
    device class, compared with the same FP32 result. Two candidates can be such twins (every searched layer in
    float under two recipes that differ only in how weights are quantized): :class:`JobBoard` runs one of them."""
    spec = pb.JobSpec()
    spec.CopyFrom(plan.spec)
    spec.ClearField("job_id")
    parts = (plan.device, plan.level, plan.source_sha256, plan.sample_sha256)
    return hashlib.sha256("\0".join(parts).encode() + b"\0" + spec.SerializeToString(deterministic=True)).hexdigest()


def result_row(plan: JobPlan, holder: str, result: pb.JobResult, backend: str = "") -> dict[str, Any]:
    """The ``results`` row of a successful job (raises ValueError on a malformed result).

    ``info`` keeps what the agent said about how it ran: the device and class, the backend,
    wall times (``seconds`` the whole job, ``inference_seconds`` the prediction pass,
    ``compile_seconds`` and ``tuning_seconds`` before it), whether latency comes from a tuned
    build (``tuned``), a compile-cache hit and the remote server that ran it (``executed_on``).
    """
    topk = decode_topk(result)
    lat = result.latency
    return {
        "job_id": plan.id,
        "candidate_id": plan.candidate_id,
        "device": plan.device,
        "agent": holder,
        "agent_id": result.agent_id,
        "num_samples": int(result.num_samples),
        "top_k": int(result.top_k),
        "topk": topk.astype("<i4").tobytes(),
        "agreement": None,
        "accuracy": None,
        "accuracy_top5": None,
        "latency_ms": lat.median_ms if lat.count else None,
        "latency": json.dumps(
            {
                "median_ms": lat.median_ms,
                "p90_ms": lat.p90_ms,
                "p10_ms": lat.p10_ms,
                "mean_ms": lat.mean_ms,
                "std_ms": lat.std_ms,
                "min_ms": lat.min_ms,
                "max_ms": lat.max_ms,
                "count": lat.count,
            }
        ),
        "size_bytes": int(result.model_size_bytes),
        "simulated": float(result.simulated_latency_ms_per_sample),
        "finished_at": float(result.finished_at) or time.time(),
        "attempt": int(result.attempt),
        "level": plan.level,
        "split": plan.split,
        "model_sha256": plan.source_sha256 or None,
        "sample_sha256": plan.sample_sha256 or None,
        "baseline_job": None,
        "info": json.dumps(
            {
                "device_name": result.device,
                "device_class": result.device_class,
                "inference_seconds": result.inference_seconds,
                "seconds": max(0.0, float(result.finished_at) - float(result.started_at))
                if result.started_at
                else None,
                "executions": result.executions,
                "runtime_versions": dict(result.runtime_versions),
                "backend": backend,
                "compile_seconds": float(result.compile_seconds),
                "tuning_seconds": float(result.tuning_seconds),
                "tuned": bool(result.tuned),
                "compile_cache_hit": bool(result.compile_cache_hit),
                "executed_on": result.executed_on,
            }
        ),
    }
