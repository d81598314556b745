"""The int4 twins of a ``budget`` search with precision levels: which layers' weights go to int4 for free.

Moving a layer's weight from int8 to int4 (:mod:`tuneqn.controller.quantize.levels`) halves its bytes and costs
accuracy somewhere between nothing and a lot; on EfficientNet-Lite0 the classifier alone saves 0.63 MB
(13 % of the fully quantized model) without one more disagreement on 100 photos, while every layer at int4
disagrees on 75. So the search measures it, as the ``measured`` ranking measures exclusions:

0. The *reference* R is where the answer is sought: the fully quantized model with the layers the measured
   ranking puts first because they win agreement back (its greedy cover, ``cover`` in the ranking) in float.
   Measured against the fully quantized model itself, int4's damage hides behind the disagreements the cover
   layers cause (on Lite0, int4 on four large layers looked free there and then cost 3 of 100 photos once the
   stem was back in float).
1. Each other layer's *single*, R with that layer's weight at int4, is built (its size); only singles that
   save bytes go on (a small layer's per-channel scales can outweigh its 4-bit savings).
2. Those singles are screened, largest saving first, until the screened ones hold 95 % of all the bytes the
   singles save (the long tail of small layers is not worth a screen each). A single is *free* when it
   disagrees with FP32 on no screened sample where R agrees; free layers are ordered by bytes saved (largest
   first; the top-k overlap with FP32 breaks ties).
3. The search's own candidates come first (the in-or-out ``budget`` search, unchanged); then each candidate
   of its top front F gets an *int4 twin*: F with the first j free layers it quantizes at int4, for the largest
   j of 1, 2, 4, 8, … and all whose screen disagrees with FP32 nowhere F's own screen does not (free savings
   do not simply add up, and what is free next to R need not be next to F: on Lite0 per-channel, four int4
   layers free next to R cost 6 of 100 photos next to 12 float layers). The twins are evaluated in full.
   So the search's front holds every point the in-or-out search found, and below each one its twin where
   int4 costs nothing measurable. A device that cannot run a twin answers it infeasible; a failed screen is
   never free.

Everything is a function of the stored builds and screens, so a resumed study takes the same decisions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuneqn.controller.search.base import Outcome, Request, SearchView

if TYPE_CHECKING:
    from tuneqn.controller.study import CandidatePlan

#: Screened singles hold at least this share of the bytes all singles save.
SAVINGS_SCREENED = 0.95


class Int4Twins:
    """The free layers of one (model, recipe) and the int4 twins of its candidates (see the module docstring)."""

    def __init__(
        self, view: SearchView, model: str, recipe: str, ref: tuple[str, ...] = (), label: str = "int4"
    ) -> None:
        self.view = view
        self.model = model
        self.recipe = recipe
        self.ref = tuple(ref)
        self.label = label
        self.reference = view.plan(model, recipe, self.ref, f"{label} reference")
        self.singles = {
            name: view.plan(model, recipe, self.ref, f"{label} {name}", levels={name: "int4"})
            for name in view.layers(model, recipe)
            if name not in self.ref and view.level_fits(model, recipe, name, "int4")
        }

    def order(self) -> tuple[list[str] | None, list[Request]]:
        """The free layers, largest saving first, once their screens are in (else None); and the requests made
        for them so far (all of them, as each walk hands out every request again)."""
        reqs = [Request(p, "build", p.label) for p in self.singles.values()]
        if self.view.size_needs_build(self.reference):
            reqs.append(Request(self.reference, "build", self.reference.label))
        sizes = {name: self.view.size(p) for name, p in self.singles.items()}
        ref_size = self.view.size(self.reference)
        if ref_size is None or any(s is None for s in sizes.values()):
            return None, reqs
        saving = {name: ref_size - int(s) for name, s in sizes.items() if s is not None and s < ref_size}
        screened: list[str] = []
        total, held = sum(saving.values()), 0
        for name in sorted(saving, key=lambda n: (-saving[n], n)):
            if total and held >= SAVINGS_SCREENED * total:
                break
            screened.append(name)
            held += saving[name]
        reqs.append(Request(self.reference, "screen", self.reference.label))
        reqs += [Request(self.singles[n], "screen", self.singles[n].label) for n in screened]
        ref_out = self.view.outcome(self.reference, "screen")
        outs = {n: self.view.outcome(self.singles[n], "screen") for n in screened}
        if ref_out is None or any(o is None for o in outs.values()):
            return None, reqs
        wrong = ref_out.disagreeing()
        free = [n for n in screened if _free(outs[n], wrong)]
        return sorted(free, key=lambda n: (-saving[n], -(_overlap(outs[n])), n)), reqs

    def twin(self, plan: CandidatePlan, order: list[str]) -> tuple[CandidatePlan | None, list[Request], bool]:
        """``plan``'s int4 twin: its float layers, and at int4 the largest prefix (j = 1, 2, 4, …, all) of the free
        layers it quantizes whose screen disagrees with FP32 nowhere ``plan``'s does not. Returns the twin (None:
        no prefix is free, or not known yet), the screens asked for, and whether the answer is known."""
        layers = [n for n in order if n not in set(plan.excluded)]
        if not layers:
            return None, [], True
        steps = sorted({*(2**i for i in range(len(layers).bit_length()) if 2**i <= len(layers)), len(layers)})
        bases = {j: self._plan(plan, layers[:j], j) for j in steps}
        reqs = [Request(plan, "screen", plan.label), *(Request(p, "screen", p.label) for p in bases.values())]
        own = self.view.outcome(plan, "screen")
        found = {j: self.view.outcome(p, "screen") for j, p in bases.items()}
        if own is None or any(o is None for o in found.values()):
            return None, reqs, False
        good = [j for j, o in found.items() if _free(o, own.disagreeing())]
        return (bases[max(good)] if good else None), reqs, True

    def _plan(self, plan: CandidatePlan, layers: list[str], j: int) -> CandidatePlan:
        levels = dict.fromkeys(layers, "int4")
        return self.view.plan(self.model, self.recipe, plan.excluded, f"{plan.label} +{j} int4", levels=levels)


def _free(out: Outcome | None, wrong: frozenset[tuple[str, int]]) -> bool:
    """A screen that disagrees with FP32 nowhere the reference agrees (and did not fail)."""
    return out is not None and not out.failed and out.loss is not None and out.disagreeing() <= wrong


def _overlap(out: Outcome | None) -> float:
    value = None if out is None else out.worst("overlap")
    return 0.0 if value is None else value
