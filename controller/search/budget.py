"""The ``budget`` strategy: at most N full evaluations per (model, recipe), spent where the front can change.

Candidates are the sweep's: the prefixes of the run's ranking (k = 0, step, … ≤ max_k).
N = ``budget``, else 30 % of their number rounded down (so that it stays within 30 %), but at
least 2 (the first and the last). With the ``measured`` ranking the ranking is measured
first (one screen per layer on the screening subset); those screens do not count against N:
they are not full evaluations and are on no front. Size is known without a device, so only full
evaluations (device metrics) are counted.

1. Every candidate's exact size is known right away: predicted from the recipe's fully quantized
   model (static QDQ recipes, :mod:`tuneqn.controller.quantize.edits`), else by building it; the first and
   the last are evaluated in full.
2. The rule. An unevaluated candidate c lies between its nearest evaluated neighbours a
   (lower k) and b (higher k). Its *optimistic point* on a device is its exact size and, for
   every device-measured objective (accuracy_loss, accuracy, accuracy_top5, latency), the
   better of a's and b's values on that device. c *can enter the top front* if, on some
   device, no evaluated candidate of this (model, recipe) is at least as good as that point
   in every objective. Latency compares by the report's tie rule (:mod:`tuneqn.controller.search.ties`):
   the optimistic latency is the better of the neighbours' medians and p10–p90 intervals, and an
   evaluated candidate is at least as good there unless that point is faster beyond the tie
   (its p90 below the candidate's p10), so measurement noise alone never makes a flat segment
   look worth bisecting. An objective unknown for the optimistic point (not measured, or a
   neighbour failed there) is left out of the comparison; a known one that an evaluated
   candidate lacks keeps that candidate from covering c.
   The evaluated candidates include those the same search chose for the model's recipes searched
   before this one (:meth:`SearchView.recipe_rank`: the gate's order with auto recipes, else the
   study's): the top front is the model's, across recipes, so a segment that an earlier recipe's
   results already cover is not bisected. Choices that need them wait until those searches are over
   (then they are the same whenever they are taken, and in a resumed study); on one device they are
   over by then anyway, as their jobs go first. Before a later recipe's layers are ranked (its
   screens), the rule is applied to its whole segment, from the fully quantized model to every layer
   in float, both evaluated in the recipe gate anyway, with the smallest size a candidate between can
   have: if none can enter, the recipe is not screened and its search is those two.
   Assumption: along one ranking a candidate's device metrics lie between those of its
   evaluated neighbours (accuracy improves, latency worsens, monotonically with k); size is
   exact. Under it no point of a segment can beat its optimistic point, and later results
   only let fewer candidates enter.
3. The unevaluated candidates are cut into segments by the evaluated and the pending ones;
   the next candidate is the middle enterable one of a segment that has one: preferring the
   interval between evaluated neighbours with the fewest pending candidates (independent
   work first), then the longest segment, then the lowest k. A segment whose ends differ is
   bisected until the step is pinned down; one whose ends agree (or whose points are
   covered) is never touched.
4. Stop when N full evaluations were asked for or no unevaluated candidate can enter. Done =
   stopped and every full result in.

Keeping agents busy, deterministically: with w the width of choice r (the live devices,
see below), the r-th choice reads the results of the choices 0 … r−w only (it waits for
those) and treats the w−1 later ones as pending, so w evaluations run at once while the
choices do not depend on the order in which results arrive. When that window shows nothing
enterable, it waits for every pending result and looks again before it stops. The width of
each choice r ≥ 2 (and of the stop) is the live width when it is taken, recorded in the store
(:meth:`ReplayPair._took`); a resumed study (a fresh object seeing the stored results) replays
every choice with its recorded width, so it makes the same choices whatever devices are live.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from tuneqn.controller.objectives import Objective, objective
from tuneqn.controller.search.base import Outcome, ReplayPair, Request
from tuneqn.controller.search.int4 import Int4Twins
from tuneqn.controller.search.measured import MeasuredRanking
from tuneqn.controller.search.ties import Latency, compare

if TYPE_CHECKING:
    from tuneqn.controller.study import CandidatePlan

_WAIT = -1  # a choice that needs results not in yet

#: One objective's value of an evaluated candidate on a device (latency: the measurement with its spread).
Value = float | Latency | None


class BudgetPair(ReplayPair):
    """Bisects the ranking's prefixes where the front can still change, within N full evaluations."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._measured = MeasuredRanking(self.view, self.model, self.recipe) if self.run.ranking == "measured" else None
        self._int4: Int4Twins | None = None  # made once the in-or-out search is over (it reads the fq model)
        self._objectives = [(objective(name), direction) for name, direction in self.view.objectives()]
        self._cache: dict[tuple[str, ...], dict[str, list[Value]]] = {}  # (id, devices) -> values
        self._chosen: list[int] = []  # indices of the prefixes chosen so far (each a function of the results)
        #: The candidates chosen for a full evaluation so far, in the order they were chosen.
        self.chosen: list[CandidatePlan] = []

    def _walk(self) -> tuple[list[Request], bool]:
        """Every request from the start as far as the results allow, and whether the search is done."""
        view = self.view
        reqs = [Request(p, "full", p.label) for p in view.explicit_plans(self.model, self.recipe)]
        if self._measured is None:
            order = view.ranking(self.model, self.recipe, self.run.ranking)
        else:
            measured = self._measured.order()
            if measured is None:
                ends = self._ends()
                covered = None if ends is None else self._covered_ends(ends)
                if ends is not None and covered is not False:
                    fulls = [Request(p, "full", p.label) for p in ends]
                    if covered is None:  # waiting for the ends or for the earlier recipes' searches
                        return reqs + fulls, False
                    self.chosen = list(ends)  # no candidate can enter: nothing to rank, nothing more to evaluate
                    return reqs + fulls, True
                return reqs + self._measured.requests(), False
            order = measured
        cands = view.prefix_plans(self.model, self.recipe, order, f"{self.run.ranking} k=")
        budget = self.run.budget or max(min(2, len(cands)), 3 * len(cands) // 10)
        # sizes are predicted without a build where the recipe's candidates are derived by graph edits
        reqs += [Request(p, "build", p.label) for p in cands if self.view.size_needs_build(p)]
        chosen, stopped = self._choose(cands, budget)
        self.chosen = [cands[i] for i in chosen]
        reqs += [Request(p, "full", p.label) for p in self.chosen]
        done = stopped and all(view.outcome(p, "full") is not None for p in self.chosen)
        if not done or not self.run.int4 or not view.levels_supported(self.recipe):
            return reqs, done
        return self._int4_twins(reqs)

    def _int4_twins(self, reqs: list[Request]) -> tuple[list[Request], bool]:
        """The level phase (:mod:`tuneqn.controller.search.int4`): each candidate of this search's top front gets
        its int4 twin — the same float layers, the largest free prefix of the int4 order at int4 — evaluated in
        full. Runs once the in-or-out search is over, so it only ever adds points below the front it found."""
        if self._int4 is None:
            rows = (self._measured.gains() if self._measured is not None else None) or []
            cover = tuple(r["name"] for r in rows if r.get("cover"))
            self._int4 = Int4Twins(self.view, self.model, self.recipe, cover)
        order, more = self._int4.order()
        reqs += more
        if order is None:
            return reqs, False
        done = True
        for plan in self._front(self.chosen):
            twin, more, known = self._int4.twin(plan, order)
            reqs += more
            if twin is not None:
                self.chosen.append(twin)
                reqs.append(Request(twin, "full", twin.label))
            done = done and known and (twin is None or self.view.outcome(twin, "full") is not None)
        return reqs, done

    def _front(self, plans: list[CandidatePlan]) -> list[CandidatePlan]:
        """The evaluated ``plans`` no other one beats in size and worst agreement (pymoo's non-dominated sort;
        equal points: the first), by size."""
        points: dict[tuple[int, float], CandidatePlan] = {}
        for p in plans:
            out = self.view.outcome(p, "full")
            if out is not None and out.loss is not None:
                points.setdefault((out.size_bytes, out.loss), p)
        if not points:
            return []
        keys = list(points)
        front = NonDominatedSorting().do(np.array(keys, dtype=float), only_non_dominated_front=True)
        return [points[k] for k in sorted(keys[int(i)] for i in front)]

    def _choose(self, cands: list[CandidatePlan], budget: int) -> tuple[list[int], bool]:
        """The indices chosen for a full evaluation so far, and whether the choosing stopped."""
        if not self._chosen:  # a choice is a function of the results and its recorded width: keep them
            self._chosen = sorted({0, len(cands) - 1})[:budget]
        chosen = self._chosen
        sizes = [self.view.size(p) for p in cands]
        others = self._earlier_results() if len(chosen) < budget else []  # read once per walk
        while len(chosen) < budget:
            if others is None or any(s is None for s in sizes):
                return chosen, False
            step = len(chosen)
            width = self._width(step)
            known = max(2, step - width + 1)
            pick = self._next(cands, sizes, chosen[:known], chosen[known:], others)
            if pick is None and known < len(chosen):
                pick = self._next(cands, sizes, chosen, [], others)
            if pick == _WAIT:
                return chosen, False
            self._took(step, width)  # the choice (or the stop) is taken with this width
            if pick is None:
                return chosen, True
            chosen.append(pick)
        return chosen, True

    def _next(
        self,
        cands: list[CandidatePlan],
        sizes: list[Any],
        known: list[int],
        pending: list[int],
        others: list[dict[str, list[Value]]],
    ) -> int | None:
        """The next candidate to evaluate from the results of ``known`` and of the earlier recipes (``others``;
        None: none can enter)."""
        outs = {i: self.view.outcome(cands[i], "full") for i in known}
        if any(o is None for o in outs.values()):
            return _WAIT
        vectors = {i: self._vectors(o) for i, o in outs.items() if o is not None}
        evaluated = sorted(vectors)
        bounds = sorted(set(evaluated) | set(pending))
        best: tuple[tuple[int, int, int], int] | None = None
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            if hi - lo < 2:
                continue
            a = max(e for e in evaluated if e <= lo)
            b = min(e for e in evaluated if e >= hi)
            enterable = [
                i
                for i in range(lo + 1, hi)
                if self._can_enter(sizes[i], vectors[a], vectors[b], list(vectors.values()), others)
            ]
            key = (sum(a < p < b for p in pending), -(hi - lo), lo)
            if enterable and (best is None or key < best[0]):
                best = (key, enterable[(len(enterable) - 1) // 2])
        return None if best is None else best[1]

    def _ends(self) -> tuple[CandidatePlan, CandidatePlan] | None:
        """The first and the last candidate of any ranking (the fully quantized model, every layer in float), known
        before the ranking; None where the last depends on it (``max_k``)."""
        if self.view.search.max_k is not None:
            return None
        layers = self.view.layers(self.model, self.recipe)
        return self.view.plan(self.model, self.recipe, ()), self.view.plan(self.model, self.recipe, layers)

    def _covered_ends(self, ends: tuple[CandidatePlan, CandidatePlan]) -> bool | None:
        """Whether the earlier recipes' results show that no candidate between the two ends can enter the top front
        (rule 2, with the smallest size any of them can have) once both are evaluated: then the recipe's layers are
        not even ranked. None while that is not known (the ends' results, the earlier recipes' searches); False at
        once without earlier recipes (the recipe's own ends alone never skip its ranking)."""
        others = self._earlier_results()
        if others is None:
            return None
        if not others:
            return False
        outs = [self.view.outcome(p, "full") for p in ends]
        if outs[0] is None or outs[1] is None:
            return None
        a, b = self._vectors(outs[0]), self._vectors(outs[1])
        smallest = outs[0].size_bytes + 1  # every layer left in float adds bytes
        return not self._can_enter(smallest, a, b, [a, b], others, own=False)

    def _earlier_results(self) -> list[dict[str, list[Value]]] | None:
        """The full results of the candidates the searches of this model's earlier recipes chose (the same search,
        :meth:`PerPair.earlier`), once every one of them is over; None while one is not (the choice waits: it is
        then the same whenever it is taken, and in a resumed study)."""
        if self.search is None:
            return []
        earlier = self.search.earlier(self)
        if earlier is None:
            return None
        out: list[dict[str, list[Value]]] = []
        for pair in earlier:
            if not self.search.over(pair):
                return None
            for plan in getattr(pair, "chosen", []):
                found = self.view.outcome(plan, "full")
                if found is not None:
                    out.append(self._vectors(found))
        return out

    def _vectors(self, out: Outcome) -> dict[str, list[Value]]:
        """Per device where it did not fail, the objectives' values of an evaluated candidate (latency as
        a :class:`Latency` with its p10–p90)."""
        key = (out.candidate_id, *sorted(out.per_device))
        if key not in self._cache:
            self._cache[key] = {
                d: [_value(obj, direction, out.size_bytes, m) for obj, direction in self._objectives]
                for d, m in sorted(out.per_device.items())
                if d not in out.failed
            }
        return self._cache[key]

    def _can_enter(
        self,
        size: int,
        a: dict[str, list[Value]],
        b: dict[str, list[Value]],
        evaluated: list[dict[str, list[Value]]],
        others: list[dict[str, list[Value]]],
        own: bool = True,
    ) -> bool:
        """On some device (of ``evaluated``), no evaluated candidate (of this recipe, unless not ``own``, or of an
        earlier one: ``others``) is at least as good as c's optimistic point there."""
        exact = [obj.value({"size_bytes": size}, {}) for obj, _ in self._objectives]
        cover = [*evaluated, *others] if own else others
        for d in sorted({d for v in evaluated for d in v}):
            point: list[Value] = []
            for j, (_, direction) in enumerate(self._objectives):
                va, vb = a[d][j] if d in a else None, b[d][j] if d in b else None
                if exact[j] is not None:
                    point.append(exact[j])
                elif va is None or vb is None:
                    point.append(None)
                elif isinstance(va, Latency) and isinstance(vb, Latency):
                    point.append(va.optimistic(vb))
                else:
                    point.append(min(va, vb) if direction == "min" else max(va, vb))  # type: ignore[type-var]
            if not any(_covers(v[d], point, self._objectives) for v in cover if d in v):
                return True
        return False


def _value(obj: Objective, direction: str, size: int, metrics: dict[str, float | None]) -> Value:
    """An evaluated candidate's value of ``obj`` on one device (latency, minimized: with its spread)."""
    if obj.name == "latency" and direction == "min":
        return Latency.of(metrics.get("latency_ms"), metrics.get("latency_p10_ms"), metrics.get("latency_p90_ms"))
    return obj.value({"size_bytes": size}, metrics)


def _covers(have: list[Value], want: list[Value], objectives: list[tuple[Objective, str]]) -> bool:
    """``have`` is at least as good as ``want`` in every objective ``want`` knows (latency: ``want`` is not
    faster beyond the tie)."""
    for h, w, (_, direction) in zip(have, want, objectives, strict=True):
        if w is None:
            continue
        if h is None:
            return False
        if isinstance(h, Latency) and isinstance(w, Latency):  # latency, minimized
            if compare(h, w) > 0:
                return False
        elif h > w if direction == "min" else h < w:  # type: ignore[operator]
            return False
    return True
