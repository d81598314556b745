"""The strategy interface: a strategy asks for evaluations; the orchestrator builds and runs them.

A search is a (ranking, strategy) pair over every (model, recipe) of the study. The
orchestrator asks each search's :meth:`Strategy.propose` at the start and again whenever
results arrive, builds what it asks for (in the background, overlapping evaluation) and
hands the jobs to the dispatcher; the study ends when every strategy is :meth:`done` and
every job is final. A strategy sees the study only through :class:`SearchView`, so it can
be replayed from the checkpoint: given the same stored results it asks for the same
candidates (a resumed study ends with the same outcome).

Levels of a request (cheap first, exact last):

* ``build``: only build the candidate (its size is then known; no device is involved). Sizes of
  static QDQ candidates are predicted exactly without a build (:meth:`SearchView.size`), so a strategy
  asks for builds only where :meth:`SearchView.size_needs_build` says so;
* ``screen``: evaluate it on the recipe's screening sample (``search.screen_samples`` samples of
  the evaluation sample where its fully quantized model disagrees with FP32 or is least sure),
  without latency, on every device class (a screening result; never on a front);
* ``full``: evaluate it on the whole evaluation sample with latency (the results fronts use).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tuneqn.controller.config import SearchRun, SearchSpec, StudyConfig
    from tuneqn.controller.prepare.modelio import PreparedModel
    from tuneqn.controller.store import Store
    from tuneqn.controller.study import CandidatePlan

LEVELS = ("build", "screen", "full")


@dataclass(frozen=True)
class Request:
    """Evaluate ``plan`` at ``level``; ``label`` is how the search names it (shown in the report)."""

    plan: CandidatePlan
    level: str
    label: str = ""


@dataclass(frozen=True)
class Outcome:
    """A candidate's results at one level on every device class of the study.

    ``per_device[device]`` has ``agreement``, ``overlap`` (mean share of the FP32 top-k found
    in the candidate's top-k), ``accuracy``, ``latency_ms``, ``latency_p10_ms``, ``latency_p90_ms``
    (None where not measured).
    ``failed`` lists the devices where the evaluation failed or was unreachable.
    """

    candidate_id: str
    size_bytes: int
    per_device: dict[str, dict[str, float | None]]
    failed: tuple[str, ...] = ()
    #: Per device, the positions (in the evaluated sample) where top-1 differs from FP32.
    wrong: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: For a screening outcome: the size of the whole evaluation sample it was chosen from.
    full_samples: int = 0

    @property
    def estimated_loss(self) -> float | None:
        """The accuracy loss a full evaluation would show (worst device).

        A full outcome's own loss. A screening sample holds every sample where the recipe's
        fully quantized model disagrees with FP32 plus its least sure agreements, so a
        candidate's disagreements on the whole sample are (nearly) all inside it: its full loss
        is estimated as its disagreements on the screen over the whole sample's size.
        """
        if not self.full_samples or not self.wrong or self.failed:
            return self.loss
        return max(len(w) for w in self.wrong.values()) / self.full_samples

    def disagreeing(self) -> frozenset[tuple[str, int]]:
        """(device, sample position) pairs where the candidate's top-1 differs from FP32's."""
        return frozenset((d, i) for d, idx in self.wrong.items() for i in idx)

    def worst(self, metric: str) -> float | None:
        """The lowest value of ``metric`` over the devices (None if any device lacks it)."""
        values = [m.get(metric) for d, m in self.per_device.items() if d not in self.failed]
        if not values or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
            return None
        return float(min(v for v in values if v is not None))

    @property
    def loss(self) -> float | None:
        """Accuracy loss vs FP32 on the worst device: 1 − agreement (None if unknown)."""
        a = self.worst("agreement")
        return None if a is None else 1.0 - a


class ViewSource(Protocol):
    """What a :class:`SearchView` reads (implemented by the orchestrator over the study)."""

    def view_devices(self) -> list[str]: ...
    def view_concurrency(self, model: str, recipe: str) -> int: ...
    def view_size(self, plan: CandidatePlan) -> int | None: ...
    def view_outcome(self, plan: CandidatePlan, level: str) -> Outcome | None: ...


class ViewStudy(Protocol):
    """What a :class:`SearchView` reads of the study (implemented by :class:`~tuneqn.controller.study.Study`)."""

    @property
    def cfg(self) -> StudyConfig: ...
    @property
    def models(self) -> Mapping[str, PreparedModel]: ...
    @property
    def store(self) -> Store: ...
    def recipes(self) -> list[str]: ...
    def layer_names(self, model: str, recipe: str) -> list[str]: ...
    def ranking(self, model: str, recipe: str, name: str) -> list[str]: ...
    def make_plan(
        self,
        model: str,
        recipe: str,
        excluded: tuple[str, ...] | list[str],
        label: str = "",
        kind: str = "set",
        levels: Mapping[str, str] | None = None,
    ) -> CandidatePlan: ...
    def prefix_plans(
        self, model: str, recipe: str, order: list[str], label: str = "k=", base: Mapping[str, str] | None = None
    ) -> list[CandidatePlan]: ...
    def explicit_plans(self, model: str, recipe: str) -> list[CandidatePlan]: ...


class SearchView:
    """What a strategy may look at: the study's layers, rankings and sizes, and the results so far."""

    def __init__(self, study: ViewStudy, source: ViewSource) -> None:
        self._study = study
        self._source = source
        self._widths: dict[tuple[str, str, str], dict[int, int]] = {}  # (search, model, recipe) -> step -> width

    # ---------------------------------------------------------------- the study
    @property
    def search(self) -> SearchSpec:
        """The study's ``[search]`` settings (step, max_k, screen_samples, regain_every, …)."""
        return self._study.cfg.search

    def models(self) -> list[str]:
        """Model names of the study."""
        return list(self._study.models)

    def recipes(self) -> list[str]:
        """Recipe names of the study."""
        return self._study.recipes()

    def pairs(self) -> list[tuple[str, str]]:
        """The (model, recipe) pairs to search now: every model × recipe, or what the source plans
        (``view_pairs``: variant recipes planned for devices that cannot run a recipe appear later,
        a recipe no device runs any more drops out)."""
        planned = getattr(self._source, "view_pairs", None)  # optional in a ViewSource
        if planned is not None:
            return list(planned())
        return [(m, r) for m in self.models() for r in self.recipes()]

    def base_recipe(self, recipe: str) -> str:
        """The study recipe that ``recipe`` is (a variant planned for a device names the recipe it derives from)."""
        base = getattr(self._study, "variant_base", None)
        return (base(recipe) if base is not None else None) or recipe

    def pairs_settled(self) -> bool:
        """False while more pairs may still come (the recipe gate has not decided which auto recipes go on
        to the search: ``view_pairs_settled``, optional in a ViewSource)."""
        settled = getattr(self._source, "view_pairs_settled", None)
        return True if settled is None else bool(settled())

    def objectives(self) -> list[tuple[str, str]]:
        """(name, direction) of the study's objectives."""
        return [(o.name, o.resolved_direction) for o in self._study.cfg.objectives]

    def layers(self, model: str, recipe: str) -> list[str]:
        """Quantizable layers of (model, recipe) in graph order."""
        return self._study.layer_names(model, recipe)

    def ranking(self, model: str, recipe: str, name: str) -> list[str]:
        """An error ranking (``paper``, ``qdq``, ``xmodel``) of (model, recipe), most sensitive first."""
        return self._study.ranking(model, recipe, name)

    def plan(
        self,
        model: str,
        recipe: str,
        excluded: tuple[str, ...] | list[str],
        label: str = "",
        levels: Mapping[str, str] | None = None,
    ) -> CandidatePlan:
        """The candidate of (model, recipe) keeping ``excluded`` in float and the layers of ``levels`` at their
        precision level (:mod:`tuneqn.controller.quantize.levels`; id from its content)."""
        return self._study.make_plan(model, recipe, excluded, label, levels=levels)

    def prefix_plans(
        self, model: str, recipe: str, order: list[str], label: str = "k=", base: Mapping[str, str] | None = None
    ) -> list[CandidatePlan]:
        """The paper's candidates over ``order`` (k = 0, step, … ≤ max_k); with ``base``, each on top of those
        precision levels (its float layers aside)."""
        return self._study.prefix_plans(model, recipe, order, label, base)

    def levels_supported(self, recipe: str) -> bool:
        """Whether ``recipe``'s candidates can take precision levels other than fp32 and int8 (static QDQ)."""
        takes = getattr(self._study, "takes_levels", None)  # optional in a ViewStudy (a study without levels)
        return takes is not None and bool(takes(recipe))

    def level_fits(self, model: str, recipe: str, layer: str, level: str) -> bool:
        """Whether ``layer`` of (model, recipe) can take precision ``level`` (builds the fully quantized model
        first if need be)."""
        fits = getattr(self._study, "level_fits", None)  # optional in a ViewStudy, as settings
        return fits is not None and bool(fits(model, recipe, layer, level))

    def explicit_plans(self, model: str, recipe: str) -> list[CandidatePlan]:
        """The study's explicit exclusion sets as candidates of (model, recipe)."""
        return self._study.explicit_plans(model, recipe)

    def fp32_size(self, model: str) -> int:
        """Size in bytes of the (prepared) FP32 model."""
        return int(self._study.models[model].path.stat().st_size)

    def put_ranking(self, model: str, recipe: str, name: str, layers: list[dict[str, Any]]) -> None:
        """Keep a computed ranking (layers in rank order, each a dict with at least ``name``) in the store."""
        self._study.store.put_ranking(model, recipe, name, "", layers)

    # ---------------------------------------------------------------- results so far
    def devices(self) -> list[str]:
        """Device classes of the study so far."""
        return self._source.view_devices()

    def concurrency(self, model: str, recipe: str) -> int:
        """How many evaluations of (model, recipe) the farm can run at once now (at least 1): the live width,
        which follows the devices as they come and go. Strategies decide with :meth:`width`."""
        return max(1, self._source.view_concurrency(model, recipe))

    def width(self, search: str, model: str, recipe: str, step: int) -> int:
        """The width of decision ``step`` of ``search`` on (model, recipe): the one it was taken with (kept in
        the store by :meth:`took`), else the live :meth:`concurrency` (a step not taken yet)."""
        taken = self._taken(search, model, recipe).get(step)
        return taken if taken is not None else self.concurrency(model, recipe)

    def took(self, search: str, model: str, recipe: str, step: int, width: int) -> None:
        """Decision ``step`` was taken with ``width``: keep it, so that a replay (a resumed study) decides it
        the same way whatever devices are live then. The first record of a step stays."""
        taken = self._taken(search, model, recipe)
        if step not in taken:
            taken[step] = width
            self._study.store.put_search_width(search, model, recipe, step, width)

    def _taken(self, search: str, model: str, recipe: str) -> dict[int, int]:
        key = (search, model, recipe)
        if key not in self._widths:
            rows = self._study.store.search_widths(search, model, recipe)
            self._widths[key] = {int(r["step"]): int(r["width"]) for r in rows}
        return self._widths[key]

    def size(self, plan: CandidatePlan) -> int | None:
        """The candidate's exact size in bytes: the built file's, else predicted without a build from its
        recipe's fully quantized model (:meth:`Study.predicted_size`); None while unknown."""
        built = self._source.view_size(plan)
        if built is not None:
            return built
        predict = getattr(self._study, "predicted_size", None)
        return None if predict is None else predict(plan)

    def size_needs_build(self, plan: CandidatePlan) -> bool:
        """Whether only a build tells the candidate's size (its recipe's candidates are not derived by graph
        edits, or this one is not): a strategy that needs the size then asks for a ``build``. False once the
        size is known and while a prediction waits for the recipe's fully quantized model."""
        if self._source.view_size(plan) is not None:
            return False
        needs = getattr(self._study, "size_needs_build", None)
        return True if needs is None else bool(needs(plan))

    def outcome(self, plan: CandidatePlan, level: str) -> Outcome | None:
        """Results of ``plan`` at ``level`` on every device class (None while any is unfinished)."""
        return self._source.view_outcome(plan, level)

    def recipe_rank(self, model: str, recipe: str) -> int:
        """Where (model, recipe)'s search comes in the model's order (lower first: the order devices take its jobs
        in; a variant shares its recipe's), a function of stored results (``view_recipe_rank``, optional in a
        ViewSource; without it every recipe ranks the same)."""
        rank = getattr(self._source, "view_recipe_rank", None)
        return 0 if rank is None else int(rank(model, recipe))

    def blocked(self, model: str, recipe: str) -> str | None:
        """Why the search of (model, recipe) cannot go on (None: it can): on every device class the recipe
        runs on, the FP32 model or its fully quantized model ended without a result, so nothing can be
        compared or screened there (``view_blocked``, optional in a ViewSource)."""
        blocked = getattr(self._source, "view_blocked", None)
        return None if blocked is None else blocked(model, recipe)


class Strategy(abc.ABC):
    """Asks for evaluations of one search (a ranking and a strategy) over every (model, recipe)."""

    def __init__(self, view: SearchView, run: SearchRun) -> None:
        self.view = view
        self.run = run
        self.name = run.name

    @abc.abstractmethod
    def propose(self) -> list[Request]:
        """Everything the strategy asks for, given the results so far (the same request again is
        ignored; a request whose result is in, maybe from another search, still counts as this
        search's: it is recorded as its proposal)."""

    @abc.abstractmethod
    def done(self) -> bool:
        """True once the strategy will ask for nothing more, whatever results still arrive."""


class PairStrategy(abc.ABC):
    """A strategy's work on one (model, recipe)."""

    def __init__(self, view: SearchView, run: SearchRun, model: str, recipe: str) -> None:
        self.view = view
        self.run = run
        self.model = model
        self.recipe = recipe
        #: The search this pair belongs to (set by :class:`PerPair`): a pair may read its siblings' results.
        self.search: PerPair | None = None

    @abc.abstractmethod
    def propose(self) -> list[Request]:
        """What to evaluate next."""

    @abc.abstractmethod
    def done(self) -> bool:
        """Nothing more to ask for."""


class ReplayPair(PairStrategy):
    """A pair strategy that recomputes its whole search from the results at every call (so a fresh
    object on a resumed study's stored results decides exactly as the first one did).

    How many evaluations it keeps in flight (its width) may change as devices come and go. A decision
    that depends on it is a numbered step of the walk: :meth:`_width` gives the width the step was
    taken with, or the live one for a step not taken yet, and :meth:`_took` records it when the step
    is taken (the store keeps it), so a replay takes every past step with its own width."""

    _final: list[Request] | None = None  # every request of the walk that found the search done (then it is done)
    _last: list[Request]  # every request of the latest walk (set by _step_walk)

    def _width(self, step: int) -> int:
        """The width of decision ``step``: as taken, else the live width."""
        return self.view.width(self.run.name, self.model, self.recipe, step)

    def _took(self, step: int, width: int) -> None:
        """Decision ``step`` is taken with ``width``."""
        self.view.took(self.run.name, self.model, self.recipe, step, width)

    @abc.abstractmethod
    def _walk(self) -> tuple[list[Request], bool]:
        """Every request from the start as far as the results allow, and whether the search is done."""

    def propose(self) -> list[Request]:
        """Everything the search asked for so far (once it is done: everything it asked for in all)."""
        if self._final is None:
            self._step_walk()
        return self._final if self._final is not None else self._last

    def done(self) -> bool:
        """The search is over (see the strategy's docstring for when)."""
        if self._final is None:
            self._step_walk()
        return self._final is not None

    def _step_walk(self) -> None:
        """Walk once; a walk that ends the search keeps its requests: they are the search's proposals, whether
        the search ended while it ran or was over from the start (a resumed study), and they never change."""
        self._last, done = self._walk()
        if done:
            self._final = self._last


@dataclass
class PerPair(Strategy):
    """A strategy that runs one :class:`PairStrategy` per (model, recipe) of :meth:`SearchView.pairs` (of the
    run's ``recipes`` only, when it names some); pairs that appear later (a variant recipe planned for a
    device) get their own search then, and a pair that drops out (no device runs its recipe) is no longer
    waited for. A pair whose search cannot go on (:meth:`SearchView.blocked`: FP32 or the fully quantized
    model ended without a result on every class) is over, whatever its strategy waits for: the one rule
    that ends every strategy."""

    view: SearchView
    run: SearchRun
    pair_cls: type[PairStrategy]
    pairs: list[PairStrategy] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name = self.run.name
        self._all: dict[tuple[str, str], PairStrategy] = {}
        self._handed: set[tuple[str, str]] = set()  # done pairs whose every request was handed out
        self._sync()

    def _sync(self) -> None:
        only = self.run.recipes
        keys = [(m, r) for m, r in self.view.pairs() if only is None or self.view.base_recipe(r) in only]
        for m, r in keys:
            if (m, r) not in self._all:
                self._all[(m, r)] = pair = self.pair_cls(self.view, self.run, m, r)
                pair.search = self
        self.pairs = [self._all[k] for k in keys]

    def propose(self) -> list[Request]:
        """Every pair's requests. A pair that is done hands its requests once more, all of them: what it asked
        for in its last walk is recorded as its proposals even when that walk found it done (so a study
        resumed after the search ended records what an uninterrupted one does); a blocked pair asks for
        nothing."""
        self._sync()
        reqs: list[Request] = []
        for p in self.pairs:
            key = (p.model, p.recipe)
            if key in self._handed or self.view.blocked(p.model, p.recipe) is not None:
                continue
            reqs += p.propose()
            if p.done():
                self._handed.add(key)
        return reqs

    def over(self, pair: PairStrategy) -> bool:
        """The pair's search is done or cannot go on (blocked)."""
        return pair.done() or self.view.blocked(pair.model, pair.recipe) is not None

    def earlier(self, pair: PairStrategy) -> list[PairStrategy] | None:
        """The pairs of ``pair``'s model whose recipes are searched before its recipe (:meth:`SearchView.recipe_rank`;
        study recipes only, not device variants), once no pair can still come (None before: the answer could
        change)."""
        if not self.view.pairs_settled():
            return None
        self._sync()
        rank = self.view.recipe_rank(pair.model, pair.recipe)
        return [
            p
            for p in self.pairs
            if p.model == pair.model
            and p is not pair
            and self.view.base_recipe(p.recipe) == p.recipe
            and self.view.recipe_rank(p.model, p.recipe) < rank
        ]

    def open_models(self) -> set[str]:
        """Models with a pair whose search is not over (pairs that may still come are not counted)."""
        return {p.model for p in self.pairs if not self.over(p)}

    def done(self) -> bool:
        """All pairs done and their last requests handed out (:meth:`propose`), and no pair can still come
        (the recipe gate decided).

        Settled is read before the pairs: a result that settles the gate between the two reads would
        otherwise end the search with the pairs it just allowed never started."""
        settled = self.view.pairs_settled()
        self._sync()
        # a handed pair is done (propose hands a pair's requests once it is)
        return settled and all(
            (p.model, p.recipe) in self._handed or self.view.blocked(p.model, p.recipe) is not None for p in self.pairs
        )
