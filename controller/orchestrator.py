"""One study run, in small steps: prepare → analyze → plan (strategy) → dispatch → report.

``tuneqn tune`` is :func:`tune`. Candidates proposed by the search strategy are built in a
background thread while agents already evaluate earlier ones; each built candidate becomes
one job per device class. Device classes come from the agents as they connect (or from the
study's ``[[agents]] device_class``), so agents that come up late still get every job. The
main thread watches liveness per device class, re-leases silent agents' jobs, asks the
strategy for more work as results arrive, and rewrites ``report.json`` — no report is
written on a worker thread. Everything is in the study's SQLite store: a rerun submits only
what is missing and re-collects what was in flight.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneqn.controller import metrics
from tuneqn.controller.errors import StudyFailed
from tuneqn.controller.auth import read_token
from tuneqn.controller.config import AgentSpec
from tuneqn.controller.farm.dispatcher import AgentLink, AgentState, Endpoint, FarmSettings, JobBoard, make_job
from tuneqn.controller.farm.local import LocalAgent, QuietLock
from tuneqn.controller.report import write_full_report, write_json
from tuneqn.controller.search import SearchView, make_strategy
from tuneqn.controller.study import CandidatePlan, Study
from tuneqn.v1 import agent_pb2 as pb

log = logging.getLogger(__name__)

REMEASURE_META = "remeasure_token"


@dataclass
class TuneOutcome:
    """What a tune run did."""

    total: int
    done: int
    failed: int
    unreachable: int
    submitted_here: int
    report: dict[str, Path] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Built:
    """A built candidate (or FP32 model), ready to become jobs."""

    candidate_id: str
    model: str
    path: Path
    sha256: str
    runtime: dict[str, Any]


def remeasure_token(study: Study, fresh: bool) -> str:
    """The study's re-measure token: new on ``--fresh``, kept in the store until the next one."""
    if fresh:
        study.store.set_meta(REMEASURE_META, uuid.uuid4().hex)
    return study.store.get_meta(REMEASURE_META) or ""


class StudyRun:
    """The steps of one ``tune`` run over a prepared :class:`Study`."""

    def __init__(self, study: Study, endpoints: list[Endpoint], settings: FarmSettings,
                 on_progress: Callable[[dict[str, int], int], None] | None = None,
                 local_agent_args: list[str] | None = None) -> None:
        self.study = study
        self.store = study.store
        self.endpoints = endpoints
        self.settings = settings
        self.on_progress = on_progress
        self.local_agent_args = local_agent_args
        self.board = JobBoard(self.store, settings, on_result=self._on_result)
        self.stop = threading.Event()
        self.links: list[AgentLink] = []
        self.local: LocalAgent | None = None
        self.quiet: QuietLock | None = None
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._classes: dict[str, float] = {}  # device class -> last time a live agent served it
        self._built: list[_Built] = []
        self._builds: queue.Queue[CandidatePlan | None] = queue.Queue()
        self._building = 0
        self._build_errors: list[BaseException] = []
        self._results_changed = threading.Event()
        self._given_up: set[str] = set()  # agents that never answered within device_wait_s

    # ------------------------------------------------------------------ steps
    def run(self) -> TuneOutcome:
        """prepare → analyze → dispatch (plan as results arrive) → report."""
        self.prepare()
        self.analyze()
        try:
            self.start_farm()
            self.dispatch()
        finally:
            self.stop_farm()
        return self.report()

    def prepare(self) -> None:
        """Models and data samples."""
        self.study.prepare()

    def analyze(self) -> None:
        """Layer rankings (reused when stored), layers.json and the layer plot."""
        self.study.analyze_all()

    def start_farm(self) -> None:
        """Start the local agent when none is configured, and one link per agent."""
        if not self.endpoints:
            state_dir = self.study.out_dir / "agents" / "local"
            self.quiet = QuietLock(state_dir / "quiet.lock")
            self.local = LocalAgent(state_dir, extra_args=self.local_agent_args, quiet_lock=self.quiet.path)
            self.endpoints = [Endpoint(self.local.start())]
        now = time.monotonic()
        for ep in self.endpoints:
            if ep.device_class:
                self._register_class(ep.device_class, {"declared_by": ep.address}, now)
        self.links = [AgentLink(ep, self.board, self.stop, self._on_device) for ep in self.endpoints]
        for link in self.links:
            link.start()
        threading.Thread(target=self._builder, name="candidate-builder", daemon=True).start()

    def dispatch(self) -> None:
        """Feed the strategy's candidates to the dispatcher until it is done and every job is final."""
        strategy = make_strategy(self.study.cfg.search.strategy, SearchView(self.study))
        for model, pm in self.study.models.items():
            self._add_built(_Built(f"{model}:fp32", model, pm.path, pm.sha256, {}), fp32=True)
        started = time.monotonic()
        last_report = 0.0
        self._results_changed.set()  # a first report.json right away
        while True:
            if self._build_errors:
                raise self._build_errors[0]
            self.board.expire()
            if self._idle() and not strategy.done():
                self._enqueue(strategy.propose())
            if strategy.done() and self._idle() and not self.board.closed:
                self.board.close()
            self._watch_liveness()
            if self.on_progress is not None:
                self.on_progress(self.board.counts(), self._total())
            if self._results_changed.is_set() and time.monotonic() - last_report > 2.0:
                self._results_changed.clear()
                write_json(self.store, self.study.out_dir)
                last_report = time.monotonic()
            if self.board.finished() and not self._awaited(started):
                break
            with self.board.cond:
                self.board.cond.wait(0.5)

    def stop_farm(self) -> None:
        """Stop the links, their slots and the local agent."""
        self.stop.set()
        self._builds.put(None)
        for link in self.links:
            link.interrupt()  # cancels calls in flight (a hung agent's handshake, say)
        for link in self.links:
            link.join(timeout=15)
        if self.local is not None:
            self.local.stop()

    def report(self) -> TuneOutcome:
        """Counts, errors and the full report."""
        counts = self.board.counts()
        outcome = TuneOutcome(
            total=self._total(), done=counts.get("done", 0), failed=counts.get("failed", 0),
            unreachable=counts.get("unreachable", 0),
            submitted_here=sum(s.executed for link in self.links for s in link.slots.values()),
            errors=list(self.errors) + [f"agent {link.address} unusable: {link.error}" for link in self.links
                                        if link.state == AgentState.INCOMPATIBLE],
        )
        if self.on_progress is not None:
            self.on_progress(counts, outcome.total)
        outcome.report = write_full_report(self.store, self.study.out_dir)
        return outcome

    # ------------------------------------------------------------------ building
    def _enqueue(self, plans: list[CandidatePlan]) -> None:
        with self._lock:
            self._building += len(plans)
        for p in plans:
            self._builds.put(p)

    def _idle(self) -> bool:
        with self._lock:
            return self._building == 0

    def _builder(self) -> None:
        while True:
            plan = self._builds.get()
            if plan is None or self.stop.is_set():
                return
            try:
                if self.quiet is not None:  # the local agent times on these cores: not while we build
                    with self.quiet.shared():
                        row = self.study.build(plan)
                else:
                    row = self.study.build(plan)
                self._add_built(_Built(plan.id, plan.model, Path(row["path"]), row["sha256"], row["runtime"]))
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
                self._build_errors.append(exc)
                with self.board.cond:
                    self.board.cond.notify_all()
                return
            finally:
                with self._lock:
                    self._building -= 1

    def _add_built(self, built: _Built, fp32: bool = False) -> None:
        if fp32:
            pm = self.study.models[built.model]
            self.store.put_candidate({"id": built.candidate_id, "model": built.model, "mode": "fp32", "k": None,
                                      "kind": "fp32", "label": "fp32", "excluded": [], "settings_key": "",
                                      "build_key": pm.sha256, "path": str(built.path),
                                      "size_bytes": built.path.stat().st_size, "sha256": built.sha256,
                                      "runtime": {}})
        with self._lock:
            self._built.append(built)
            classes = list(self._classes)
        for cls in classes:
            self._add_jobs(built, cls)

    def _add_jobs(self, built: _Built, device_class: str) -> None:
        split = self.study.eval_split(built.model)
        pm = self.study.models[built.model]
        self.board.add(make_job(built.candidate_id, device_class, built.path, built.sha256, split.path,
                                split.sha256, pm.input_name, built.runtime, self.settings))

    # ------------------------------------------------------------------ devices and liveness
    def _register_class(self, device_class: str, info: dict[str, Any], now: float) -> bool:
        with self._lock:
            new = device_class not in self._classes
            self._classes[device_class] = now
            built = list(self._built) if new else []
        if new or info.get("backend"):
            self.store.put_device(device_class, device_class, info)
        for b in built:
            self._add_jobs(b, device_class)
        return new

    def _on_device(self, link: AgentLink, device: pb.Device) -> None:
        info = {"backend": device.backend, "cpu": device.cpu, "gpu": device.gpu,
                "hostname": link.info.hostname if link.info else "", "agent": link.address,
                "runtime_versions": dict(device.runtime_versions), "simulated": device.simulated,
                "simulated_latency_ms_per_sample": device.simulated_latency_ms_per_sample}
        if self._register_class(device.device_class, info, time.monotonic()):
            log.info("device class %s: first served by %s (%s)", device.device_class, link.address, device.name)

    def _watch_liveness(self) -> None:
        """A class without a live agent for ``device_wait_s`` ends its jobs as unreachable."""
        now = time.monotonic()
        if self.links and all(link.state == AgentState.INCOMPATIBLE for link in self.links):
            reasons = "; ".join(f"{link.address}: {link.error}" for link in self.links)
            raise StudyFailed(f"no usable agent ({reasons})")
        with self._lock:
            classes = dict(self._classes)
        for cls, last in classes.items():
            if any(link.live.is_set() and cls in link.device_classes() for link in self.links):
                with self._lock:
                    self._classes[cls] = now
                continue
            if now - last > self.settings.device_wait_s and self.board.unfinished(cls):
                n = self.board.give_up(cls, f"no agent of device class {cls} was reachable for "
                                            f"{self.settings.device_wait_s:.0f}s")
                msg = f"device class {cls}: no live agent for {self.settings.device_wait_s:.0f}s; {n} jobs unreachable"
                log.error(msg)
                self.errors.append(msg)

    def _awaited(self, started: float) -> bool:
        """Whether some configured agent never answered yet and may still bring a new device class."""
        waiting = False
        for link in self.links:
            if link.ever_connected or link.state == AgentState.INCOMPATIBLE or link.address in self._given_up:
                continue
            if time.monotonic() - started > self.settings.device_wait_s:
                self._given_up.add(link.address)
                self.errors.append(f"agent {link.address} never answered within {self.settings.device_wait_s:.0f}s"
                                   + (f" ({link.error})" if link.error else ""))
                continue
            waiting = True
        return waiting

    def _total(self) -> int:
        with self._lock:
            return len(self._built) * max(len(self._classes), 1)

    def _on_result(self, job_id: str) -> None:
        metrics.on_result(self.store, job_id)
        self._results_changed.set()


def tune(study: Study, endpoints: list[Endpoint], settings: FarmSettings,
         on_progress: Callable[[dict[str, int], int], None] | None = None,
         local_agent_args: list[str] | None = None) -> TuneOutcome:
    """Run the whole study on the agents (a local one when none is given); problems are in ``errors``."""
    return StudyRun(study, endpoints, settings, on_progress=on_progress, local_agent_args=local_agent_args).run()


def endpoints_from(agents: list[AgentSpec], addresses: list[str], token_file: Path | None) -> list[Endpoint]:
    """Agents from the command line (they replace the study's) or the study's ``[[agents]]``."""
    tok = read_token(token_file, "--token-file")
    if addresses:
        return [Endpoint(a, token=tok) for a in addresses]
    return [Endpoint(a.address, token=read_token(a.token_file, f"agents[{i}].token_file") if a.token_file else tok,
                     tls_ca=a.tls_ca, tls_cert=a.tls_cert, tls_key=a.tls_key, device_class=a.device_class)
            for i, a in enumerate(agents)]
