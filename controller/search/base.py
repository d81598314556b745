"""The strategy interface: a strategy proposes candidates; the orchestrator builds and evaluates them.

The orchestrator asks :meth:`Strategy.propose` at the start and again whenever results
arrive, builds what it proposes (in the background, overlapping evaluation) and hands the
jobs to the dispatcher; the study ends when :meth:`Strategy.done` says so and every job is
final. A strategy sees the study only through :class:`SearchView`, so it can be replayed
from the checkpoint: given the same stored results it must propose the same candidates.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuneqn.controller.study import CandidatePlan, Study


class SearchView:
    """What a strategy may look at: the study's plans and rankings, and the results so far."""

    def __init__(self, study: Study) -> None:
        self._study = study

    def models(self) -> list[str]:
        """Model names of the study."""
        return list(self._study.models)

    def modes(self) -> list[str]:
        """Quantization modes of the study."""
        return self._study.modes()

    def ranking(self, model: str, mode: str) -> list[str]:
        """Layer names of (model, mode), most sensitive first."""
        return [r["name"] for r in self._study.analyze(model, mode)]

    def planned(self, model: str, mode: str) -> list[CandidatePlan]:
        """The study's configured candidates of (model, mode): every k with the step, then exclusion sets."""
        return self._study.plan(model, mode)

    def results(self, candidate_id: str) -> list[dict[str, Any]]:
        """Stored results of a candidate (one per device class it finished on)."""
        return self._study.store.results(candidate_id=candidate_id)


class Strategy(abc.ABC):
    """Proposes candidates to evaluate from the ranking and the results so far."""

    name: str = ""

    def __init__(self, view: SearchView) -> None:
        self.view = view

    @abc.abstractmethod
    def propose(self) -> list[CandidatePlan]:
        """Candidates to evaluate next (never one proposed before); [] = nothing new right now."""

    @abc.abstractmethod
    def done(self) -> bool:
        """True once the strategy will propose nothing more, whatever results still arrive."""
