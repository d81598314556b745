"""The paper's sweep: candidate k excludes the top-k layers of a ranking, k = 0, step, … (section IV-B)."""

from __future__ import annotations

from typing import Any

from tuneqn.controller.search.base import PairStrategy, Request
from tuneqn.controller.search.measured import MeasuredRanking


class SweepPair(PairStrategy):
    """Every k of the chosen ranking with the configured step, plus the explicit sets, all in full.

    With the ``measured`` ranking the ranking is measured first (screening), then swept.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._measured = MeasuredRanking(self.view, self.model, self.recipe) if self.run.ranking == "measured" else None
        self._proposed = False

    def propose(self) -> list[Request]:
        """The measured ranking's screens until it is known, then every candidate."""
        if self._measured is None:
            order = self.view.ranking(self.model, self.recipe, self.run.ranking)
        else:
            measured = self._measured.order()
            if measured is None:
                return self._measured.requests()
            order = measured
        label = f"{self.run.ranking} k="
        reqs = [Request(p, "full", p.label) for p in self.view.prefix_plans(self.model, self.recipe, order, label)]
        reqs += [Request(p, "full", p.label) for p in self.view.explicit_plans(self.model, self.recipe)]
        self._proposed = True
        return reqs

    def done(self) -> bool:
        """Done once everything was proposed."""
        return self._proposed
