"""The ``greedy`` strategy: grow one exclusion set, a few layers at a time, by measured gain per byte.

S = ∅ first: the fully quantized model is evaluated in full (label ``greedy fq``). Round i:

1. measure the gain of every layer not in S *on S*: a :class:`MeasuredRanking` with base S
   (label ``round i``), one screen per remaining layer, all requested at once;
2. once every screen is in, take the next layers of its order that gain agreement, at most
   ``search.regain_every`` of them (when none gains agreement and S still disagrees with FP32 on
   the screening sample: those that gain only top-k overlap), and add them one at a time:
   S₁ = S ∪ {l₁}, S₂ = S₁ ∪ {l₂}, …; each Sⱼ is
   evaluated in full (label ``step j``, j counted over the whole search) and the last one is
   the next round's S.

With an error ranking (``paper``, ``qdq``, ``xmodel``) round 1 takes the first
``regain_every`` layers of that ranking instead of measuring (no gain filter); later rounds
measure. The search stops when no layer qualifies, when S holds ``search.max_k`` layers (or
every layer), or when a set it evaluated in full has accuracy loss 0 on every device.

Keeping agents busy: round i+1's screens only need S, so they are requested as soon as round
i's steps are chosen, while those steps are evaluated in full. The loss-0 check therefore
runs one round behind: round i's steps are chosen only once the full results of every earlier
step (and of the fully quantized model) are in, and the search stops there if one has loss 0
(at most one round of screens is spent after the loss reached 0). Round 1 from an error
ranking does not wait for the fully quantized model (it is checked with round 1's steps).

Replay: :meth:`propose` recomputes the whole search from S = ∅ out of the results at every
call, and every decision reads only results it waited for, so a study resumed from its
checkpoint (a fresh object seeing the stored results) takes the same steps and ends in the
same set. Every evaluated set is a candidate on the fronts.
"""

from __future__ import annotations

from typing import Any

from tuneqn.controller.search.base import Outcome, ReplayPair, Request
from tuneqn.controller.search.measured import MeasuredRanking


class GreedyPair(ReplayPair):
    """Grows an exclusion set of one (model, recipe) by the gains measured on it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._rankings: dict[tuple[str, ...], MeasuredRanking] = {}
        self._set: tuple[str, ...] = ()

    def current_set(self) -> tuple[str, ...]:
        """The set S reached so far (layers in the order they were added)."""
        return self._set

    def _ranking(self, base: tuple[str, ...], round_no: int) -> MeasuredRanking:
        if base not in self._rankings:
            self._rankings[base] = MeasuredRanking(self.view, self.model, self.recipe, base, f"round {round_no}")
        return self._rankings[base]

    def _walk(self) -> tuple[list[Request], bool]:
        """Every request of the search from S = ∅ as far as the results allow, and whether it stopped."""
        view, spec = self.view, self.view.search
        layers = view.layers(self.model, self.recipe)
        cap = len(layers) if spec.max_k is None else min(spec.max_k, len(layers))
        fq = view.plan(self.model, self.recipe, (), "fq")
        reqs = [Request(fq, "full", "greedy fq")]
        reqs += [Request(p, "full", p.label) for p in view.explicit_plans(self.model, self.recipe)]
        s: tuple[str, ...] = ()
        unchecked = [fq]  # full evaluations not yet checked for loss 0
        step = round_no = 0
        while True:
            round_no += 1
            self._set = s
            if len(s) >= cap:
                return reqs, True
            if round_no == 1 and self.run.ranking != "measured":
                picks = view.ranking(self.model, self.recipe, self.run.ranking)[: spec.regain_every]
            else:
                ranking = self._ranking(s, round_no)
                reqs += ranking.requests()
                outs = [view.outcome(p, "full") for p in unchecked]
                if any(o is not None and _lossless(o) for o in outs):
                    return reqs, True
                gains = ranking.gains()
                if gains is None or any(o is None for o in outs):
                    return reqs, False
                unchecked = []
                picks = qualifying(gains, ranking.base_outcome())[: spec.regain_every]
            picks = picks[: cap - len(s)]
            if not picks:
                return reqs, True
            for name in picks:
                step += 1
                s = (*s, name)
                plan = view.plan(self.model, self.recipe, s, f"step {step}")
                reqs.append(Request(plan, "full", f"step {step}"))
                unchecked.append(plan)


def qualifying(gains: list[dict[str, Any]], base: Outcome | None = None) -> list[str]:
    """Layers (in rank order) that gain agreement — only those of the ranking's set cover when it has
    one (they fix different samples); when none does and the base set still disagrees
    with FP32 on the screening sample, those that gain only top-k overlap (a step towards fixing it)."""
    cover = [g["name"] for g in gains if g.get("cover")]
    if cover:  # each fixes samples the ones before it do not
        return cover
    agree = [g["name"] for g in gains if g["gain"] is not None and g["gain"] > 0]
    if agree:
        return agree
    if base is not None and base.loss is not None and base.loss <= 0.0:
        return []
    return [g["name"] for g in gains if g["gain"] == 0 and (g["overlap_gain"] or 0) > 0]


def _lossless(out: Outcome) -> bool:
    return not out.failed and out.loss is not None and out.loss <= 0.0
