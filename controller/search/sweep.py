"""The paper's decremental sweep: candidate k excludes the top-k layers of the ranking, k = 0, step, …"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuneqn.controller.search.base import Strategy

if TYPE_CHECKING:
    from tuneqn.controller.study import CandidatePlan


class Sweep(Strategy):
    """Every configured candidate of every (model, mode), proposed at once (paper, section IV-B)."""

    name = "sweep"
    _proposed = False

    def propose(self) -> list[CandidatePlan]:
        """All candidates the first time, nothing after."""
        if self._proposed:
            return []
        self._proposed = True
        return [p for model in self.view.models() for mode in self.view.modes() for p in self.view.planned(model, mode)]

    def done(self) -> bool:
        """Done once everything was proposed."""
        return self._proposed
