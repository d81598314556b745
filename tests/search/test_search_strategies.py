"""Search strategies (greedy, budget, target) on constructed problems whose answers are known.

A study-like object gives the real config, candidate plans (real ``Study.make_plan`` /
``prefix_plans``) and a real SQLite store; a farm answers the strategies' requests from a
known function of the excluded set (per-layer "damage" with interactions; size = base + the
bytes of the layers kept in float), a few at a time and out of order, like agents would.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from tuneqn.controller.config import StudyConfig, parse_config
from tuneqn.controller.search import Outcome, Request, SearchView, Strategy, make_strategy
from tuneqn.controller.store import Store
from tuneqn.controller.study import CandidatePlan, Study, candidate_id

SCREEN = 32  # screening sample: agreement is known to 1/32 only


# --------------------------------------------------------------------------- the constructed problems
@dataclass
class Problem:
    """Agreement with FP32 of any exclusion set, per device: 1 − the damage of the quantized layers."""

    layers: list[str]
    error_ranking: list[str]
    nbytes: dict[str, int]
    damage: dict[str, dict[str, float]]  # device -> layer -> agreement lost while it is quantized
    pairs: dict[str, list[tuple[str, str, float]]] = field(default_factory=dict)  # lost while both are
    base: int = 10_000

    def loss(self, device: str, excluded: tuple[str, ...]) -> float:
        quantized = set(self.layers) - set(excluded)
        total = sum(v for name, v in self.damage[device].items() if name in quantized)
        total += sum(v for a, b, v in self.pairs.get(device, []) if a in quantized and b in quantized)
        return round(min(1.0, total), 9)

    def size(self, excluded: tuple[str, ...]) -> int:
        return self.base + sum(self.nbytes[name] for name in excluded)

    def plan_size(self, plan: CandidatePlan) -> int:
        return self.size(plan.excluded)

    def outcome(self, plan: CandidatePlan, level: str) -> Outcome:
        per: dict[str, dict[str, float | None]] = {}
        for device in sorted(self.damage):
            loss = self.loss(device, plan.excluded)
            agreement = 1.0 - loss if level == "full" else round((1.0 - loss) * SCREEN) / SCREEN
            per[device] = {
                "agreement": agreement,
                "overlap": 1.0 - loss / 2,
                "accuracy": None,
                "accuracy_top5": None,
                "latency_ms": 10.0 + 0.5 * len(plan.excluded) if level == "full" else None,
            }
        return Outcome(plan.id, self.size(plan.excluded), per)


def interaction_problem() -> Problem:
    """12 layers. The smallest set with loss ≤ 1 % on both devices is {t1, big, c, d}: t1 and t2
    (tiny) cost 6 % only when both are quantized (t1 has fewer bytes), big and c cost on both
    devices, d only on the npu; s1 and s2 cost 0.4 % each (together within 1 %). The error
    ranking puts what matters last."""
    layers = ["z1", "t1", "s1", "big", "z2", "c", "t2", "z3", "d", "s2", "z4", "z5"]
    nbytes = {name: 100 for name in layers} | {"t1": 10, "t2": 20, "big": 400}
    common = {"big": 0.04, "c": 0.03, "s1": 0.004, "s2": 0.004}
    return Problem(
        layers=layers,
        error_ranking=["s1", "z1", "s2", "z2", "z3", "z4", "z5", "c", "big", "d", "t2", "t1"],
        nbytes=nbytes,
        damage={"cpu": dict(common), "npu": common | {"d": 0.02}},
        pairs={dev: [("t1", "t2", 0.06)] for dev in ("cpu", "npu")},
    )


def monotone_problem(n: int = 60) -> Problem:
    """n layers of varied size; along the error ranking the loss drops at three places (two on the
    cpu, three on the npu)."""
    layers = [f"L{i:02d}" for i in range(n)]
    ranking = layers[:]
    random.Random(7).shuffle(ranking)
    nbytes = {name: 60 + (i * 37) % 90 for i, name in enumerate(layers)}
    r = ranking
    return Problem(
        layers,
        ranking,
        nbytes,
        damage={"cpu": {r[2]: 0.05, r[n // 3]: 0.03}, "npu": {r[2]: 0.05, r[n // 3]: 0.03, r[3 * n // 4]: 0.02}},
    )


# --------------------------------------------------------------------------- study, farm and driver
class FakeStudy:
    """What :class:`SearchView` reads of a study: the real config, plans and store; layers from a problem."""

    make_plan = Study.make_plan
    prefix_plans = Study.prefix_plans
    explicit_plans = Study.explicit_plans

    def __init__(self, cfg: StudyConfig, problem: Problem, store: Store) -> None:
        self.cfg = cfg
        self.problem = problem
        self.store = store
        self.models = {"m": None}

    def recipes(self) -> list[str]:
        return ["static"]

    def layer_names(self, model: str, recipe: str) -> list[str]:
        return list(self.problem.layers)

    def ranking(self, model: str, recipe: str, name: str = "paper") -> list[str]:
        return list(self.problem.error_ranking)


class Farm:
    """The :class:`ViewSource` of the tests: answers requests from the problem, one at a time, choosing
    at random among the ``width`` oldest (the ones "running"); builds are answered first (no device)."""

    def __init__(self, problem: Problem, width: int = 2, seed: int = 0) -> None:
        self.problem = problem
        self.width = width
        self.rng = random.Random(seed)
        self.results: dict[tuple[str, str], Outcome] = {}
        self.sizes: dict[str, int] = {}
        self.asked: set[tuple[str, str]] = set()
        self.queue: list[Request] = []
        self.answered: Counter[str] = Counter()
        self.batches: list[list[Request]] = []  # what each ask added
        #: A resumed study's checkpoint, as the orchestrator shows it: a stored result is seen
        #: only once its candidate is asked for again at that level (then at once).
        self.stored: dict[tuple[str, str], Outcome] = {}
        self.stored_sizes: dict[str, int] = {}
        self.revealed = False  # the last ask was answered from the checkpoint: ask again

    def view_devices(self) -> list[str]:
        return sorted(self.problem.damage)

    def view_concurrency(self, model: str, recipe: str) -> int:
        return self.width

    def view_size(self, plan: CandidatePlan) -> int | None:
        return self.sizes.get(plan.id)

    def view_outcome(self, plan: CandidatePlan, level: str) -> Outcome | None:
        return self.results.get((plan.id, level))

    def ask(self, requests: list[Request]) -> list[Request]:
        """Queue what is new (the orchestrator dedupes by (candidate, level)); returns the new ones."""
        new = []
        self.revealed = False
        for req in requests:
            key = (req.plan.id, req.level)
            if key in self.stored:
                self.results[key] = self.stored.pop(key)
                self.revealed = True
            if req.plan.id in self.stored_sizes:
                self.sizes[req.plan.id] = self.stored_sizes.pop(req.plan.id)
                self.revealed = True
            if key not in self.asked:
                self.asked.add(key)
                self.queue.append(req)
                new.append(req)
        self.batches.append(new)
        return new

    def answer_one(self) -> None:
        builds = [r for r in self.queue if r.level == "build"]
        if builds:
            for req in builds:
                self.sizes[req.plan.id] = self.problem.plan_size(req.plan)
                self.answered["build"] += 1
            self.queue = [r for r in self.queue if r.level != "build"]
            return
        req = self.queue.pop(self.rng.randrange(min(self.width, len(self.queue))))
        self.results[(req.plan.id, req.level)] = self.problem.outcome(req.plan, req.level)
        self.sizes[req.plan.id] = self.problem.plan_size(req.plan)
        self.answered[req.level] += 1

    def evaluations(self) -> int:
        return self.answered["screen"] + self.answered["full"]

    def resumed(self, seed: int, *, hidden: bool) -> Farm:
        """A farm with this one's answers only (what a killed study's checkpoint holds): visible at
        once, or (``hidden``) each only once asked for again."""
        other = Farm(self.problem, self.width, seed)
        if hidden:
            other.stored, other.stored_sizes = dict(self.results), dict(self.sizes)
        else:
            other.results, other.sizes = dict(self.results), dict(self.sizes)
        other.asked = set(self.results) | {(cid, "build") for cid in self.sizes}
        other.answered = Counter(self.answered)
        return other


def drive(strategy: Strategy, farm: Farm, stop_after: int | None = None) -> None:
    """Ask, answer one, ask again … until the strategy is done and nothing is queued."""
    for _ in range(100_000):
        farm.ask(strategy.propose())
        if stop_after is not None and farm.evaluations() >= stop_after:
            return
        if farm.revealed:
            continue
        if not farm.queue:
            if not strategy.done():
                raise RuntimeError("the strategy waits for nothing but is not done")
            return
        farm.answer_one()
    raise RuntimeError("the strategy never ended")


def setup(
    tmp_path: Path,
    problem: Problem,
    width: int = 2,
    seed: int = 0,
    objectives: tuple[str, ...] = (),
    study_cls: type[FakeStudy] = FakeStudy,
    **search: Any,
) -> tuple[Strategy, Farm, FakeStudy]:
    data: dict[str, Any] = {
        "models": [{"path": "m.onnx", "name": "m"}],
        "dataset": {"images": "images"},
        "quantization": {"modes": ["static"]},
        "search": search,
    }
    if objectives:
        data["objectives"] = [{"name": name} for name in objectives]
    cfg = parse_config(data, tmp_path)
    study = study_cls(cfg, problem, Store(tmp_path / "tuneqn.db"))
    farm = Farm(problem, width, seed)
    return make_strategy(cfg.search.runs()[0], SearchView(study, farm)), farm, study


def fresh(study: FakeStudy, farm: Farm) -> Strategy:
    """A new strategy object over ``farm``'s results (a resumed study)."""
    return make_strategy(study.cfg.search.runs()[0], SearchView(study, farm))


def plan_of(excluded: set[str]) -> str:
    return candidate_id("m", "static", tuple(sorted(excluded)))


def final_state(strategy: Strategy) -> Any:
    pair = strategy.pairs[0]  # type: ignore[attr-defined]
    if hasattr(pair, "found"):
        found = pair.found()
        return None if found is None else found.id
    if hasattr(pair, "chosen"):
        return [p.id for p in pair.chosen]
    return pair.current_set()


def front(points: dict[str, tuple[float, ...]]) -> set[str]:
    """Ids of the points no other point is at least as good as in every objective (all minimised)."""

    def covers(p: tuple[float, ...], q: tuple[float, ...]) -> bool:
        return all(a <= b for a, b in zip(p, q, strict=True)) and p != q

    return {i for i, q in points.items() if not any(covers(p, q) for j, p in points.items() if j != i)}


def full_front(problem: Problem, farm: Farm, ids: set[str]) -> set[str]:
    """The union over devices of the fronts (accuracy loss, size, latency) of ``ids``' full results."""
    out: set[str] = set()
    for device in sorted(problem.damage):
        pts = {
            cid: (
                1.0 - farm.results[(cid, "full")].per_device[device]["agreement"],  # type: ignore[operator]
                float(farm.results[(cid, "full")].size_bytes),
                farm.results[(cid, "full")].per_device[device]["latency_ms"],
            )
            for cid in ids
        }
        out |= front(pts)  # type: ignore[arg-type]
    return out


def fulls(farm: Farm) -> set[str]:
    return {cid for cid, level in farm.results if level == "full"}


# --------------------------------------------------------------------------- budget
class FlatLatencyProblem(Problem):
    """Latency flat in k (10 ms) measured with noise: the median off by up to ± ``noise`` ms (seeded by
    the candidate), the p10–p90 interval ± ``spread`` ms around it."""

    noise = 0.0
    spread = 0.0

    def outcome(self, plan: CandidatePlan, level: str) -> Outcome:
        out = super().outcome(plan, level)
        if level == "full":
            rng = random.Random(plan.id)
            for m in out.per_device.values():
                med = 10.0 + rng.uniform(-self.noise, self.noise)
                m.update(latency_ms=med, latency_p10_ms=med - self.spread, latency_p90_ms=med + self.spread)
        return out


def _flat_budget(tmp_path: Path, noise: float, spread: float) -> int:
    base = monotone_problem(80)
    problem = FlatLatencyProblem(base.layers, base.error_ranking, base.nbytes, base.damage)
    problem.noise, problem.spread = noise, spread
    budget, farm, _ = setup(
        tmp_path,
        problem,
        2,
        objectives=("accuracy_loss", "size", "latency"),
        strategy="budget",
        ranking="paper",
        budget=len(problem.layers) + 1,
    )
    drive(budget, farm)
    return farm.answered["full"]


def test_budget_does_not_bisect_a_segment_flat_within_the_noise(tmp_path: Path) -> None:
    """Latency the same for every k, measured ± 0.3 ms: noise alone must not make budget bisect a flat
    segment (main compared raw medians: 17 evaluations without noise, 40 with it)."""
    quiet = _flat_budget(tmp_path / "quiet", 0.0, 0.0)
    noisy = _flat_budget(tmp_path / "noisy", 0.3, 0.3)
    assert quiet == 17 and noisy == quiet


@pytest.mark.parametrize("width", [1, 4])
def test_budget_finds_the_sweeps_front_with_30_percent_of_its_evaluations(tmp_path: Path, width: int) -> None:
    problem = monotone_problem(80)
    objectives = ("accuracy_loss", "size", "latency")
    sweep, sweep_farm, _ = setup(
        tmp_path / "sweep", problem, width, objectives=objectives, strategy="sweep", ranking="paper"
    )
    drive(sweep, sweep_farm)
    budget, farm, _ = setup(
        tmp_path / "budget", problem, width, objectives=objectives, strategy="budget", ranking="paper"
    )
    drive(budget, farm)

    assert sweep_farm.answered["full"] == len(problem.layers) + 1
    known = full_front(problem, sweep_farm, fulls(sweep_farm))
    assert known <= fulls(farm), "the budget missed points of the sweep's front"
    assert full_front(problem, farm, fulls(farm)) == known
    assert farm.answered["full"] <= 0.3 * sweep_farm.answered["full"]
    assert farm.answered["screen"] == 0
    assert farm.answered["build"] == sweep_farm.answered["full"]  # every size is known without a device


def test_budget_asks_for_concurrency_evaluations_at_once(tmp_path: Path) -> None:
    budget, farm, _ = setup(tmp_path, monotone_problem(), 4, strategy="budget", ranking="paper")
    first = farm.ask(budget.propose())
    assert sorted(r.level for r in first if r.level != "build") == ["full", "full"]  # first and last
    drive(budget, farm, stop_after=2)  # both in (and every size)
    assert [r.level for r in farm.batches[-1]] == ["full"] * 4


class PredictingStudy(FakeStudy):
    """A study that knows every candidate's exact size without a build (static QDQ recipes: Study.predicted_size)."""

    def predicted_size(self, plan: CandidatePlan) -> int:
        return self.problem.size(plan.excluded)

    def size_needs_build(self, plan: CandidatePlan) -> bool:
        return False


@pytest.mark.parametrize("ranking", ["paper", "measured"])
def test_budget_builds_nothing_for_the_sizes_it_can_predict(tmp_path: Path, ranking: str) -> None:
    """Predicted sizes: no prefix is built "so sizes are known", and the same candidates are evaluated."""
    problem = monotone_problem(30)
    built, built_farm, _ = setup(tmp_path / "built", problem, 2, strategy="budget", ranking=ranking)
    drive(built, built_farm)
    assert built_farm.answered["build"] > 0
    predicted, farm, _ = setup(
        tmp_path / "predicted", problem, 2, study_cls=PredictingStudy, strategy="budget", ranking=ranking
    )
    drive(predicted, farm)
    assert farm.answered["build"] == 0
    assert fulls(farm) == fulls(built_farm)
    assert predicted.done()


def test_budget_with_measured_ranking_counts_only_full_evaluations(tmp_path: Path) -> None:
    problem = monotone_problem(20)
    budget, farm, _ = setup(tmp_path, problem, 2, strategy="budget", ranking="measured", budget=5)
    drive(budget, farm)
    assert farm.answered["screen"] == len(problem.layers) + 1  # the ranking: base + one per layer
    assert farm.answered["full"] <= 5
    assert budget.done()


def test_budget_stops_when_nothing_can_enter(tmp_path: Path) -> None:
    """One step of loss: once it is pinned down no other candidate can enter, whatever the budget."""
    problem = monotone_problem(30)
    r = problem.error_ranking
    problem.damage = {"cpu": {r[9]: 0.1}}
    budget, farm, _ = setup(tmp_path, problem, 1, strategy="budget", ranking="paper", budget=31)
    drive(budget, farm)
    assert plan_of(set(r[:10])) in fulls(farm) and plan_of(set(r[:9])) in fulls(farm)
    assert farm.answered["full"] <= 2 + 6  # first, last and a bisection of 30


# --------------------------------------------------------------------------- target
def test_target_finds_the_smallest_set_and_confirms_it_in_full(tmp_path: Path) -> None:
    problem = interaction_problem()
    target, farm, _ = setup(tmp_path, problem, 3, strategy="target", ranking="measured", max_loss=0.01)
    drive(target, farm)
    answer = target.pairs[0].found()  # type: ignore[attr-defined]
    assert answer is not None and set(answer.excluded) == {"t1", "big", "c", "d"}
    confirmed = farm.results[(answer.id, "full")]
    assert confirmed.loss is not None and confirmed.loss <= 0.01 + 1e-9
    # it is the smallest of all sets that meet 1 % on both devices (exhaustively over 2^12 sets)
    best = min(
        problem.size(tuple(s))
        for s in _subsets(problem.layers)
        if all(problem.loss(d, tuple(s)) <= 0.01 for d in problem.damage)
    )
    assert confirmed.size_bytes == best
    assert set(answer.excluded) not in [set(problem.error_ranking[:k]) for k in range(13)]
    assert farm.answered["full"] < 10


def test_target_from_an_error_ranking_shrinks_to_a_local_minimum(tmp_path: Path) -> None:
    """The paper ranking puts t2 before t1: the first prefix that meets 1 % holds t2 and not t1, and
    removing one layer at a time cannot swap t2 for the cheaper t1."""
    problem = interaction_problem()
    target, farm, _ = setup(tmp_path, problem, 3, strategy="target", ranking="paper", max_loss=0.01)
    drive(target, farm)
    answer = target.pairs[0].found()  # type: ignore[attr-defined]
    assert answer is not None and set(answer.excluded) == {"t2", "big", "c", "d"}
    assert (answer.id, "full") in farm.results
    for name in answer.excluded:  # no layer of it can go
        assert max(problem.loss(d, tuple(x for x in answer.excluded if x != name)) for d in problem.damage) > 0.01


@pytest.mark.parametrize("ranking", ["measured", "paper"])
def test_target_on_many_small_losses_ends_in_a_set_no_layer_can_leave(tmp_path: Path, ranking: str) -> None:
    """40 layers, a third harmless, the others costing 0.2 % to 3 % (the error ranking is reversed):
    the answer meets 1 % in full, and removing any one of its layers would break 1 %."""
    layers = [f"L{i:02d}" for i in range(40)]
    rng = random.Random(1)
    damage = {name: rng.choice([0.0, 0.0, 0.0, 0.002, 0.004, 0.01, 0.03]) for name in layers}
    problem = Problem(
        layers, layers[::-1], {name: rng.randint(50, 5000) for name in layers}, damage={"cpu": damage, "npu": damage}
    )
    target, farm, _ = setup(tmp_path, problem, 4, strategy="target", ranking=ranking, max_loss=0.01)
    drive(target, farm)
    answer = target.pairs[0].found()  # type: ignore[attr-defined]
    assert answer is not None and problem.loss("cpu", answer.excluded) <= 0.01
    for name in answer.excluded:
        assert problem.loss("cpu", tuple(x for x in answer.excluded if x != name)) > 0.01, name
    meeting = [
        out.size_bytes
        for (cid, level), out in farm.results.items()
        if level == "full" and out.loss is not None and out.loss <= 0.01 + 1e-9
    ]
    assert farm.results[(answer.id, "full")].size_bytes == min(meeting)
    assert farm.answered["full"] <= 1.5 * len(layers)  # a layer that could not leave is not tried again


def test_target_extends_a_misleading_order_by_measured_gains(tmp_path: Path) -> None:
    """The error ranking puts the one damaging layer 29th of 30: no screened prefix of 24 meets X."""
    layers = [f"L{i:02d}" for i in range(30)]
    problem = Problem(layers, layers, {name: 100 for name in layers}, damage={"cpu": {"L28": 0.2}})
    target, farm, _ = setup(tmp_path, problem, 2, strategy="target", ranking="paper", max_loss=0.01)
    drive(target, farm)
    answer = target.pairs[0].found()  # type: ignore[attr-defined]
    assert answer is not None and answer.excluded == ("L28",)


def test_target_without_an_answer_is_done_with_none(tmp_path: Path) -> None:
    target, farm, _ = setup(
        tmp_path, interaction_problem(), 2, strategy="target", ranking="paper", max_loss=0.01, max_k=2
    )
    drive(target, farm)
    assert target.done() and target.pairs[0].found() is None  # type: ignore[attr-defined]


def _subsets(items: list[str]) -> list[list[str]]:
    return [[x for i, x in enumerate(items) if mask >> i & 1] for mask in range(1 << len(items))]


# --------------------------------------------------------------------------- greedy
def test_greedy_reaches_a_set_no_prefix_of_the_error_ranking_holds(tmp_path: Path) -> None:
    problem = interaction_problem()
    greedy, farm, study = setup(tmp_path, problem, 3, strategy="greedy", ranking="measured", regain_every=2)
    drive(greedy, farm)
    final = set(greedy.pairs[0].current_set())  # type: ignore[attr-defined]
    prefixes = [set(problem.error_ranking[:k]) for k in range(len(problem.layers) + 1)]
    assert final not in prefixes
    assert max(problem.loss(d, tuple(final)) for d in problem.damage) == 0.0  # it stopped at loss 0
    assert plan_of(final) in fulls(farm)
    assert not final & {"z1", "z2", "z3", "z4", "z5"}  # layers that gain nothing are never added
    # every step was evaluated in full; the ranking of the fully quantized model was stored
    steps = [r.label for batch in farm.batches for r in batch if r.label.startswith("step ")]
    assert len(steps) == len(final)
    assert [r["name"] for r in study.store.rankings("m", "static")] == ["measured"]


def test_greedy_from_an_error_ranking_starts_with_its_first_layers(tmp_path: Path) -> None:
    problem = interaction_problem()
    greedy, farm, _ = setup(tmp_path, problem, 2, strategy="greedy", ranking="paper", regain_every=2, max_k=5)
    drive(greedy, farm)
    final = greedy.pairs[0].current_set()  # type: ignore[attr-defined]
    assert final[:2] == tuple(problem.error_ranking[:2]) and len(final) <= 5
    assert plan_of(set(problem.error_ranking[:1])) in fulls(farm)


# --------------------------------------------------------------------------- every strategy
STRATEGIES = {
    "greedy": (interaction_problem, {"strategy": "greedy", "ranking": "measured", "regain_every": 2}),
    "budget": (monotone_problem, {"strategy": "budget", "ranking": "paper"}),
    "target": (interaction_problem, {"strategy": "target", "ranking": "measured", "max_loss": 0.01}),
}


@pytest.mark.parametrize("hidden", [False, True], ids=["stored-visible", "stored-on-ask"])
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_resumed_search_ends_where_the_uninterrupted_one_does(tmp_path: Path, name: str, hidden: bool) -> None:
    make_problem, search = STRATEGIES[name]
    problem = make_problem()
    reference, ref_farm, _ = setup(tmp_path / "ref", problem, 3, seed=1, **search)
    drive(reference, ref_farm)
    first, farm_a, study = setup(tmp_path / "a", problem, 3, seed=2, **search)
    drive(first, farm_a, stop_after=ref_farm.evaluations() // 2)
    farm_b = farm_a.resumed(seed=3, hidden=hidden)  # killed: what was running is lost
    second = fresh(study, farm_b)
    drive(first, farm_a)
    drive(second, farm_b)
    assert not farm_b.stored  # everything stored was asked for again
    assert set(farm_a.results) == set(farm_b.results) == set(ref_farm.results)
    assert final_state(first) == final_state(second) == final_state(reference)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_search_over_from_the_start_hands_out_all_it_asked_for(tmp_path: Path, name: str) -> None:
    """A study resumed after a search ended records that search's proposals as the uninterrupted study did: the
    fresh strategy is done at once, yet hands out every request of the search once (it used to hand out
    nothing, so the resumed checkpoint lacked the proposals of the search's last walk)."""
    make_problem, search = STRATEGIES[name]
    strategy, farm, study = setup(tmp_path, make_problem(), 3, seed=1, **search)
    drive(strategy, farm)
    again = fresh(study, farm.resumed(seed=2, hidden=False))
    assert not again.done()  # over, but its requests are not handed out yet
    # builds are asked for only while a size is unknown
    evaluations = {(cid, level) for cid, level in farm.asked if level != "build"}
    assert {(r.plan.id, r.level) for r in again.propose() if r.level != "build"} == evaluations
    assert again.done() and again.propose() == []


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategies_are_deterministic(tmp_path: Path, name: str) -> None:
    make_problem, search = STRATEGIES[name]
    runs = []
    for i in range(2):
        strategy, farm, _ = setup(tmp_path / str(i), make_problem(), 3, seed=5, **search)
        asked = []
        for _ in range(100_000):
            asked.append([(r.plan.id, r.level, r.label) for r in farm.ask(strategy.propose())])
            if not farm.queue:
                break
            farm.answer_one()
        runs.append(asked)
    assert runs[0] == runs[1]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategies_keep_every_agent_busy(tmp_path: Path, name: str) -> None:
    """A strategy asks for independent evaluations together (at least ``concurrency`` at once when
    it has them), and never stops asking while it is not done (``drive`` checks that)."""
    make_problem, search = STRATEGIES[name]
    width = 4
    strategy, farm, _ = setup(tmp_path, make_problem(), width, seed=0, **search)
    drive(strategy, farm)
    together = [sum(r.level != "build" for r in batch) for batch in farm.batches]
    assert max(together) >= width
    assert sum(n >= width for n in together) >= 2  # not only once


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategies_evaluate_the_studys_exclusion_sets(tmp_path: Path, name: str) -> None:
    make_problem, search = STRATEGIES[name]
    problem = make_problem()
    mine = problem.layers[:2]
    strategy, farm, _ = setup(tmp_path, problem, 2, exclusion_sets=[{"name": "mine", "layers": mine}], **search)
    drive(strategy, farm)
    assert (plan_of(set(mine)), "full") in farm.results


# --------------------------------------------------------------------------- the width follows the devices
WIDTH_STRATEGIES = {name: STRATEGIES[name] for name in ("budget", "target")}  # the ones whose decisions use it


def _fulls_asked(strategy: Strategy) -> list[str]:
    """The candidates the (only) pair's walk asks for in full so far, in order."""
    pair = strategy.pairs[0]  # type: ignore[attr-defined]
    return list(dict.fromkeys(r.plan.id for r in pair.propose() if r.level == "full"))


@pytest.mark.parametrize("later", [1, 5])
@pytest.mark.parametrize("name", sorted(WIDTH_STRATEGIES))
def test_a_resumed_search_takes_its_past_decisions_with_their_widths(tmp_path: Path, name: str, later: int) -> None:
    """Killed with 3 devices live, resumed with ``later``: every decision taken before the kill is taken again
    (the widths it was taken with are in the store); only the steps not taken yet use the new width."""
    make_problem, search = WIDTH_STRATEGIES[name]
    problem = make_problem()
    reference, ref_farm, _ = setup(tmp_path / "ref", problem, 3, seed=1, **search)
    drive(reference, ref_farm)
    first, farm_a, study = setup(tmp_path / "a", problem, 3, seed=2, **search)
    stop = ref_farm.evaluations() // 2
    while not study.store.search_widths():  # killed once some decision used the width
        stop += 1
        drive(first, farm_a, stop_after=stop)
    before = _fulls_asked(first)
    widths = study.store.search_widths()
    assert widths and {r["width"] for r in widths} == {3}
    farm_b = farm_a.resumed(seed=3, hidden=True)
    farm_b.width = later
    second = fresh(study, farm_b)
    drive(second, farm_b)
    assert not farm_b.stored  # everything stored was asked for again
    assert _fulls_asked(second)[: len(before)] == before
    assert [(r["step"], r["width"]) for r in study.store.search_widths()][: len(widths)] == [
        (r["step"], r["width"]) for r in widths
    ]
    # the record matters: the same results replayed without it at another width (1) decide otherwise
    blank, _, _ = setup(tmp_path / "blank", problem, 1, **search)
    other = Farm(problem, 1)
    other.results, other.sizes = dict(farm_a.results), dict(farm_a.sizes)
    blank = make_strategy(blank.run, SearchView(blank.view._study, other))  # type: ignore[attr-defined]
    assert _fulls_asked(blank)[: len(before)] != before


@pytest.mark.parametrize("name", sorted(WIDTH_STRATEGIES))
def test_the_width_follows_the_devices_during_a_search(tmp_path: Path, name: str) -> None:
    """Devices leave (3 → 1) and join (→ 4) while the search runs: each decision is taken with the width of
    its time, recorded per step; a fresh object over the results (any live width) asks for the same."""
    make_problem, search = WIDTH_STRATEGIES[name]
    strategy, farm, study = setup(tmp_path, make_problem(), 3, seed=4, **search)
    for _ in range(100_000):
        taken = len(study.store.search_widths())
        farm.width = 3 if taken < 1 else 1 if taken < 3 else 4  # the live devices after each decision
        farm.ask(strategy.propose())
        if not farm.queue:
            break
        farm.answer_one()
    assert strategy.done()
    recorded = [r["width"] for r in study.store.search_widths()]
    assert len(set(recorded)) >= 2, recorded  # decisions were taken at several widths
    if name == "budget":
        together = [sum(r.level == "full" for r in batch) for batch in farm.batches]
        assert 4 in together  # once 4 devices are live, 4 evaluations are asked for at once
    farm.width = 2
    assert _fulls_asked(fresh(study, farm)) == _fulls_asked(strategy)


def test_a_search_of_some_recipes_takes_their_device_variants_and_nothing_else() -> None:
    """``recipes = ["a"]``: the search has the pairs of recipe a and of the variants planned from it for a device
    (``a.float-Conv``), not those of b; without ``recipes`` it has them all."""
    from tuneqn.controller.config import SearchRun
    from tuneqn.controller.search import PairStrategy, PerPair

    class Study:
        def variant_base(self, recipe: str) -> str | None:
            return recipe.partition(".")[0] if "." in recipe else None

    class Source:
        def view_pairs(self) -> list[tuple[str, str]]:
            return [("m", "a"), ("m", "b"), ("m", "a.float-Conv"), ("m", "b.qdq")]

    class Idle(PairStrategy):
        def propose(self) -> list[Request]:
            return []

        def done(self) -> bool:
            return True

    view = SearchView(Study(), Source())  # type: ignore[arg-type]
    only_a = PerPair(view, SearchRun(recipes=["a"]), Idle)
    assert [(p.model, p.recipe) for p in only_a.pairs] == [("m", "a"), ("m", "a.float-Conv")]
    assert only_a.name == "budget/measured[a]"
    every = PerPair(view, SearchRun(), Idle)
    assert len(every.pairs) == 4 and every.name == "budget/measured"


def test_a_search_that_was_done_asks_again_for_a_pair_that_appears_later() -> None:
    """A variant recipe planned for a device after every pair of a search was over: the search is not done any
    more, and its next proposal holds the new pair's requests (the orchestrator asks a search while it is not
    done; a run once ended here, stuck, when a finished search was never asked again)."""
    from tuneqn.controller.config import SearchRun
    from tuneqn.controller.search import PairStrategy, PerPair

    pairs = [("m", "a")]

    class Source:
        def view_pairs(self) -> list[tuple[str, str]]:
            return list(pairs)

    class Once(PairStrategy):
        def propose(self) -> list[Request]:
            fq = CandidatePlan(f"{self.model}:{self.recipe}:fq", self.model, self.recipe, 0, "set", "fq", ())
            return [Request(fq, "full")]

        def done(self) -> bool:
            return True

    search = PerPair(SearchView(object(), Source()), SearchRun(), Once)  # type: ignore[arg-type]
    assert not search.done()  # over, its requests not handed out yet
    assert [r.plan.mode for r in search.propose()] == ["a"] and search.done()
    pairs.append(("m", "a.qdq"))
    assert not search.done()
    assert [r.plan.mode for r in search.propose()] == ["a.qdq"] and search.done()


class TwoRecipeStudy(FakeStudy):
    """Recipes ``a`` then ``b``."""

    def recipes(self) -> list[str]:
        return ["a", "b"]


class WorseB(Problem):
    """:func:`monotone_problem`, where every candidate of recipe ``b`` agrees with FP32 on 10 % fewer samples."""

    def outcome(self, plan: CandidatePlan, level: str) -> Outcome:
        out = super().outcome(plan, level)
        if plan.mode != "b":
            return out
        per = {d: {**m, "agreement": m["agreement"] - 0.1} for d, m in out.per_device.items()}  # type: ignore[operator]
        return replace(out, per_device=per)


class RankedFarm(Farm):
    """A farm whose source ranks the recipes' searches (``a`` first), as the orchestrator does."""

    ranks: dict[str, int] | None = None

    def view_recipe_rank(self, model: str, recipe: str) -> int:
        return (self.ranks or {}).get(recipe, 0)


def _two_recipe_budget(
    tmp_path: Path, ranked: bool, ranking: str = "paper", seed: int = 0
) -> tuple[Strategy, RankedFarm, FakeStudy]:
    base = monotone_problem()
    problem = WorseB(base.layers, base.error_ranking, base.nbytes, base.damage)
    cfg = parse_config(
        {
            "models": [{"path": "m.onnx", "name": "m"}],
            "dataset": {"images": "images"},
            "quantization": {"modes": ["static"]},
            "search": {"strategy": "budget", "ranking": ranking},
        },
        tmp_path,
    )
    study = TwoRecipeStudy(cfg, problem, Store(tmp_path / "tuneqn.db"))
    farm = RankedFarm(problem, 2, seed)
    farm.ranks = {"a": 0, "b": 1} if ranked else None
    strategy = make_strategy(cfg.search.runs()[0], SearchView(study, farm))
    drive(strategy, farm)
    return strategy, farm, study


def _recipe_fulls(farm: Farm, recipe: str, level: str = "full") -> list[str]:
    return sorted(cid for cid, lv in farm.results if lv == level and cid.split(":")[1] == recipe)


@pytest.mark.parametrize("ranking", ["paper", "measured"])
def test_budget_does_not_evaluate_what_an_earlier_recipes_results_cover(tmp_path: Path, ranking: str) -> None:
    """The top front is the model's, across recipes: a later recipe's segments that the earlier recipe's results
    already cover are not bisected. Here a's fully quantized model is smaller, faster and agrees as well as b's
    best, so b evaluates only its two ends (searched alone, as many as a). With the measured ranking, b's
    layers are not even screened: the two ends, evaluated before the ranking, already show that nothing between
    can enter. Its choices wait for a's search to be over, so a resumed study takes them the same way."""
    _, alone, _ = _two_recipe_budget(tmp_path / "alone", ranked=False, ranking=ranking)
    strategy, farm, study = _two_recipe_budget(tmp_path / "ranked", ranked=True, ranking=ranking)
    assert len(_recipe_fulls(alone, "b")) == len(_recipe_fulls(alone, "a")) > 2
    assert _recipe_fulls(farm, "a") == _recipe_fulls(alone, "a")
    assert len(_recipe_fulls(farm, "b")) == 2  # k = 0 and every layer in float
    if ranking == "measured":
        assert len(_recipe_fulls(alone, "b", "screen")) > 10 and _recipe_fulls(farm, "b", "screen") == []
    resumed = farm.resumed(5, hidden=True)
    again = make_strategy(study.cfg.search.runs()[0], SearchView(study, resumed))
    drive(again, resumed)
    assert _fulls_asked(again) == _fulls_asked(strategy)


# --------------------------------------------------------------------------- precision levels
@dataclass
class LevelProblem(Problem):
    """Samples each quantized layer gets wrong at int8 and at int4; int4 halves a layer's bytes. The screen is
    samples 0–31 of 100 (where the fully quantized model is wrong)."""

    breaks: dict[str, set[int]] = field(default_factory=dict)  # at int8
    breaks4: dict[str, set[int]] = field(default_factory=dict)  # at int4 (int8's breaks when absent)

    def wrong(self, plan: CandidatePlan) -> set[int]:
        levels = plan.level_map()
        out: set[int] = set()
        for name in self.layers:
            level = levels.get(name, "int8")
            if level == "int8":
                out |= self.breaks.get(name, set())
            elif level == "int4":
                out |= self.breaks4.get(name, self.breaks.get(name, set()))
        return out

    def plan_size(self, plan: CandidatePlan) -> int:
        levels = plan.level_map()
        return self.size(plan.excluded) - sum(self.nbytes[n] // 8 for n, lv in levels.items() if lv == "int4")

    def outcome(self, plan: CandidatePlan, level: str) -> Outcome:
        n = 100 if level == "full" else SCREEN
        wrong = sorted(i for i in self.wrong(plan) if i < n)
        per: dict[str, dict[str, float | None]] = {
            "cpu": {
                "agreement": 1.0 - len(wrong) / n,
                "overlap": 1.0 - len(wrong) / (2 * n),
                "accuracy": None,
                "accuracy_top5": None,
                "latency_ms": 10.0 if level == "full" else None,
            }
        }
        full = 100 if level == "screen" else 0
        return Outcome(plan.id, self.plan_size(plan), per, wrong={"cpu": tuple(wrong)}, full_samples=full)


class LevelStudy(FakeStudy):
    """A study whose recipe is static QDQ: every layer can take int4."""

    def takes_levels(self, recipe: str) -> bool:
        return True

    def level_fits(self, model: str, recipe: str, layer: str, level: str) -> bool:
        return True


def test_budget_gives_its_front_int4_twins_where_int4_costs_nothing(tmp_path: Path) -> None:
    """The default search: the in-or-out budget search, then an int4 twin of each front candidate. Free layers are
    measured next to the reference (the cover layers in float), not next to the fully quantized model, where
    int4's damage hides behind the samples it already gets wrong: ``big1``/``big2`` are free; ``noisy`` breaks a
    new sample; ``masked`` breaks only what ``stem`` (a cover layer) already breaks, so it looks free next to the
    fully quantized model and is not once ``stem`` is in float. The front keeps every in-or-out point."""
    layers = ["stem", "a", "big1", "noisy", "masked", "big2", "head"]
    nbytes = {"stem": 8, "a": 80, "big1": 4000, "noisy": 3000, "masked": 2000, "big2": 3600, "head": 120}
    problem = LevelProblem(
        layers=layers,
        error_ranking=list(layers),
        nbytes=nbytes,
        damage={"cpu": {}},
        base=20_000,
        breaks={"stem": {1, 2}, "a": {3}},
        breaks4={"noisy": {9}, "masked": {1}},
    )
    strategy, farm, _ = setup(tmp_path, problem, study_cls=LevelStudy, budget=8)
    drive(strategy, farm)
    plans = {r.plan.id: r.plan for batch in farm.batches for r in batch}
    full = {rid: o for (rid, level), o in farm.results.items() if level == "full"}
    twins = [plans[cid] for cid in full if plans[cid].levels]
    assert sorted(p.k for p in twins) == [0, 1, 2]  # one per front candidate: fq, stem, stem + a
    assert all(dict(p.levels) == {"big1": "int4", "big2": "int4"} for p in twins), [p.label for p in twins]
    best = min((o for o in full.values() if o.loss == 0.0), key=lambda o: o.size_bytes)
    binary = problem.size(("stem", "a"))
    assert plans[best.candidate_id].excluded == ("a", "stem") and best.size_bytes == binary - (4000 + 3600) // 8

    strategy, farm, _ = setup(tmp_path / "binary", problem, study_cls=LevelStudy, budget=8, levels=["fp32", "int8"])
    drive(strategy, farm)
    binary_full = {rid for (rid, level) in farm.results if level == "full"}
    assert binary_full <= set(full)  # the in-or-out points are all there
    assert min(o.size_bytes for (_, level), o in farm.results.items() if level == "full" and o.loss == 0.0) == binary
