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
from tuneqn.controller.errors import StudyFailed, UserError
from tuneqn.controller.feasibility import (ADAPTED, FEASIBLE, GAVE_UP, describe, model_op_types, next_recipe,
                                           ops_digest, unsupported)
from tuneqn.controller.auth import read_token
from tuneqn.controller.config import AgentSpec
from tuneqn.controller.farm.dispatcher import AgentLink, AgentState, Endpoint, FarmSettings, JobBoard, make_job
from tuneqn.controller.farm.local import LocalAgent, QuietLock
from tuneqn.controller.report import write_full_report, write_json
from tuneqn.controller.metrics import baseline_id
from tuneqn.controller.report.base import FINAL_JOB_STATES
from tuneqn.controller.search import Outcome, Request, SearchView, make_strategy
from tuneqn.controller.search import gate
from tuneqn.controller.dataset import Split
from tuneqn.controller.study import CandidatePlan, Study
from tuneqn.v1 import agent_pb2 as pb

log = logging.getLogger(__name__)

REMEASURE_META = "remeasure_token"
CONCURRENCY_META = "search_concurrency"


@dataclass
class TuneOutcome:
    """What a tune run did."""

    total: int
    done: int
    failed: int
    unreachable: int
    submitted_here: int
    infeasible: int = 0
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
    size_bytes: int = 0
    recipe: str = "fp32"


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
        self.board = JobBoard(self.store, settings, on_result=self._on_result, on_final=self._on_final)
        self.stop = threading.Event()
        self.links: list[AgentLink] = []
        self.local: LocalAgent | None = None
        self.quiet: QuietLock | None = None
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._classes: dict[str, float] = {}  # device class -> last time a live agent served it
        self._built: dict[str, _Built] = {}  # candidate id -> built candidate
        self._levels: dict[str, set[str]] = {}  # candidate id -> levels asked for ("screen", "full")
        self._queued: set[str] = set()  # candidate ids handed to the builder
        self._job_ids: dict[tuple[str, str, str], str] = {}  # (candidate, device class, level) -> job id
        self._outcomes: dict[tuple[str, str, tuple[str, ...]], Outcome] = {}  # complete outcomes
        self._builds: queue.Queue[CandidatePlan | None] = queue.Queue()
        self._building = 0
        self._build_errors: list[BaseException] = []
        self._results_changed = threading.Event()
        self._changed = threading.Event()  # a result or a build arrived: ask the strategies again
        self._concurrency = 1
        self._builder_thread: threading.Thread | None = None
        self._asked: set[tuple[str, str, str]] = set()  # (search, candidate id, level) recorded
        self._screen_recipes: set[tuple[str, str]] = set()  # (model, recipe) with screens asked for
        self._screens: dict[tuple[str, str], Split] = {}  # their screening samples, once chosen
        self._given_up: set[str] = set()  # agents that never answered within device_wait_s
        # Feasibility planning (``[evaluation] feasibility``; see controller/feasibility.py).
        self.feasibility = study.cfg.evaluation.feasibility
        self._class_ops: dict[str, frozenset[str] | None] = {}  # supported op types (None: not known yet)
        self._planned: dict[tuple[str, str, str], str] = {}  # (model, recipe, class) -> recipe that runs there
        self._tried: dict[tuple[str, str, str], list[dict[str, Any]]] = {}  # recipes checked so far
        self._trying: dict[tuple[str, str, str], str] = {}  # the recipe whose fully quantized model is checked next
        self._variant_base: dict[tuple[str, str], str] = {}  # (model, variant recipe) -> its base recipe
        self._op_types: dict[str, frozenset[str]] = {}  # built candidate id -> its op types
        self._probes: set[str] = set()  # fully quantized candidates of variants, built to check them
        self._probe_errors: dict[str, str] = {}  # ... and why one did not build
        # The recipe gate (``recipes = "auto"``; see controller/search/gate.py).
        self._gated: dict[tuple[str, tuple[str, ...]], list[gate.Decision]] = {}  # (model, classes) -> decided
        self._analyzed: set[tuple[str, str]] = set()  # (model, recipe) the gate passed and that were analyzed

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
        wanted = set(self.settings.device_classes)
        if wanted:
            skipped = [ep for ep in self.endpoints if ep.device_class and ep.device_class not in wanted]
            for ep in skipped:
                log.info("agent %s (class %s) not used: the study measures on %s", ep.address, ep.device_class,
                         ", ".join(sorted(wanted)))
            self.endpoints = [ep for ep in self.endpoints if ep not in skipped]
            for cls in sorted(wanted):  # planned from the start: a class no agent serves ends as unreachable
                self._register_class(cls, {"declared_by": "evaluation.device_classes"}, now)
        for ep in self.endpoints:
            if ep.device_class:
                self._register_class(ep.device_class, {"declared_by": ep.address}, now)
        self.links = [AgentLink(ep, self.board, self.stop, self._on_device) for ep in self.endpoints]
        for link in self.links:
            link.start()
        self._builder_thread = threading.Thread(target=self._builder, name="candidate-builder", daemon=True)
        self._builder_thread.start()

    def dispatch(self) -> None:
        """Feed the searches' requests to the builder and the dispatcher until every search is done
        and every job is final; the strategies are asked again whenever a result or a build arrives."""
        stored = self.store.get_meta(CONCURRENCY_META)
        self._concurrency = int(stored) if stored and stored.isdigit() else max(1, len(self.endpoints))
        self.store.set_meta(CONCURRENCY_META, str(self._concurrency))
        view = SearchView(self.study, self)
        strategies = [make_strategy(run, view) for run in self.study.cfg.search.runs()]
        for st in strategies:
            self.store.put_search(st.name, st.run.model_dump(mode="json"))
        for model, pm in self.study.models.items():
            self._add_built(_Built(baseline_id(model), model, pm.path, pm.sha256, {}, pm.path.stat().st_size),
                            fp32=True)
            self._want(baseline_id(model), "full", model, "fp32")
        started = time.monotonic()
        last_report = 0.0
        self._results_changed.set()  # a first report.json right away
        self._changed.set()
        while True:
            if self._build_errors:
                raise self._build_errors[0]
            self.board.expire()
            if self._changed.is_set():
                self._changed.clear()
                self._plan_feasibility()
                self._gate_requests()
                self._screen_splits_ready()
                for st in strategies:
                    if not st.done():
                        self._request(st.name, st.propose())
                    if st.done():
                        self.store.finish_search(st.name)
            searching = not all(st.done() for st in strategies)
            if not searching and self._idle() and not self.board.closed:
                self.board.close()
            self._watch_liveness()
            if self.on_progress is not None:
                self.on_progress(self.board.counts(), self._total())
            if self._results_changed.is_set() and time.monotonic() - last_report > 2.0:
                self._results_changed.clear()
                write_json(self.store, self.study.out_dir)
                last_report = time.monotonic()
            if (self.board.finished() and not searching and self._idle() and not self._awaited(started)
                    and not self._deciding()):
                break
            with self.board.cond:
                if not self._changed.is_set():
                    self.board.cond.wait(0.5)

    def stop_farm(self) -> None:
        """Stop the links, their slots and the local agent."""
        self.stop.set()
        self._builds.put(None)
        for link in self.links:
            link.interrupt()  # cancels calls in flight (a hung agent's handshake, say)
        for link in self.links:
            link.join(timeout=15)
        if self._builder_thread is not None:
            self._builder_thread.join()  # it finishes the build in hand (the store must outlive it)
        if self.local is not None:
            self.local.stop()

    def report(self) -> TuneOutcome:
        """Counts, errors and the full report."""
        counts = self.board.counts()
        outcome = TuneOutcome(
            total=self._total(), done=counts.get("done", 0), failed=counts.get("failed", 0),
            unreachable=counts.get("unreachable", 0), infeasible=counts.get("infeasible", 0),
            submitted_here=sum(s.executed for link in self.links for s in link.slots.values()),
            errors=list(self.errors) + [f"agent {link.address} unusable: {link.error}" for link in self.links
                                        if link.state == AgentState.INCOMPATIBLE],
        )
        if self.on_progress is not None:
            self.on_progress(counts, outcome.total)
        outcome.report = write_full_report(self.store, self.study.out_dir)
        return outcome

    # ------------------------------------------------------------------ requests and building
    def _request(self, search: str, requests: list[Request]) -> None:
        """Record a search's requests; build what is not built; add the jobs of what is."""
        for req in requests:
            plan = req.plan
            if (search, plan.id, req.level) in self._asked:
                continue  # strategies hand back everything they asked for so far
            self._asked.add((search, plan.id, req.level))
            self.store.put_proposal(search, plan.id, req.level, plan.model, plan.mode, req.label or plan.label)
            if req.level == "screen":  # screens are chosen from the fully quantized model's full results
                fq = self.study.make_plan(plan.model, plan.mode, ())
                self._request(search, [Request(fq, "full", fq.label)])
            if req.level != "build":
                self._want(plan.id, req.level, plan.model, plan.mode)
            self._ensure_built(plan)

    def _ensure_built(self, plan: CandidatePlan) -> None:
        """Hand a candidate to the builder unless it was (it then becomes jobs at the levels wanted)."""
        with self._lock:
            queued = plan.id in self._queued
            if not queued:
                self._queued.add(plan.id)
                self._building += 1
        if not queued:
            self._builds.put(plan)

    def _want(self, cid: str, level: str, model: str, recipe: str) -> None:
        """Evaluate candidate ``cid`` at ``level`` on every device class (once it is built).

        Screens of a recipe wait for its fully quantized model's full results: the screening
        sample is chosen from them (:meth:`Study.screen_split`; :meth:`_request` asks for it).
        """
        with self._lock:
            new = level not in self._levels.setdefault(cid, set())
            self._levels[cid].add(level)
            built = self._built.get(cid)
            classes = list(self._classes)
        if level == "screen":
            self._screen_recipes.add((model, recipe))
        if new and built is not None:
            for cls in classes:
                self._add_jobs(built, cls, level)

    def _screen_splits_ready(self) -> None:
        """Choose the screening sample of every recipe whose fully quantized model is measured; add its screens."""
        for model, recipe in sorted(self._screen_recipes):
            if (model, recipe) in self._screens:
                continue
            fq = self.study.make_plan(model, recipe, ())
            if self.view_outcome(fq, "full") is None:
                continue
            fq_topk, fp32_topk = [], []
            for cls in self._classes_of(model, recipe):
                fq_row = self.store.result(self._job_ids[(fq.id, cls, "full")])
                fp32_row = self.store.result(self._job_ids.get((baseline_id(model), cls, "full"), ""))
                if fq_row is None or fp32_row is None:
                    continue  # failed on that class: choose from the others
                fq_topk.append(metrics.topk_of(fq_row))
                fp32_topk.append(metrics.topk_of(fp32_row))
            if not fq_topk:
                continue
            self._screens[(model, recipe)] = self.study.screen_split(model, recipe, fq_topk, fp32_topk)
            with self._lock:
                todo = [(b, list(self._classes)) for cid, b in self._built.items()
                        if b.model == model and b.recipe == recipe and "screen" in self._levels.get(cid, ())]
            # (_add_jobs adds them only on the classes the recipe is planned on)
            for b, classes in todo:
                for cls in classes:
                    self._add_jobs(b, cls, "screen")

    # ------------------------------------------------------------------ the recipe gate (recipes = "auto")
    def _gate_requests(self) -> None:
        """With auto recipes: every recipe's fully quantized model (or the variant planned instead on a
        device class) is evaluated in full everywhere it runs, before the gate decides."""
        if not self.study.auto:
            return
        with self._lock:
            variants = sorted({(m, v) for (m, _, _), v in self._planned.items()} | set(self._variant_base))
        fqs = [(m, r) for m in self.study.models for r in self.study.recipes(m)] + variants
        for model, recipe in fqs:
            fq = self.study.make_plan(model, recipe, ())
            self._want(fq.id, "full", model, recipe)
            self._ensure_built(fq)

    def gate_decisions(self, model: str) -> list[gate.Decision] | None:
        """The gate's decisions for a model's auto recipes (None without auto); see :mod:`..search.gate`.

        A pure function of the stored results (the report takes the same ones): the decisions of a
        model are kept once none is pending on the current device classes."""
        if not self.study.auto:
            return None
        classes = tuple(self.view_devices())
        key = (model, classes)
        if key in self._gated:
            return self._gated[key]
        out = gate.decisions(self.store, model, self.study.recipes(model), classes)
        if all(d.status != gate.PENDING for d in out):
            self._gated[key] = out
            for d in out:
                log.info("recipe gate: %s/%s %s (%s)", model, d.recipe, d.status, d.reason)
        return out

    def _searched(self, model: str, recipe: str) -> bool:
        """Whether (model, recipe) is searched: always with explicit recipes, else when the gate passed it
        (analyzed then, before its search starts)."""
        decisions = self.gate_decisions(model)
        if decisions is None:
            return True
        if not any(d.recipe == recipe and d.status == gate.SEARCHED for d in decisions):
            return False
        if (model, recipe) not in self._analyzed:
            if self.quiet is not None:
                with self.quiet.shared():
                    self.study.analyze(model, recipe)
            else:
                self.study.analyze(model, recipe)
            self._analyzed.add((model, recipe))
            self.study.write_layer_outputs(self.study.analyzed_rows())
        return True

    def view_pairs_settled(self) -> bool:
        """False while the gate has not decided (some model's auto recipes are pending): more pairs may come."""
        return all(d.status != gate.PENDING for m in self.study.models for d in (self.gate_decisions(m) or []))

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
                self._add_built(_Built(plan.id, plan.model, Path(row["path"]), row["sha256"], row["runtime"],
                                       int(row["size_bytes"]), plan.mode))
            except Exception as exc:  # noqa: BLE001 - a variant checked for a device may not build: give it up
                if plan.id not in self._probes:
                    self._build_errors.append(exc)  # handed to the main thread, which raises it
                    with self.board.cond:
                        self.board.cond.notify_all()
                    return
                log.warning("variant %s does not build: %s", plan.mode, exc)
                self._probe_errors[plan.id] = f"{type(exc).__name__}: {exc}"
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
                self._build_errors.append(exc)
                with self.board.cond:
                    self.board.cond.notify_all()
                return
            finally:
                with self._lock:
                    self._building -= 1
                self._changed.set()
                with self.board.cond:
                    self.board.cond.notify_all()

    def _add_built(self, built: _Built, fp32: bool = False) -> None:
        if fp32:
            pm = self.study.models[built.model]
            self.store.put_candidate({"id": built.candidate_id, "model": built.model, "mode": "fp32", "k": None,
                                      "kind": "fp32", "label": "fp32", "excluded": [], "settings_key": "",
                                      "build_key": pm.sha256, "path": str(built.path),
                                      "size_bytes": built.size_bytes, "sha256": built.sha256,
                                      "runtime": {}})
        with self._lock:
            self._built[built.candidate_id] = built
            classes = list(self._classes)
            levels = sorted(self._levels.get(built.candidate_id, ()))
        for cls in classes:
            for level in levels:
                self._add_jobs(built, cls, level)

    def _add_jobs(self, built: _Built, device_class: str, level: str) -> None:
        if not self._planned_on(built.model, built.recipe, device_class):
            return  # another recipe runs there, or not decided yet (added by _settle)
        if level == "screen":
            split = self._screens.get((built.model, built.recipe))
            if split is None:
                return  # added once the recipe's screening sample is chosen
        else:
            split = self.study.eval_split(built.model)
        pm = self.study.models[built.model]
        plan = make_job(built.candidate_id, device_class, built.path, built.sha256, split.path, split.sha256,
                        pm.input_name, built.runtime, self.settings, level, split.name, tuning_group=pm.sha256,
                        sample_sha256=self.study.eval_split(built.model).sha256)
        with self._lock:
            self._job_ids[(built.candidate_id, device_class, level)] = plan.id
        self.board.add(plan)

    # ------------------------------------------------------------------ feasibility planning
    def _planned_on(self, model: str, recipe: str, device_class: str) -> bool:
        """Whether candidates of (model, recipe) run on a device class (False while that is undecided)."""
        if recipe == "fp32":
            return True
        with self._lock:
            base = self._variant_base.get((model, recipe))
            if base is not None:
                return self._planned.get((model, base, device_class)) == recipe
            if self.feasibility != "adapt":
                return True
            ops = self._class_ops.get(device_class)
            if ops is None:
                return False  # its devices have not said what they run yet
            return not ops or self._planned.get((model, recipe, device_class)) == recipe

    def _classes_of(self, model: str, recipe: str) -> list[str]:
        """The device classes a recipe's results come from: where it is planned, or may still be (undecided)."""
        with self._lock:
            classes = sorted(self._classes)
            if recipe == "fp32":
                return classes
            base = self._variant_base.get((model, recipe))
            if base is not None:
                return [c for c in classes if self._planned.get((model, base, c)) == recipe]
            return [c for c in classes if self._planned.get((model, recipe, c), recipe) == recipe]

    def _restricted(self) -> list[tuple[str, frozenset[str]]]:
        with self._lock:
            return [(c, ops) for c, ops in sorted(self._class_ops.items()) if ops]

    def _deciding(self) -> bool:
        """Some (model, recipe) of a restricted device class is not planned yet."""
        if self.feasibility != "adapt":
            return False
        return any((m, r, c) not in self._planned for c, _ in self._restricted()
                   for m in self.study.models for r in self.study.recipes(m))

    def _plan_feasibility(self) -> None:
        """``feasibility = "adapt"``: decide, for every restricted device class, which recipe runs there
        instead of each study recipe (building fully quantized candidates to check, as needed)."""
        if self.feasibility != "adapt":
            return
        for cls, ops in self._restricted():
            for model in self.study.models:
                for recipe in self.study.recipes(model):
                    if (model, recipe, cls) not in self._planned:
                        self._decide((model, recipe, cls), ops)

    def _decide(self, key: tuple[str, str, str], ops: frozenset[str]) -> None:
        model, recipe, cls = key
        digest = ops_digest(ops)
        if key not in self._tried:
            stored = self.store.feasibility(model, recipe, cls)
            if stored and stored[0]["ops_digest"] == digest:  # decided before on the same op types
                row = stored[0]
                self._settle(key, row["planned"], row["status"], row["unsupported"], row["tried"], digest,
                             persist=False)
                return
        tried = self._tried.setdefault(key, [])
        while True:
            current = self._trying.setdefault(key, recipe)
            fq = self.study.make_plan(model, current, ())
            with self._lock:
                built = self._built.get(fq.id)
            if built is None and fq.id in self._probe_errors:
                tried.append({"recipe": current, "unsupported": [], "error": self._probe_errors[fq.id]})
                self._settle(key, recipe, GAVE_UP, tried[0]["unsupported"], tried, digest)
                return
            if built is None:
                if current != recipe:
                    self._probes.add(fq.id)
                self._ensure_built(fq)  # checked when it is built
                return
            bad = unsupported(self._ops_of(built), ops)
            tried.append({"recipe": current, "unsupported": bad})
            first = tried[0]["unsupported"]
            if not bad:
                self._settle(key, current, FEASIBLE if current == recipe else ADAPTED, first, tried, digest)
                return
            nxt = next_recipe(self.study.cfg.quantization, current, bad, ops, built.path,
                              self.study.models[model].path)
            if nxt is None or any(t["recipe"] == nxt for t in tried):
                self._settle(key, recipe, GAVE_UP, first, tried, digest)
                return
            self._trying[key] = nxt

    def _ops_of(self, built: _Built) -> frozenset[str]:
        ops = self._op_types.get(built.candidate_id)
        if ops is None:
            ops = self._op_types[built.candidate_id] = model_op_types(built.path)
        return ops

    def _settle(self, key: tuple[str, str, str], planned: str, status: str, unsupported_ops: list[str],
                tried: list[dict[str, Any]], digest: str, persist: bool = True) -> None:
        """Plan ``planned`` for (model, recipe) on the class; add the jobs that were held for it."""
        model, recipe, cls = key
        if planned != recipe:
            # The variant's layers are ranked before its search starts (it was calibrated by its build).
            if self.quiet is not None:
                with self.quiet.shared():
                    self.study.analyze(model, planned)
            else:
                self.study.analyze(model, planned)
        with self._lock:
            self._planned[key] = planned
            if planned != recipe:
                self._variant_base[(model, planned)] = recipe
            todo = [(b, sorted(self._levels.get(cid, ()))) for cid, b in self._built.items()
                    if b.model == model and b.recipe == planned]
        if persist:
            self.store.put_feasibility(model, recipe, cls, planned, status, unsupported_ops, tried, digest)
        line = describe(cls, recipe, planned, status, unsupported_ops, tried)
        (log.warning if status == GAVE_UP else log.info)("feasibility: %s", line)
        for b, levels in todo:
            for level in levels:
                self._add_jobs(b, cls, level)
        self._changed.set()

    # ------------------------------------------------------------------ what the strategies see (ViewSource)
    def view_devices(self) -> list[str]:
        """Device classes so far."""
        with self._lock:
            return sorted(self._classes)

    def view_concurrency(self) -> int:
        """How many evaluations the strategies keep in flight: one per configured agent, fixed when the
        study first searched (kept in the store), so a resumed search decides exactly as before."""
        return self._concurrency

    def view_size(self, plan: CandidatePlan) -> int | None:
        """Size of a built candidate."""
        with self._lock:
            built = self._built.get(plan.id)
        return built.size_bytes if built is not None else None

    def view_pairs(self) -> list[tuple[str, str]]:
        """The (model, recipe) pairs to search: the study's recipes where they run (or may still run),
        each followed by the variants planned for devices that cannot run it."""
        out = []
        with self._lock:
            any_class = bool(self._classes)
            variants = sorted(self._variant_base.items())
        for model in self.study.models:
            for recipe in self.study.recipes(model):
                if not self._searched(model, recipe):
                    continue  # the recipe gate stopped it (or has not decided yet)
                if not any_class or self._classes_of(model, recipe):
                    out.append((model, recipe))
                out += [(m, v) for (m, v), base in variants if m == model and base == recipe]
        return out

    def view_outcome(self, plan: CandidatePlan, level: str) -> Outcome | None:
        """A candidate's results at a level on every device class its recipe runs on; None while any is
        unfinished (or while it is undecided whether the recipe runs on a class)."""
        with self._lock:
            built = self._built.get(plan.id)
        if built is None:
            return None
        classes = tuple(self._classes_of(built.model, built.recipe))
        with self._lock:
            jobs = [self._job_ids.get((plan.id, cls, level)) for cls in classes]
        if not classes or None in jobs:
            return None
        key = (plan.id, level, classes)
        if key in self._outcomes:
            return self._outcomes[key]
        per_device: dict[str, dict[str, float | None]] = {}
        wrong: dict[str, tuple[int, ...]] = {}
        failed: list[str] = []
        for cls, jid in zip(classes, jobs, strict=True):
            row = self.store.job(str(jid))
            if row is None or row["state"] not in FINAL_JOB_STATES:
                return None
            result = self.store.result(str(jid)) if row["state"] == "done" else None
            if result is None:
                failed.append(cls)
                per_device[cls] = {}
                continue
            if result["agreement"] is None:
                if not self._reference_lost(built.model, cls, level):
                    return None  # its FP32 reference is not in yet
                failed.append(cls)  # FP32 failed there for good: nothing to compare with on this class
                per_device[cls] = {}
                continue
            per_device[cls] = {"agreement": result["agreement"], "accuracy": result["accuracy"],
                               "accuracy_top5": result["accuracy_top5"], "latency_ms": result["latency_ms"],
                               "overlap": metrics.overlap_of(self.store, result)}
            wrong[cls] = metrics.disagreeing_of(self.store, result)
        out = Outcome(plan.id, built.size_bytes, per_device, tuple(failed), wrong,
                      self.study.eval_split(built.model).size if level == "screen" else 0)
        self._outcomes[key] = out
        return out

    def _reference_lost(self, model: str, device_class: str, level: str) -> bool:
        """Whether the FP32 reference of ``model`` on a class ended without a result (failed, unreachable,
        infeasible): its candidates' agreement there can never be computed."""
        with self._lock:
            ids = {self._job_ids.get((baseline_id(model), device_class, lv)) for lv in (level, "full")}
        for jid in ids - {None}:
            row = self.store.job(str(jid))
            if row is not None and row["state"] in FINAL_JOB_STATES and row["state"] != "done":
                return True
        return False

    # ------------------------------------------------------------------ devices and liveness
    def _register_class(self, device_class: str, info: dict[str, Any], now: float,
                        supported: frozenset[str] | None = None) -> bool:
        """A device class appears (declared, or a device of it connected with ``supported`` op types:
        empty = no known restriction); it gets every job built so far that may run there."""
        with self._lock:
            new = device_class not in self._classes
            self._classes[device_class] = now
            known = self._class_ops.get(device_class)
            if supported is not None:
                # Devices of one class are interchangeable: the class runs what all of its restricted ones run.
                ops = known & supported if known and supported else (known or supported)
                self._class_ops[device_class] = ops
                if known is not None and ops != known:
                    log.warning("device class %s: devices differ in supported op types; planning kept", device_class)
            else:
                self._class_ops.setdefault(device_class, None)
            first_ops = known is None and supported is not None
            todo = [(b, sorted(self._levels.get(cid, ()))) for cid, b in self._built.items()] if new or first_ops else []
        if new or info.get("backend"):
            self.store.put_device(device_class, device_class, info)
        for b, levels in todo:
            for level in levels:
                self._add_jobs(b, device_class, level)
        if new or first_ops:
            self._changed.set()
        return new

    def _on_device(self, link: AgentLink, device: pb.Device) -> None:
        if self.settings.device_classes and device.device_class not in self.settings.device_classes:
            return  # the study does not measure on this class: no jobs are planned for it
        versions = dict(device.runtime_versions)
        info = {"backend": device.backend, "cpu": device.cpu, "gpu": device.gpu,
                "hostname": link.info.hostname if link.info else "", "agent": link.address,
                "runtime_versions": versions, "simulated": device.simulated,
                "simulated_latency_ms_per_sample": device.simulated_latency_ms_per_sample,
                "device_name": device.name, "target": device.target, "rpc_key": device.rpc_key,
                "remote": device.remote, "remote_servers": device.remote_servers,
                "tvm_version": versions.get("tvm", ""), "supported_ops": len(device.supported_ops),
                "capabilities": list(device.capabilities)}
        if self._register_class(device.device_class, info, time.monotonic(), frozenset(device.supported_ops)):
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
            if any(link.live.is_set() and cls in link.device_classes(available=True) for link in self.links):
                with self._lock:
                    self._classes[cls] = now
                continue
            if now - last > self.settings.device_wait_s:
                self._release_unknown(cls)
            if now - last > self.settings.device_wait_s and self.board.unfinished(cls):
                n = self.board.give_up(cls, f"no agent of device class {cls} was reachable for "
                                            f"{self.settings.device_wait_s:.0f}s")
                msg = f"device class {cls}: no live agent for {self.settings.device_wait_s:.0f}s; {n} jobs unreachable"
                log.error(msg)
                self.errors.append(msg)
                self._changed.set()

    def _release_unknown(self, device_class: str) -> None:
        """A declared class no device of which ever connected: its held jobs are added (to end unreachable)."""
        with self._lock:
            if device_class not in self._class_ops or self._class_ops[device_class] is not None:
                return
            self._class_ops[device_class] = frozenset()
            todo = [(b, sorted(self._levels.get(cid, ()))) for cid, b in self._built.items()]
        for b, levels in todo:
            for level in levels:
                self._add_jobs(b, device_class, level)

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
            return len(self._job_ids)

    def _on_result(self, job_id: str) -> None:
        metrics.on_result(self.store, job_id)
        self._results_changed.set()
        self._changed.set()

    def _on_final(self, job_id: str) -> None:
        """A job ended without a result (failed for good, infeasible): the searches may go on."""
        self._results_changed.set()
        self._changed.set()


def tune(study: Study, endpoints: list[Endpoint], settings: FarmSettings,
         on_progress: Callable[[dict[str, int], int], None] | None = None,
         local_agent_args: list[str] | None = None) -> TuneOutcome:
    """Run the whole study on the agents (a local one when none is given); problems are in ``errors``."""
    return StudyRun(study, endpoints, settings, on_progress=on_progress, local_agent_args=local_agent_args).run()


def endpoints_from(agents: list[AgentSpec], addresses: list[str], token_file: Path | None,
                   where: str = "agents") -> list[Endpoint]:
    """Agents from the command line (they replace the given ones) or ``agents`` (a study's or a lab file's
    ``[[agents]]``, named ``where`` in errors); ``token_file`` serves the agents without their own."""
    tok = read_token(token_file, "--token-file")
    if addresses:
        return [Endpoint(a, token=tok) for a in addresses]
    endpoints = []
    for i, a in enumerate(agents):
        for key in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(a, key)
            if path is not None and not Path(path).is_file():
                problem = "is a folder, expected a PEM file" if Path(path).is_dir() else "file not found"
                raise UserError(f"{where}[{i}].{key}: {problem}: {path}")
        if (a.tls_cert is None) != (a.tls_key is None):
            raise UserError(f"{where}[{i}]: tls_cert and tls_key go together (mutual TLS needs both)")
        token = read_token(a.token_file, f"{where}[{i}].token_file") if a.token_file else tok
        endpoints.append(Endpoint(a.address, token=token, tls_ca=a.tls_ca, tls_cert=a.tls_cert, tls_key=a.tls_key,
                                  device_class=a.device_class, name=a.name))
    return endpoints
