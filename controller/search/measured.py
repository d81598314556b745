"""The ``measured`` ranking: each layer's effect on accuracy, measured on the devices.

For a base set S (∅: the fully quantized model), every layer l not in S is screened as the
candidate S ∪ {l} — *excluding* only that layer from the quantized model — and compared
with S itself. We measure the gain of excluding a layer rather than the loss of quantizing
only that layer because candidates live near the fully quantized point: what matters is
how much accuracy comes back when that layer returns to float while (almost) everything
else stays quantized, including the errors it would otherwise pass on to the others.

Gain = top-1 agreement with FP32 (worst device) of S ∪ {l} minus that of S; on the small
screening sample most gains are 0 or one sample, so ties are broken by the gain in top-k
overlap with FP32 (how much of FP32's top-k the candidate also ranks in its top-k). Layers
are ordered by gain per byte added (the candidate's size minus the base's): first the
layers that gain agreement, then those that gain only overlap, then the rest; the ones that
gain agreement are put first as a greedy set cover of the samples S gets wrong, so that the
top of the order fixes different samples rather than one fragile sample many times over
(:func:`_cover_order`).
"""

from __future__ import annotations

from typing import Any

from tuneqn.controller.search.base import Request, SearchView


class MeasuredRanking:
    """Screens S ∪ {l} for every remaining layer l and orders the layers by gain per byte."""

    def __init__(
        self, view: SearchView, model: str, recipe: str, base: tuple[str, ...] = (), label: str = "ranking"
    ) -> None:
        self.view = view
        self.model = model
        self.recipe = recipe
        self.base = tuple(base)
        self.label = label
        self.base_plan = view.plan(model, recipe, self.base)
        others = [name for name in view.layers(model, recipe) if name not in set(self.base)]
        self.plans = {name: view.plan(model, recipe, (*self.base, name)) for name in others}
        self._gains: list[dict[str, Any]] | None = None

    def requests(self) -> list[Request]:
        """The screens still needed: the base and one per remaining layer."""
        reqs = [Request(self.base_plan, "screen", f"{self.label} base")]
        reqs += [Request(p, "screen", f"{self.label} +{name}") for name, p in self.plans.items()]
        return reqs

    def gains(self) -> list[dict[str, Any]] | None:
        """Per layer ``{name, gain, overlap_gain, bytes}`` in rank order; None until every screen is in."""
        if self._gains is not None:
            return self._gains
        base = self.view.outcome(self.base_plan, "screen")
        if base is None:
            return None
        outs = {}
        for name, p in self.plans.items():
            out = self.view.outcome(p, "screen")
            if out is None:
                return None
            outs[name] = out
        b_agree, b_over = base.worst("agreement"), base.worst("overlap")
        b_wrong = base.disagreeing()
        rows = []
        fixed: dict[str, frozenset[tuple[str, int]]] = {}
        for name, out in outs.items():
            agree, over = out.worst("agreement"), out.worst("overlap")
            ok = None not in (agree, over, b_agree, b_over)
            fixed[name] = b_wrong - out.disagreeing()
            rows.append(
                {
                    "name": name,
                    "gain": (agree - b_agree) if ok else None,  # type: ignore[operator]
                    "overlap_gain": (over - b_over) if ok else None,  # type: ignore[operator]
                    "bytes": max(1, out.size_bytes - base.size_bytes),
                    "fixes": len(fixed[name]),
                }
            )
        rows = _cover_order(sorted(rows, key=_rank_key), fixed)
        for i, r in enumerate(rows, 1):
            r["rank"] = i
        self._gains = rows
        if not self.base:
            self.view.put_ranking(self.model, self.recipe, "measured", rows)
        return rows

    def order(self) -> list[str] | None:
        """Layer names in rank order; None until measured."""
        g = self.gains()
        return None if g is None else [r["name"] for r in g]

    def base_outcome(self) -> Any:
        """The screening outcome of the base set (None until in)."""
        return self.view.outcome(self.base_plan, "screen")


def _cover_order(rows: list[dict[str, Any]], fixed: dict[str, frozenset[tuple[str, int]]]) -> list[dict[str, Any]]:
    """Rows (in :func:`_rank_key` order) reordered so that the first ones fix *different* samples.

    Many layers each win back the same fragile sample; taking several of them buys nothing
    after the first. So the order starts with a greedy set cover of the base set's
    disagreements (sample, device): repeatedly the layer with a positive net gain that fixes
    the most not-yet-fixed disagreements per byte added (ties: the earlier row); the other
    layers follow in their order. Marked with ``cover: true``.
    """
    covered: set[tuple[str, int]] = set()
    first: list[dict[str, Any]] = []
    rest = list(rows)
    while True:
        best, best_score = None, 0.0
        for r in rest:
            new = len(fixed[r["name"]] - covered)
            if new and (r["gain"] or 0) > 0 and new / r["bytes"] > best_score:
                best, best_score = r, new / r["bytes"]
        if best is None:
            break
        covered |= fixed[best["name"]]
        rest.remove(best)
        first.append({**best, "cover": True})
    return first + [{**r, "cover": False} for r in rest]


def _rank_key(r: dict[str, Any]) -> tuple[int, float, float]:
    gain, over, size = r["gain"], r["overlap_gain"], r["bytes"]
    if gain is None:
        return (3, 0.0, 0.0)
    if gain > 0:
        return (0, -gain / size, -over)
    if gain == 0 and over > 0:
        return (1, -over / size, 0.0)
    return (2, -gain, -over)
