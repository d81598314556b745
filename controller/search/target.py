"""The ``target`` strategy: the smallest model whose accuracy loss is at most X on every device.

X = ``max_loss`` (accuracy loss = 1 − top-1 agreement with FP32). A set *meets X* at a level
when it was evaluated on every device (none failed) and its worst device's loss is ≤ X (with
a 1e-9 tolerance: 99 of 100 samples meets X = 0.01). Screening (``screen``: the recipe's
screening sample, no latency) is the cheap look — there a set meets X when its *estimated*
full loss does (its disagreements on the screen over the whole sample's size, see
:attr:`Outcome.estimated_loss`); only ``full`` confirms.

1. Order: the measured ranking (its screens first), or the run's error ranking.
2. Prefixes: screen the prefixes k = 0 … 24 of the order (capped by ``max_k`` and the number
   of layers), all at once. Those that meet X in screening are evaluated in full in size
   order, w at a time (w: the width, see Replay below; one batch after the other, until a batch has
   one that meets X in full: the smallest of that batch is the first answer). If none does,
   the gains of the remaining layers are measured on the largest screened prefix as the base
   (a :class:`MeasuredRanking`, greedy style), the order continues with that ranking, the
   next 24 prefixes are screened, and so on; when every layer was tried, nothing meets X.
3. Shrinking, round by round: screen the answer without each of its layers (all at once);
   when more than one such reduction meets X in screening, also screen the answer without
   all of those layers together. The reductions that meet X in screening are evaluated in
   full, smallest first (the all-together one, then the largest layer removed first), w at a
   time as above; the smallest that meets X in full is the new answer. Repeat until no
   reduction meets X in full; then the search is done. A later round only tries the layers
   whose removal met X in screening in the round before and, if evaluated in full there,
   met it in full too (assumption, as in ``budget``: quantizing more layers does not lower
   the loss, so a layer that could not go from a larger set cannot go from a smaller one). The
   all-together reduction drops every layer
   that does not matter in one round instead of one round each. Shrinking is a local search:
   it does not swap a layer for another (a cheaper one with the same effect).

:meth:`TargetPair.found` is the smallest set evaluated in full that meets X (what the report
shows with the front). Sets found by shrinking are not prefixes of any one order.

Replay: the whole search is recomputed from the results at every call and every decision
waits for the results it reads. Each batch of full evaluations is a numbered step of the walk
whose width is the live width when it is asked for, recorded in the store
(:meth:`ReplayPair._took`); a replay takes every batch with its recorded width, so a resumed
study ends with the same set whatever devices are live.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tuneqn.controller.search.base import Outcome, ReplayPair, Request
from tuneqn.controller.search.measured import MeasuredRanking

if TYPE_CHECKING:
    from tuneqn.controller.study import CandidatePlan

#: How many layers of the order each round of prefix screens covers.
SCREEN_PREFIXES = 24
_TOLERANCE = 1e-9


class _Wait(Exception):
    """A decision needs results that are not in yet."""


class TargetPair(ReplayPair):
    """Finds the smallest set of one (model, recipe) that meets ``max_loss`` in full on every device."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        if self.run.max_loss is None:
            raise ValueError("strategy 'target' needs max_loss")
        self.max_loss = float(self.run.max_loss)
        self._rankings: dict[tuple[str, ...], MeasuredRanking] = {}
        self._fulls: list[CandidatePlan] = []
        self._step = 0  # batches of full evaluations asked for so far in the walk (its decision steps)
        self._plans: dict[tuple[str, ...], CandidatePlan] = {}

    def _walk(self) -> tuple[list[Request], bool]:
        """Done when no reduction of the answer meets X (or no set does); the last full results may still run."""
        reqs: list[Request] = []
        return reqs, self._search(reqs)

    def found(self) -> CandidatePlan | None:
        """The smallest set evaluated in full that meets X on every device (None if none yet)."""
        self._search([])
        ok = [
            (o.size_bytes, p.id, p)
            for p in self._fulls
            if (o := self.view.outcome(p, "full")) is not None and self._meets(o)
        ]
        return min(ok, key=lambda t: t[:2])[2] if ok else None

    def _meets(self, out: Outcome | None) -> bool:
        """Meets X: in full its loss, in screening its estimated full loss (:attr:`Outcome.estimated_loss`)."""
        loss = out.estimated_loss if out is not None else None
        return out is not None and not out.failed and loss is not None and loss <= self.max_loss + _TOLERANCE

    def _plan(self, excluded: list[str], label: str) -> CandidatePlan:
        """The candidate keeping ``excluded`` in float (the first label it was asked with)."""
        key = tuple(sorted(excluded))
        if key not in self._plans:
            self._plans[key] = self.view.plan(self.model, self.recipe, key, label)
        return self._plans[key]

    def _ranking(self, base: tuple[str, ...], label: str) -> MeasuredRanking:
        if base not in self._rankings:
            self._rankings[base] = MeasuredRanking(self.view, self.model, self.recipe, base, label)
        return self._rankings[base]

    def _search(self, reqs: list[Request]) -> bool:
        """Append every request from the start as far as the results allow; True once the search ended."""
        self._fulls = []
        self._step = 0
        try:
            best = self._first_answer(reqs)
            removable = set(best.excluded) if best is not None else set()
            while best is not None:
                best, removable = self._shrink(best, removable, reqs)
        except _Wait:
            return False
        return True

    def _first_answer(self, reqs: list[Request]) -> CandidatePlan | None:
        """The smallest prefix (of the order, extended by measured gains) that meets X in full."""
        reqs += [Request(p, "full", p.label) for p in self.view.explicit_plans(self.model, self.recipe)]
        if self.run.ranking == "measured":
            order = self._measured_order((), "ranking", reqs)
        else:
            order = self.view.ranking(self.model, self.recipe, self.run.ranking)
        spec = self.view.search
        cap = len(order) if spec.max_k is None else min(spec.max_k, len(order))
        lo = 0
        while True:
            hi = min(lo + SCREEN_PREFIXES, cap)
            prefixes = [self._plan(order[:k], f"target k={k}") for k in range(lo, hi + 1)]
            best = self._confirm_smallest(self._screen(prefixes, reqs), reqs)
            if best is not None or hi >= cap:
                return best
            order = order[:hi] + self._measured_order(tuple(order[:hi]), f"target base k={hi}", reqs)
            lo = hi + 1

    def _shrink(
        self, best: CandidatePlan, removable: set[str], reqs: list[Request]
    ) -> tuple[CandidatePlan | None, set[str]]:
        """One round of shrinking: the smallest reduction of ``best`` that meets X in full (None if
        none does), and the layers that may still go (their removal met X so far)."""
        singles = {
            name: self._plan([x for x in best.excluded if x != name], f"target -{name}")
            for name in best.excluded
            if name in removable
        }
        passing = self._screen(list(singles.values()), reqs)
        names = [name for name, p in singles.items() if p in passing]
        if len(names) > 1:
            together = self._plan([x for x in best.excluded if x not in names], f"target -{len(names)} layers")
            passing += self._screen([together], reqs)
        smaller = self._confirm_smallest(passing, reqs)
        asked = {p.id for p in self._fulls}  # only results this search waited for: replayable
        return smaller, {
            name
            for name in names
            if singles[name].id not in asked or self._meets(self.view.outcome(singles[name], "full"))
        }

    def _measured_order(self, base: tuple[str, ...], label: str, reqs: list[Request]) -> list[str]:
        ranking = self._ranking(base, label)
        reqs += ranking.requests()
        order = ranking.order()
        if order is None:
            raise _Wait
        return order

    def _screen(self, plans: list[CandidatePlan], reqs: list[Request]) -> list[CandidatePlan]:
        """Screen ``plans`` (all at once); those that meet X in screening."""
        reqs += [Request(p, "screen", p.label) for p in plans]
        screens = [self.view.outcome(p, "screen") for p in plans]
        if any(o is None for o in screens):
            raise _Wait
        return [p for p, o in zip(plans, screens, strict=True) if self._meets(o)]

    def _confirm_smallest(self, plans: list[CandidatePlan], reqs: list[Request]) -> CandidatePlan | None:
        """Evaluate screened ``plans`` in full, smallest first, a batch of the step's width at a time: the
        smallest of the first batch with a set that meets X in full (None if none does)."""
        ordered = sorted(plans, key=lambda p: (self._screened_size(p), p.id))
        start = 0
        while start < len(ordered):
            step, self._step = self._step, self._step + 1
            width = self._width(step)
            self._took(step, width)
            batch = ordered[start : start + width]
            start += width
            reqs += [Request(p, "full", p.label) for p in batch]
            self._fulls += batch
            fulls = [self.view.outcome(p, "full") for p in batch]
            if any(o is None for o in fulls):
                raise _Wait
            ok = [p for p, o in zip(batch, fulls, strict=True) if self._meets(o)]
            if ok:
                return ok[0]  # the batch is in size order
        return None

    def _screened_size(self, plan: CandidatePlan) -> int:
        out = self.view.outcome(plan, "screen")
        return 0 if out is None else out.size_bytes
