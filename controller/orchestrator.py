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

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict, Unpack

from tuneqn.controller import accuracy
from tuneqn.controller.accuracy import baseline_id
from tuneqn.controller.farm.board import JobBoard
from tuneqn.controller.farm.jobs import Endpoint, FarmSettings, make_job
from tuneqn.controller.farm.links import AgentLink, AgentState
from tuneqn.controller.farm.liveness import GiveUp, Liveness, Release, Seen, StatusLine
from tuneqn.controller.farm.local import LocalAgent, SharedQuietLock
from tuneqn.controller.prepare.dataset import Split
from tuneqn.controller.quantize.feasibility import GAVE_UP, describe
from tuneqn.controller.report import write_full_report
from tuneqn.controller.report.write import write_checkpoint
from tuneqn.controller.search import Outcome, Request, SearchView, gate, make_strategy
from tuneqn.controller.search.planning import Planner, Probe, Settle
from tuneqn.controller.search.ties import result_latency
from tuneqn.controller.store import FINAL_JOB_STATES
from tuneqn.controller.study import CandidatePlan, PreparedInput, Study
from tuneqn.v1 import agent_pb2 as pb

log = logging.getLogger(__name__)

REMEASURE_META = "remeasure_token"
#: A store of a study started before search widths followed the devices: its one fixed width.
CONCURRENCY_META = "search_concurrency"
#: Preparer priorities: a model's analyses go before preparing the next model.
_ANALYZE, _PREPARE = 0, 1
#: Calibrations that run at once (Orchestrator._calibrator), each in a child process with a local agent.
_CALIBRATORS = 2


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


def _fp32_lost(model: str, device_class: str, why: str) -> str:
    return f"device class {device_class}: the FP32 model of {model} {why}; nothing to compare candidates with"


def remeasure_token(study: Study, fresh: bool) -> str:
    """The study's re-measure token: new on ``--fresh``, kept in the store until the next one."""
    if fresh:
        study.store.set_meta(REMEASURE_META, uuid.uuid4().hex)
    return study.store.get_meta(REMEASURE_META) or ""


class RunHooks(TypedDict, total=False):
    """What a caller of :func:`tune` may add: progress and status callbacks, the local agent's arguments."""

    on_progress: Callable[[dict[str, int], int], None] | None
    local_agent_args: list[str] | None
    on_status: Callable[[list[StatusLine]], None] | None


class StudyRun:
    """The steps of one ``tune`` run over a prepared :class:`Study`."""

    def __init__(
        self, study: Study, endpoints: list[Endpoint], settings: FarmSettings, **hooks: Unpack[RunHooks]
    ) -> None:
        self.study = study
        self.store = study.store
        self.endpoints = endpoints
        self.settings = settings
        self.on_progress = hooks.get("on_progress")
        self.on_status = hooks.get("on_status")
        self.local_agent_args = hooks.get("local_agent_args")
        self.board = JobBoard(self.store, settings, on_result=self._on_result, on_final=self._on_final)
        self.stop = threading.Event()
        self.links: list[AgentLink] = []
        self.local: LocalAgent | None = None
        self.quiet: SharedQuietLock | None = None
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._classes: dict[str, float] = {}  # device class -> last time a live agent served it
        self._built: dict[str, _Built] = {}  # candidate id -> built candidate
        self._levels: dict[str, set[str]] = {}  # candidate id -> levels asked for ("screen", "full")
        self._queued: set[str] = set()  # candidate ids handed to the builder
        self._queued_models: dict[str, str] = {}  # their models
        self._job_ids: dict[tuple[str, str, str], str] = {}  # (candidate, device class, level) -> job id
        self._outcomes: dict[tuple[str, str, tuple[str, ...]], Outcome] = {}  # complete outcomes
        self._builds: queue.Queue[CandidatePlan | None] = queue.Queue()
        self._building = 0
        self._build_errors: list[BaseException] = []
        self._results_changed = threading.Event()
        self._changed = threading.Event()  # a result or a build arrived: ask the strategies again
        self._fixed_width: int | None = None  # a study started with a fixed search width keeps it
        self._class_known = threading.Event()  # some device class is known: builds may start
        self._builder_thread: threading.Thread | None = None
        # Calibrations run on their own thread, ahead of the builds that need them (a build waits in _deferred
        # meanwhile and the builder goes on with others): a percentile calibration takes tens of seconds.
        self._calibrations: queue.Queue[tuple[str, str, Path] | None] = queue.Queue()
        self._calibrated: set[Path] = set()
        self._deferred: dict[Path, list[CandidatePlan]] = {}
        self._calibrator_threads: list[threading.Thread] = []
        self._asked: set[tuple[str, str, str]] = set()  # (search, candidate id, level) recorded
        self._screen_recipes: set[tuple[str, str]] = set()  # (model, recipe) with screens asked for
        self._screens: dict[tuple[str, str], Split] = {}  # their screening samples, once chosen
        # Liveness of agents and classes (controller/farm/liveness.py) and device-class planning
        # (``[evaluation] feasibility``, controller/search/planning.py): both return decisions applied here.
        self.liveness = Liveness(settings)
        self.planner = Planner(study, study.cfg.evaluation.feasibility)
        self._links_started = time.monotonic()
        self._links_up = False
        self._gone: set[str] = set()  # classes given up (one error line each, until one comes back)
        # The recipe gate (``recipes = "auto"``; see controller/search/gate.py).
        self._gated: dict[tuple[str, tuple[str, ...]], list[gate.Decision]] = {}  # (model, classes) -> decided
        self._recipe_rank: dict[str, dict[str, int]] = {}  # model -> recipe -> rank, once its gate decided
        self._best_cases: dict[tuple[str, str], CandidatePlan | None] = {}  # (model, recipe) -> all layers float
        # The preparer: models prepared one by one, layers ranked, off the main thread (see start_preparer).
        self._prep_tasks: queue.PriorityQueue[tuple[int, int, int | tuple[str, str] | None]] = queue.PriorityQueue()
        self._prep_seq = 0
        self._preparing = 0  # preparer tasks queued or running
        self._prepared: queue.Queue[PreparedInput] = queue.Queue()  # ready to be admitted by the main thread
        self._admitted = 0
        self._analysis_asked: set[tuple[str, str]] = set()  # (model, recipe) handed to the preparer
        self._analysis_done: set[tuple[str, str]] = set()  # (model, recipe) whose layers are ranked
        self._layers_written = -1  # analyses done when layers.json was last written
        self._preparer_thread: threading.Thread | None = None
        # The reporter: report.json, plots of finished models and layers.json off the main thread.
        self._plotted: set[str] = set()  # models whose plots were rendered ahead of the report
        self._report_tasks: queue.Queue[Callable[[], float | None] | None] = queue.Queue()
        self._reporter_thread: threading.Thread | None = None
        self._reporting = False
        self._reporter_ending = threading.Event()
        self._reported_at = 0.0
        self._report_took = 0.0

    # ------------------------------------------------------------------ steps
    def run(self) -> TuneOutcome:
        """prepare and analyze (model by model, on a worker thread) while dispatching (plan as results arrive)
        → report. Configured agents are dialled first, so their state shows (and their wait counts) from the
        start; the jobs of a model go out as soon as it is prepared, while the next one is."""
        try:
            if self.endpoints:
                self.start_links()
            self.start_preparer()
            self.start_farm()
            self.dispatch()
        finally:
            self.stop_farm()
        return self.report()

    # ------------------------------------------------------------------ the preparer (models, analyses)
    def start_preparer(self) -> None:
        """Prepare the study's models one after another on a worker thread; each is admitted to the run (its
        FP32 job, its recipes' jobs) by the main thread as soon as it is ready. The same thread ranks layers
        (:meth:`_analyze_soon`), before preparing the next model."""
        for i in range(len(self.study.cfg.models)):
            self._prep_task(_PREPARE, i)
        self._preparer_thread = threading.Thread(target=self._preparer, name="preparer", daemon=True)
        self._preparer_thread.start()

    def _wake_board(self) -> None:
        """Wake whoever waits on the job board (the dispatch loop and the end-of-run check)."""
        with self.board.cond:
            self.board.cond.notify_all()

    def _wake(self) -> None:
        """A preparer or builder task ended: wake the run loop and the job board."""
        self._changed.set()
        self._wake_board()

    def _prep_task(self, priority: int, item: int | tuple[str, str]) -> None:
        with self._lock:
            self._preparing += 1
            self._prep_seq += 1
            seq = self._prep_seq
        self._prep_tasks.put((priority, seq, item))

    def _preparer(self) -> None:
        while True:
            _, _, item = self._prep_tasks.get()
            if item is None or self.stop.is_set():
                return
            try:
                with self._heavy_work():
                    if isinstance(item, int):
                        self._prepared.put(self.study.prepare_model(item))
                    else:
                        self.study.search_layers(*item)
                        with self._lock:
                            self._analysis_done.add(item)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
                self._build_errors.append(exc)
                return
            finally:
                with self._lock:
                    self._preparing -= 1
                self._wake()

    def _admit(self) -> None:
        """Models the preparer finished (in the study's order): registered, their FP32 baselines wanted; with
        explicit recipes their layers are ranked next."""
        while True:
            try:
                prepared = self._prepared.get_nowait()
            except queue.Empty:
                return
            self.study.add_model(prepared)
            model = prepared.model.name
            with self._lock:
                self._admitted += 1
                everything = self._admitted == len(self.study.cfg.models)
            if everything:
                self.study.finish_prepare()
            self.study.forget_stale_candidates(model)
            pm = prepared.model
            self._add_built(
                _Built(baseline_id(model), model, pm.path, pm.sha256, {}, pm.path.stat().st_size), fp32=True
            )
            self._want(baseline_id(model), "full", model, "fp32")
            if not self.study.auto:
                for recipe in self.study.recipes(model):
                    self._analyze_soon(model, recipe)
            self._changed.set()

    def _analyze_soon(self, model: str, recipe: str) -> None:
        """Rank the layers of (model, recipe) on the preparer (before it prepares another model)."""
        if (model, recipe) in self._analysis_asked:
            return
        self._analysis_asked.add((model, recipe))
        self._prep_task(_ANALYZE, (model, recipe))

    def _analyzed_now(self) -> None:
        """layers.json and the layer plot (on the reporter thread) once every analysis is done, not after each
        one; the report writes them at the end if more came since."""
        with self._lock:
            done = len(self._analysis_done)
        if done != self._layers_written and self.view_pairs_settled() and self._reporter_free():
            self._layers_written = done
            self._report_soon(self._write_layers)

    def _write_layers(self) -> None:
        """layers.json and the layer plot of every analysis so far."""
        from tuneqn.controller.report.layer_plot import write_layer_plot  # matplotlib: not at start-up

        write_layer_plot(self.study.write_layer_outputs(self.study.analyzed_rows()), self.study.out_dir)

    # ------------------------------------------------------------------ the reporter (report.json, plots ahead)
    def _reporter_free(self) -> bool:
        """Nothing on the reporter, and it rested three times as long as its last report.json took (at most a
        quarter of a core goes to rewriting it while the devices wait for the controller's jobs)."""
        with self._lock:
            return not self._reporting and time.monotonic() - self._reported_at >= 3 * self._report_took

    def _report_soon(self, task: Callable[[], float | None]) -> None:
        """Run ``task`` on the reporter thread (started on first use); it returns the seconds its report.json took
        (None: none written)."""
        with self._lock:
            self._reporting = True
        if self._reporter_thread is None:
            self._reporter_thread = threading.Thread(target=self._reporter, name="reporter", daemon=True)
            self._reporter_thread.start()
        self._report_tasks.put(task)

    def _reporter(self) -> None:
        while True:
            task = self._report_tasks.get()
            if task is None:
                return
            took: float | None = None
            try:
                took = task()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
                self._build_errors.append(exc)
                return
            finally:
                with self._lock:
                    self._reporting = False
                    self._reported_at = time.monotonic()
                    if took is not None:
                        self._report_took = took
                self._wake_board()

    def _checkpoint(self, strategies: list[Any]) -> None:
        """report.json (the checkpoint view) and the plots of the models just finished, on the reporter."""
        models = self._finished_models(strategies) - self._plotted
        self._plotted |= models
        self._report_soon(
            lambda: write_checkpoint(self.store, self.study.out_dir, models, cancel=self._reporter_ending.is_set)
        )

    def _stop_reporter(self) -> None:
        """Let the reporter finish what it has, but no more plots ahead (the final report draws them)."""
        self._reporter_ending.set()
        if self._reporter_thread is not None:
            self._report_tasks.put(None)
            self._reporter_thread.join()
            self._reporter_thread = None

    def start_farm(self) -> None:
        """Start the local agent when none is configured, and one link per agent."""
        if not self.endpoints:
            state_dir = self.study.out_dir / "agents" / "local"
            self.quiet = SharedQuietLock(state_dir / "quiet.lock")
            self.local = LocalAgent(state_dir, extra_args=self.local_agent_args, quiet_lock=self.quiet.path)
            self.endpoints = [Endpoint(address=self.local.start())]
        if not self._links_up:
            self.start_links()
        self._builder_thread = threading.Thread(target=self._builder, name="candidate-builder", daemon=True)
        self._builder_thread.start()
        # two at once: a model's min/max and percentile calibrations overlap (the percentile one, the longer, is
        # then in about as soon as it would be alone; its recipes' fully quantized models gate the searches)
        self._calibrator_threads = [
            threading.Thread(target=self._calibrator, name=f"calibrator-{i}", daemon=True) for i in range(_CALIBRATORS)
        ]
        for thread in self._calibrator_threads:
            thread.start()

    def start_links(self) -> None:
        """One link per agent (the device classes they declare are planned from now on)."""
        now = self._links_started = time.monotonic()
        self.liveness.started = now
        self._links_up = True
        wanted = set(self.settings.device_classes)
        if wanted:
            skipped = [ep for ep in self.endpoints if ep.device_class and ep.device_class not in wanted]
            for ep in skipped:
                log.info(
                    "agent %s (class %s) not used: the study measures on %s",
                    ep.address,
                    ep.device_class,
                    ", ".join(sorted(wanted)),
                )
            self.endpoints = [ep for ep in self.endpoints if ep not in skipped]
            for cls in sorted(wanted):  # planned from the start: a class no agent serves ends as unreachable
                self._register_class(cls, {"declared_by": "evaluation.device_classes"}, now)
        for ep in self.endpoints:
            if ep.device_class:
                self._register_class(ep.device_class, {"declared_by": ep.address}, now)
        self.links = [AgentLink(ep, self.board, self.stop, self._on_device) for ep in self.endpoints]
        for link in self.links:
            link.start()

    def dispatch(self) -> None:
        """Feed the searches' requests to the builder and the dispatcher until every search is done
        and every job is final; the strategies are asked again whenever a result or a build arrives."""
        stored = self.store.get_meta(CONCURRENCY_META)
        self._fixed_width = int(stored) if stored and stored.isdigit() else None
        view = SearchView(self.study, self)
        strategies = [make_strategy(run, view) for run in self.study.cfg.search.runs()]
        for st in strategies:
            self.store.put_search(st.name, st.run.model_dump(mode="json"))
        started = self._links_started  # an agent that never answered is waited for from when it was dialled
        last_report = 0.0
        self._results_changed.set()  # a first report.json right away
        self._changed.set()
        stuck_once = False
        while True:
            if self._build_errors:
                raise self._build_errors[0]
            self.board.expire()
            if self._changed.is_set():
                self._changed.clear()
                self._admit()
                self._plan_feasibility()
                self._gate_requests()
                self._screen_splits_ready()
                for st in strategies:
                    # a strategy is done only once its pairs handed out their last requests (PerPair.done), and it
                    # is not done again when a pair appears later (a variant planned for a device)
                    if not st.done():
                        self._request(st.name, st.propose())
                    if st.done():
                        self.store.finish_search(st.name)
                self._analyzed_now()
            searching = not all(st.done() for st in strategies)
            if not searching and self._idle() and not self.board.closed:
                self.board.close()
            awaited = self._awaited(started)
            self._watch_liveness()
            if self.on_progress is not None:
                self.on_progress(self.board.counts(), self._total())
            self._show_status()
            if self._results_changed.is_set() and time.monotonic() - last_report > 2.0 and self._reporter_free():
                self._results_changed.clear()
                self._checkpoint(strategies)
                last_report = time.monotonic()
            if self.board.finished() and not searching and self._idle() and not awaited and not self.planner.deciding():
                break
            if (searching or not self._idle()) and not awaited and self._nothing_can_arrive():
                if stuck_once:  # the searches were asked once more since it looked so: nothing will change
                    self._stuck([st.name for st in strategies if not st.done()])
                    break
                stuck_once = True
                self._changed.set()
                continue
            stuck_once = False
            with self.board.cond:
                if not self._changed.is_set():
                    self.board.cond.wait(0.5)

    def _finished_models(self, strategies: list[Any]) -> set[str]:
        """Models whose results can no longer change in this run: admitted, the gate decided and every
        recipe to search is ranked, no search of theirs open, no build or job of theirs unfinished."""
        with self._lock:
            done = set(self._analysis_done)
            building = {self._queued_models[cid] for cid in self._queued if cid not in self._built}
        busy = set(building)
        for st in strategies:
            busy |= st.open_models() if hasattr(st, "open_models") else set(self.study.models)
        for jid in self.board.unfinished():
            cid = self.board.plans[jid].candidate_id
            with self._lock:
                built = self._built.get(cid)
            busy.add(built.model if built is not None else cid.split(":", 1)[0])
        out = set()
        for m in self.study.models:
            if m in busy:
                continue
            decisions = self.gate_decisions(m)
            if decisions is not None and any(d.status == gate.PENDING for d in decisions):
                continue
            searched = (
                self.study.recipes(m)
                if decisions is None
                else [d.recipe for d in decisions if d.status == gate.SEARCHED]
            )
            if all((m, r) in done for r in searched):
                out.add(m)
        return out

    def _nothing_can_arrive(self) -> bool:
        """No device class and no live agent to bring one, or: no job unfinished, no build running, nothing
        being planned and nothing changed since the searches were last asked (they wait for results that
        can no longer arrive)."""
        with self._lock:
            no_class = not self._classes
        if no_class and not any(link.live.is_set() for link in self.links):
            return True
        return (
            not self.board.unfinished()
            and not self.board.settling()
            and self._idle()
            and not self.planner.deciding()
            and not self._changed.is_set()
        )

    def _stuck(self, searches: list[str]) -> None:
        """The searches cannot go on: say why (the reasons already found, else what they wait for)."""
        for line in self._lost_lines():
            if line not in self.errors:
                self.errors.append(line)
        if not self.errors and not self.liveness.errors:
            self.errors.append(
                f"searches {', '.join(searches) or '(done)'} wait for results that can no longer arrive "
                f"(device classes: {', '.join(self.view_devices()) or 'none'})"
            )
        log.error(
            "%s; ending the run",
            f"the searches {', '.join(searches)} cannot go on" if searches else "no device class can run the builds",
        )

    def _show_status(self) -> None:
        """Each agent's state and what the run waits for, to the live display."""
        if self.on_status is None:
            return
        with self._lock:
            classes = dict(self._classes)
        waiting = [cls for cls in classes if cls not in self._gone and self.board.unfinished(cls)]
        self.on_status(self.liveness.status(self.links, classes, waiting, time.monotonic()))

    # ------------------------------------------------------------------ results that can no longer arrive
    def _lost(self, cid: str, device_class: str) -> str | None:
        """Why candidate ``cid``'s full job on a class ended without a result (None: it did not, or has none)."""
        with self._lock:
            jid = self._job_ids.get((cid, device_class, "full"))
        row = self.store.job(jid) if jid is not None else None
        if row is None or row["state"] not in FINAL_JOB_STATES or row["state"] == "done":
            return None
        error = str(row.get("error") or "no result").removeprefix(f"infeasible on {device_class}: ")
        how = {"failed": "failed for good", "infeasible": "cannot run there", "unreachable": "got no result"}
        return f"{how.get(row['state'], 'ended ' + row['state'])} ({error})"

    def view_blocked(self, model: str, recipe: str) -> str | None:
        """Why the search of (model, recipe) cannot go on, or None: on every device class it runs on, the
        FP32 model or the recipe's fully quantized model ended without a result (one reason per class)."""
        reasons = self._blocked(model, recipe)
        return "; ".join(reasons) if reasons else None

    def _blocked(self, model: str, recipe: str) -> list[str]:
        """:meth:`view_blocked`'s reasons, one per class (empty: the search can go on)."""
        classes = self._classes_of(model, recipe)
        if not classes:
            return []
        fq = self.study.make_plan(model, recipe, ()).id
        reasons = []
        for cls in classes:
            why = self._lost(baseline_id(model), cls)
            if why is not None:
                reasons.append(_fp32_lost(model, cls, why))
                continue
            why = self._lost(fq, cls)
            if why is None:
                return []
            reasons.append(f"device class {cls}: the fully quantized model of {recipe} {why}; nothing to search from")
        return reasons

    def _lost_lines(self) -> list[str]:
        """Every reason a search could not go on (FP32 lost on every class of a model, a blocked pair)."""
        out: list[str] = []
        classes = self.view_devices()
        for model in self.study.models:
            lost = [(cls, why) for cls in classes if (why := self._lost(baseline_id(model), cls)) is not None]
            if classes and len(lost) == len(classes):
                out += [_fp32_lost(model, cls, why) for cls, why in lost]
        for model, recipe in self.view_pairs():
            out += [line for line in self._blocked(model, recipe) if line not in out]
        return out

    def stop_farm(self) -> None:
        """Stop the links, their slots and the local agent."""
        self.stop.set()
        self._builds.put(None)
        for _ in self._calibrator_threads:
            self._calibrations.put(None)
        self._prep_tasks.put((-1, 0, None))
        for link in self.links:
            link.interrupt()  # cancels calls in flight (a hung agent's handshake, say)
        for link in self.links:
            link.join(timeout=15)
        if self._builder_thread is not None:
            self._builder_thread.join()  # it finishes the build in hand (the store must outlive it)
        for thread in self._calibrator_threads:
            thread.join()  # likewise the calibrations in hand
        if self._preparer_thread is not None:
            self._preparer_thread.join()  # likewise the model or analysis in hand
        self._stop_reporter()  # the report redraws what it did not finish
        if self.local is not None:
            self.local.stop()

    def report(self) -> TuneOutcome:
        """Counts, errors and the full report."""
        if self._layers_written != len(self._analysis_done):
            self._write_layers()
        counts = self.board.counts()
        for line in self._lost_lines():
            if line not in self.errors:
                self.errors.append(line)
        outcome = TuneOutcome(
            total=self._total(),
            done=counts.get("done", 0),
            failed=counts.get("failed", 0),
            unreachable=counts.get("unreachable", 0),
            infeasible=counts.get("infeasible", 0),
            submitted_here=sum(s.executed for link in self.links for s in link.slots.values()),
            errors=list(self.errors)
            + list(self.liveness.errors)
            + [
                f"agent {link.address} unusable: {link.error}"
                for link in self.links
                if link.state == AgentState.INCOMPATIBLE
            ],
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
                self._queued_models[plan.id] = plan.model
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
        """Choose the screening sample of every recipe whose fully quantized model is measured (or take the one
        chosen before: kept in the store, whatever classes are connected now); add its screens."""
        for model, recipe in sorted(self._screen_recipes):
            if (model, recipe) in self._screens:
                continue
            split = self.study.kept_screen_split(model, recipe) or self._choose_screen(model, recipe)
            if split is None:
                continue
            self._screens[(model, recipe)] = split
            with self._lock:
                todo = [
                    (b, list(self._classes))
                    for cid, b in self._built.items()
                    if b.model == model and b.recipe == recipe and "screen" in self._levels.get(cid, ())
                ]
            # (_add_jobs adds them only on the classes the recipe is planned on)
            for b, classes in todo:
                for cls in classes:
                    self._add_jobs(b, cls, "screen")

    def _choose_screen(self, model: str, recipe: str) -> Split | None:
        """The screening sample from the fully quantized model's and FP32's full results on the classes that
        have both (None while the fully quantized model is not measured on every class)."""
        fq = self.study.make_plan(model, recipe, ())
        if self.view_outcome(fq, "full") is None:
            return None
        fq_topk, fp32_topk, used = [], [], []
        for cls in self._classes_of(model, recipe):
            fq_row = self.store.result(self._job_ids[(fq.id, cls, "full")])
            fp32_row = self.store.result(self._job_ids.get((baseline_id(model), cls, "full"), ""))
            if fq_row is None or fp32_row is None:
                continue  # failed on that class: choose from the others
            fq_topk.append(accuracy.topk_of(fq_row))
            fp32_topk.append(accuracy.topk_of(fp32_row))
            used.append(cls)
        if not fq_topk:
            return None
        return self.study.screen_split(model, recipe, fq_topk, fp32_topk, used)

    # ------------------------------------------------------------------ the recipe gate (recipes = "auto")
    def _gate_requests(self) -> None:
        """With auto recipes: every recipe's fully quantized model (or the variant planned instead on a
        device class) is evaluated in full everywhere it runs, before the gate decides."""
        if not self.study.auto:
            return
        variants = sorted(self.planner.planned_recipes())
        fqs = [(m, r) for m in self.study.models for r in self.study.recipes(m)] + variants
        for model, recipe in fqs:
            fq = self.study.make_plan(model, recipe, ())
            self._want(fq.id, "full", model, recipe)
            self._ensure_built(fq)
            best = self._best_case(model, recipe)
            if best is not None:
                self._want(best.id, "full", model, recipe)
                self._ensure_built(best)

    def _best_case(self, model: str, recipe: str) -> CandidatePlan | None:
        """With auto recipes, a recipe's *best case*: every searched layer in float (the last prefix of any
        ranking, so every search that reaches it asks for this very candidate), evaluated in full with the
        fully quantized model to order the searches (:func:`gate.search_order`). Static recipes of a study
        without ``max_k`` (the layers are read from the built fully quantized model); None otherwise or while
        that model is not built."""
        if (model, recipe) in self._best_cases:
            return self._best_cases[(model, recipe)]
        if self.study.cfg.search.max_k is not None or self.study.settings(recipe).mode != "static":
            self._best_cases[(model, recipe)] = None
            return None
        with self._lock:
            built = self.study.make_plan(model, recipe, ()).id in self._built
        if not built:
            return None
        layers = [r["name"] for r in self.study.quantized_layers(model, recipe)]
        plan = self.study.make_plan(model, recipe, layers) if layers else None
        self._best_cases[(model, recipe)] = plan
        return plan

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

    def _ranked(self, model: str) -> bool:
        """With auto recipes, whether the order of the model's searches is decided (its searches wait for it):
        once the gate decided and every recipe's best case (:meth:`_best_case`) is measured or failed."""
        if model in self._recipe_rank:
            return True
        classes = tuple(self.view_devices())
        recipes = self.study.recipes(model)
        best = {r: p.id for r in recipes if (p := self._best_case(model, r)) is not None}
        points = gate.fq_points(self.store, model, list(best), classes, candidate_of=best.get)
        if any(p is None for per in points.values() for p in per.values()):
            return False
        fq = gate.fq_points(self.store, model, recipes, classes)
        order = gate.search_order(recipes, fq, points)
        self._recipe_rank[model] = {r: i for i, r in enumerate(order)}
        log.info("%s: recipes searched in this order: %s", model, ", ".join(order))
        return True

    def _priority(self, model: str, recipe: str) -> tuple[int, int]:
        """Which pending jobs a device takes first: model by model (in the order they were admitted), and within
        a model recipe by recipe (FP32 with the first; it is added first), so that one recipe's search ends
        (and its candidates reach the answer) before the next one's starts, instead of every search advancing
        at the pace of all of them.
        Recipes go in the study's order; with auto recipes, once the gate has decided, in
        :func:`gate.search_order` (the lowest loss of the recipe's best case, every searched layer in float,
        first; then of its fully quantized model; then the smaller file): the recipe likeliest to hold the
        answer is searched first. Devices are never left idle by this: it only orders what is pending."""
        models = list(self.study.models)
        first = models.index(model) if model in models else len(models)
        if recipe == "fp32":
            return (first, 0)
        recipes = self.study.recipes(model)
        base = self.study.variant_base(recipe) or recipe
        rank = self._recipe_rank.get(model) or {r: i for i, r in enumerate(recipes)}
        return (first, rank.get(base, len(recipes)))

    def _searched(self, model: str, recipe: str) -> bool:
        """Whether (model, recipe) is searched now: its layers are ranked (asked for when the model is admitted
        with explicit recipes, else when the recipe gate passes it)."""
        decisions = self.gate_decisions(model)
        if decisions is not None and not any(d.recipe == recipe and d.status == gate.SEARCHED for d in decisions):
            return False
        if decisions is not None and not self._ranked(model):
            return False  # the searches' order is not decided yet
        self._analyze_soon(model, recipe)
        with self._lock:
            return (model, recipe) in self._analysis_done

    def view_recipe_rank(self, model: str, recipe: str) -> int:
        """Where (model, recipe)'s search comes in its model's order: the order its jobs go in (:meth:`_priority`)."""
        return self._priority(model, recipe)[1]

    def view_pairs_settled(self) -> bool:
        """False while more pairs may come: a model is still being prepared, the gate has not decided (some
        model's auto recipes are pending), or a recipe to search is still being analyzed."""
        with self._lock:
            if self._admitted < len(self.study.cfg.models):
                return False
            done = set(self._analysis_done)
        for m in self.study.models:
            decisions = self.gate_decisions(m)
            if decisions is not None and (any(d.status == gate.PENDING for d in decisions) or not self._ranked(m)):
                return False
            searched = (
                self.study.recipes(m)
                if decisions is None
                else [d.recipe for d in decisions if d.status == gate.SEARCHED]
            )
            if any((m, r) not in done for r in searched):
                return False
        return True

    def _idle(self) -> bool:
        """No build and no preparer task queued or running."""
        with self._lock:
            return self._building == 0 and self._preparing == 0

    def _builder(self) -> None:
        # Builds start once some device class is known (agents are dialled while the models are prepared,
        # so that is at once as a rule): a run whose agents never answer ends without a build to finish.
        while not self._class_known.wait(0.5):
            if self.stop.is_set():
                return
        while True:
            plan = self._builds.get()
            if plan is None or self.stop.is_set():
                return
            if self._calibration_pending(plan):
                continue  # back in the queue once calibrated
            try:
                with self._heavy_work():
                    row = self.study.build(plan)
                self._add_built(
                    _Built(
                        plan.id,
                        plan.model,
                        Path(row["path"]),
                        row["sha256"],
                        row["runtime"],
                        int(row["size_bytes"]),
                        plan.mode,
                    )
                )
            except Exception as exc:  # noqa: BLE001 - a variant checked for a device may not build: give it up
                if not self.planner.is_probe(plan.id):
                    self._build_errors.append(exc)  # handed to the main thread, which raises it
                    self._wake_board()
                    return
                log.warning("variant %s does not build: %s", plan.mode, exc)
                self.planner.probe_failed(plan.id, f"{type(exc).__name__}: {exc}")
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
                self._build_errors.append(exc)
                self._wake_board()
                return
            finally:
                with self._lock:
                    self._building -= 1
                self._wake()

    def _calibration_pending(self, plan: CandidatePlan) -> bool:
        """Whether ``plan`` needs a calibration not made yet: then it waits (deferred) for the calibrator, which is
        asked for it, and the builder goes on with the next plan."""
        path = self.study.calibration_path(plan.model, plan.mode)
        if path is None or path.is_file():
            return False
        with self._lock:
            if path in self._calibrated:
                return False
            asked = path in self._deferred  # plans wait there from the ask until it is calibrated
            self._deferred.setdefault(path, []).append(plan)
        if not asked:
            self._calibrations.put((plan.model, plan.mode, path))
        return True

    def _calibrator(self) -> None:
        """Make the calibrations that builds wait for (one at a time per thread); then hand the builds back.

        A calibration that fails hands them back too: the build calibrates again and fails as it would have
        without this thread (a device's variant that cannot be quantized is given up, anything else ends
        the run)."""
        while True:
            item = self._calibrations.get()
            if item is None or self.stop.is_set():
                return
            model, mode, path = item
            try:
                with self._heavy_work():
                    self.study.calibration_cache(model, mode)
            except Exception as exc:  # noqa: BLE001 - the build that needs it reports it (see above)
                log.info("calibration of %s/%s failed: %s", model, mode, exc)
            with self._lock:
                self._calibrated.add(path)
                plans = self._deferred.pop(path, [])
            for plan in plans:
                self._builds.put(plan)

    def _add_built(self, built: _Built, fp32: bool = False) -> None:
        if fp32:
            pm = self.study.models[built.model]
            self.store.put_candidate(
                {
                    "id": built.candidate_id,
                    "model": built.model,
                    "mode": "fp32",
                    "k": None,
                    "kind": "fp32",
                    "label": "fp32",
                    "excluded": [],
                    "settings_key": "",
                    "build_key": pm.sha256,
                    "path": str(built.path),
                    "size_bytes": built.size_bytes,
                    "sha256": built.sha256,
                    "runtime": {},
                }
            )
        with self._lock:
            self._built[built.candidate_id] = built
            classes = list(self._classes)
            levels = sorted(self._levels.get(built.candidate_id, ()))
        for cls in classes:
            for level in levels:
                self._add_jobs(built, cls, level)

    def _add_jobs(self, built: _Built, device_class: str, level: str) -> None:
        if not self.planner.planned_on(built.model, built.recipe, device_class):
            return  # another recipe runs there, or not decided yet (added by _settle)
        if level == "screen":
            split = self._screens.get((built.model, built.recipe))
            if split is None:
                return  # added once the recipe's screening sample is chosen
        else:
            split = self.study.eval_split(built.model)
        pm = self.study.models[built.model]
        plan = make_job(
            built.candidate_id,
            device_class,
            built.path,
            built.sha256,
            split.path,
            split.sha256,
            pm.input_name,
            built.runtime,
            self.settings,
            level,
            split.name,
            tuning_group=pm.sha256,
            sample_sha256=self.study.eval_split(built.model).sha256,
        )
        plan = replace(plan, priority=self._priority(built.model, built.recipe))
        with self._lock:
            self._job_ids[(built.candidate_id, device_class, level)] = plan.id
        self.board.add(plan)

    # ------------------------------------------------------------------ device-class planning (search/planning.py)
    def _classes_of(self, model: str, recipe: str) -> list[str]:
        """The device classes a recipe's results come from: where it is planned, or may still be (undecided)."""
        with self._lock:
            classes = list(self._classes)
        return self.planner.classes_of(model, recipe, classes)

    def _plan_feasibility(self) -> None:
        """Apply the planner's decisions: build what it checks, settle what it decided."""
        for decision in self.planner.plan(self._built_path):
            if isinstance(decision, Probe):
                self._ensure_built(decision.plan)  # checked when it is built
            else:
                self._settle(decision)

    def _built_path(self, cid: str) -> Path | None:
        with self._lock:
            built = self._built.get(cid)
        return built.path if built is not None else None

    def _heavy_work(self) -> contextlib.AbstractContextManager[Any]:
        """Around a unit of CPU-heavy work (preparing, ranking, building): the local agent, which times on these
        cores, does not time meanwhile (the quiet lock, shared); nothing without a local agent."""
        return self.quiet.shared() if self.quiet is not None else contextlib.nullcontext()

    def _settle(self, d: Settle) -> None:
        """Plan ``d.planned`` for (model, recipe) on the class; add the jobs that were held for it."""
        model, recipe, cls = d.key
        if d.planned != recipe:
            # The variant's layers are ranked before its search starts (it was calibrated by its build).
            with self._heavy_work():
                self.study.search_layers(model, d.planned)
        self.planner.settle(d)
        with self._lock:
            todo = [
                (b, sorted(self._levels.get(cid, ())))
                for cid, b in self._built.items()
                if b.model == model and b.recipe == d.planned
            ]
        if d.persist:
            self.store.put_feasibility(model, recipe, cls, d.planned, d.status, d.unsupported, d.tried, d.digest)
        line = describe(cls, recipe, d.planned, d.status, d.unsupported, d.tried)
        (log.warning if d.status == GAVE_UP else log.info)("feasibility: %s", line)
        for b, levels in todo:
            for level in levels:
                self._add_jobs(b, cls, level)
        self._changed.set()

    # ------------------------------------------------------------------ what the strategies see (ViewSource)
    def view_devices(self) -> list[str]:
        """Device classes so far."""
        with self._lock:
            return sorted(self._classes)

    def view_concurrency(self, model: str, recipe: str) -> int:
        """The live search width of (model, recipe): the most devices taking jobs now in any device class
        its recipe runs on, at least 1. Every device of the largest class is kept busy; a class with
        fewer devices queues its share (on a lab of one CPU and four phones the phones all work).

        Strategies record the width each decision was taken with (:meth:`SearchView.took`), so this may
        change as devices come and go. A study started when the width was fixed keeps that width."""
        if self._fixed_width is not None:
            return self._fixed_width
        live: dict[str, int] = {}
        for link in self.links:
            for cls, n in link.available_devices().items():
                live[cls] = live.get(cls, 0) + n
        counts = [live[cls] for cls in self._classes_of(model, recipe) if live.get(cls)]
        return max(1, max(counts, default=1))

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
        variants = self.planner.variants()
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
            per_device[cls] = {
                "agreement": result["agreement"],
                "accuracy": result["accuracy"],
                "accuracy_top5": result["accuracy_top5"],
                **result_latency(result),
                "overlap": accuracy.overlap_of(self.store, result),
            }
            wrong[cls] = accuracy.disagreeing_of(self.store, result)
        out = Outcome(
            plan.id,
            built.size_bytes,
            per_device,
            tuple(failed),
            wrong,
            self.study.eval_split(built.model).size if level == "screen" else 0,
        )
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
    def _register_class(
        self, device_class: str, info: dict[str, Any], now: float, supported: frozenset[str] | None = None
    ) -> bool:
        """A device class appears (declared, or a device of it connected with ``supported`` op types:
        empty = no known restriction); it gets every job built so far that may run there."""
        with self._lock:
            new = device_class not in self._classes
            self._class_known.set()
            self._classes[device_class] = now
            first_ops = self.planner.register(device_class, supported)
            todo = (
                [(b, sorted(self._levels.get(cid, ()))) for cid, b in self._built.items()] if new or first_ops else []
            )
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
        info = {
            "backend": device.backend,
            "cpu": device.cpu,
            "gpu": device.gpu,
            "hostname": link.info.hostname if link.info else "",
            "agent": link.address,
            "runtime_versions": versions,
            "simulated": device.simulated,
            "simulated_latency_ms_per_sample": device.simulated_latency_ms_per_sample,
            "device_name": device.name,
            "target": device.target,
            "rpc_key": device.rpc_key,
            "remote": device.remote,
            "remote_servers": device.remote_servers,
            "tvm_version": versions.get("tvm", ""),
            "supported_ops": len(device.supported_ops),
            "capabilities": list(device.capabilities),
        }
        if self._register_class(device.device_class, info, time.monotonic(), frozenset(device.supported_ops)):
            log.info("device class %s: first served by %s (%s)", device.device_class, link.address, device.name)

    def _watch_liveness(self) -> None:
        """Apply the liveness decisions (controller/farm/liveness.py): classes seen, released, given up."""
        with self._lock:
            classes = dict(self._classes)
        for d in self.liveness.watch(self.links, classes, time.monotonic()):
            if isinstance(d, Seen):
                with self._lock:
                    self._classes[d.device_class] = d.at
                self._gone.discard(d.device_class)
            elif isinstance(d, Release):
                self._release_unknown(d.device_class)
            elif isinstance(d, GiveUp) and self.board.unfinished(d.device_class):
                n = self.board.give_up(d.device_class, d.reason)
                if d.device_class not in self._gone:  # later jobs of a class already given up end quietly
                    self._gone.add(d.device_class)
                    msg = d.message.replace("{n}", str(n))
                    log.error(msg)
                    self.errors.append(msg)
                self._changed.set()

    def _release_unknown(self, device_class: str) -> None:
        """A declared class no device of which ever connected: its held jobs are added (to end unreachable)."""
        if not self.planner.release(device_class):
            return
        with self._lock:
            todo = [(b, sorted(self._levels.get(cid, ()))) for cid, b in self._built.items()]
        for b, levels in todo:
            for level in levels:
                self._add_jobs(b, device_class, level)

    def _awaited(self, started: float) -> bool:
        """Whether some configured agent never answered yet and may still bring a new device class."""
        return self.liveness.awaited(self.links, started, time.monotonic())

    def _total(self) -> int:
        with self._lock:
            return len(self._job_ids)

    def _on_result(self, job_id: str) -> None:
        accuracy.on_result(self.store, job_id)
        self._results_changed.set()
        self._changed.set()

    def _on_final(self, job_id: str) -> None:
        """A job ended without a result (failed for good, infeasible): the searches may go on."""
        self._results_changed.set()
        self._changed.set()


def tune(study: Study, endpoints: list[Endpoint], settings: FarmSettings, **hooks: Unpack[RunHooks]) -> TuneOutcome:
    """Run the whole study on the agents (a local one when none is given); problems are in ``errors``;
    ``on_status`` gets each agent's state and what the run waits for, every half second."""
    return StudyRun(study, endpoints, settings, **hooks).run()
