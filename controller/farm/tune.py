"""``tuneqn tune``: analyze → candidates → jobs on agents → results → report.

Candidates are built in a producer thread while agents already evaluate earlier ones,
so building overlaps with evaluation. Every transition is in the study's SQLite store;
a rerun submits only what is missing and re-collects what was in flight.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tuneqn.controller.errors import StudyFailed, UserError
from tuneqn.controller.farm.dispatcher import AgentState, Endpoint, EvalSettings, JobBoard, JobPlan, Worker, job_id
from tuneqn.controller.farm.local import LocalAgent
from tuneqn.controller.report.build import write_full_report, write_json_only
from tuneqn.controller.study import Study

log = logging.getLogger(__name__)


@dataclass
class TuneOutcome:
    """What a tune run did."""

    total: int
    done: int
    failed: int
    submitted_here: int
    report: dict[str, Path] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _connect_all(workers: list[Worker], wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    pending = list(workers)
    while pending and time.monotonic() < deadline:
        pending = [w for w in pending if not w.connect() and w.state != AgentState.INCOMPATIBLE]
        if pending:
            time.sleep(0.2)  # reconnect backoff while agents start


def tune(
    study: Study,
    endpoints: list[Endpoint],
    settings: EvalSettings,
    on_progress: Callable[[dict[str, int], int], None] | None = None,
    agent_wait_s: float = 600.0,
    local_agent_args: list[str] | None = None,
) -> TuneOutcome:
    """Run the whole study; returns counts and the report paths."""
    study.prepare()
    study.analyze_all()
    local: LocalAgent | None = None
    if not endpoints:
        local = LocalAgent(study.out_dir / "agents" / "local", extra_args=local_agent_args)
        endpoints = [Endpoint(local.start())]
    stop = threading.Event()
    store = study.store
    out_dir = study.out_dir
    last_json = [0.0]

    def changed(jid: str, state: str) -> None:
        if state == "done" and time.monotonic() - last_json[0] > 0.5:
            last_json[0] = time.monotonic()
            write_json_only(store, out_dir)

    board = JobBoard(store, settings, on_change=changed)
    workers = [Worker(ep, board, stop) for ep in endpoints]
    try:
        _connect_all(workers, wait_s=min(agent_wait_s, 60.0))
        bad = [w for w in workers if w.state == AgentState.INCOMPATIBLE]
        for w in bad:
            log.error("agent %s unusable: %s", w.endpoint.address, w.error)
        alive = [w for w in workers if w.state == AgentState.READY]
        if not alive:
            reasons = "; ".join(f"{w.endpoint.address}: {w.error}" for w in workers)
            raise StudyFailed(f"no agent reachable ({reasons})")
        devices: dict[str, Worker] = {}
        for w in alive:
            devices.setdefault(w.device, w)
        for name, w in devices.items():
            info = w.info.devices[0] if w.info else None
            store.db["devices"].upsert({
                "name": name, "device_class": info.device_class if info else name,
                "info": json.dumps({"backend": info.backend, "cpu": info.cpu, "gpu": info.gpu,
                                    "hostname": w.info.hostname if w.info else "",
                                    "runtime_versions": dict(info.runtime_versions),
                                    "simulated": info.simulated,
                                    "simulated_latency_ms_per_sample": info.simulated_latency_ms_per_sample}
                                   if info else {}),
                "updated_at": time.time()}, pk="name")
        for w in workers:
            if w.state != AgentState.INCOMPATIBLE:
                w.start()
        plans = study.all_plans()
        total = (len(plans) + len(study.models)) * len(devices)

        producer_errors: list[BaseException] = []

        def produce() -> None:
            try:
                for name, pm in study.models.items():
                    split = study.eval_split(name)
                    cid = f"{name}:fp32"
                    store.put_candidate({"id": cid, "model": name, "mode": "fp32", "k": None, "kind": "fp32",
                                         "label": "fp32", "excluded": [], "settings_key": "", "path": str(pm.path),
                                         "size_bytes": pm.path.stat().st_size, "sha256": pm.sha256, "runtime": {}})
                    for dev in devices:
                        board.add(JobPlan(job_id(pm.sha256, split.sha256, dev, settings), cid, dev, pm.path,
                                          pm.sha256, split.path, split.sha256, pm.input_name))
                for plan in plans:
                    row = study.build(plan)
                    split = study.eval_split(plan.model)
                    pm = study.models[plan.model]
                    for dev in devices:
                        board.add(JobPlan(job_id(row["sha256"], split.sha256, dev, settings), plan.id, dev,
                                          Path(row["path"]), row["sha256"], split.path, split.sha256, pm.input_name,
                                          tuple(row["runtime"].get("ort_disabled_optimizers", []))))
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which re-raises it
                producer_errors.append(exc)
            finally:
                board.close()

        producer = threading.Thread(target=produce, name="candidate-builder", daemon=True)
        producer.start()
        unreachable_since: float | None = None
        while not board.finished():
            counts = board.counts()
            if on_progress is not None:
                on_progress(counts, total)
            live = [w for w in workers if w.state in (AgentState.READY, AgentState.BUSY, AgentState.CONNECTING)]
            if not live:
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > agent_wait_s:
                    raise StudyFailed(f"no agent reachable for {agent_wait_s:.0f}s; results so far are stored, "
                                      "rerun to resume")
            else:
                unreachable_since = None
            if producer_errors:
                raise producer_errors[0]
            with board.cond:
                board.cond.wait(0.5)
        producer.join()
        if producer_errors:
            raise producer_errors[0]
        counts = board.counts()
        if on_progress is not None:
            on_progress(counts, total)
        outcome = TuneOutcome(total=total, done=counts.get("done", 0), failed=counts.get("failed", 0),
                              submitted_here=sum(w.executed for w in workers))
    finally:
        stop.set()
        for w in workers:
            if w.is_alive():
                w.join(timeout=10)
        if local is not None:
            local.stop()
    outcome.report = write_full_report(store, out_dir)
    return outcome


def endpoints_from(study: Study, addresses: list[str], token_file: Path | None) -> list[Endpoint]:
    """Agents from the command line (override) or the study config."""
    def read_token(path: Path | None) -> str | None:
        if path is None:
            return None
        try:
            return path.read_text().strip() or None
        except OSError as exc:
            raise UserError(f"token file {path}: {exc.strerror}") from None

    if addresses:
        tok = read_token(token_file)
        return [Endpoint(a, token=tok) for a in addresses]
    return [Endpoint(a.address, token=read_token(a.token_file or token_file), tls_ca=a.tls_ca, tls_cert=a.tls_cert,
                     tls_key=a.tls_key) for a in study.cfg.agents]
