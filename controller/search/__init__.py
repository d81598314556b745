"""Search strategies: which candidates to evaluate next, from a ranking and the results so far.

``make_strategy`` gives the strategy of one search (:class:`~tuneqn.controller.config.SearchRun`):

* ``sweep``  — the paper's: every k of the ranking with the configured step;
* ``greedy`` — grows an exclusion set one layer at a time by measured gain per byte;
* ``budget`` — at most N full evaluations, spent where the front can still change;
* ``target`` — the smallest model whose accuracy loss is at most ``max_loss`` on every device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuneqn.controller.search.base import LEVELS, Outcome, PairStrategy, PerPair, Request, SearchView, Strategy
from tuneqn.controller.search.sweep import SweepPair

if TYPE_CHECKING:
    from tuneqn.controller.config import SearchRun

__all__ = ["LEVELS", "Outcome", "PairStrategy", "PerPair", "Request", "SearchView", "Strategy", "make_strategy"]


def _pair_classes() -> dict[str, type[PairStrategy]]:
    from tuneqn.controller.search.budget import BudgetPair  # noqa: PLC0415 - keeps imports acyclic
    from tuneqn.controller.search.greedy import GreedyPair  # noqa: PLC0415
    from tuneqn.controller.search.target import TargetPair  # noqa: PLC0415

    return {"sweep": SweepPair, "decremental": SweepPair, "greedy": GreedyPair, "budget": BudgetPair,
            "target": TargetPair}


def make_strategy(run: SearchRun, view: SearchView) -> Strategy:
    """The strategy of one search over every (model, recipe) of the study."""
    classes = _pair_classes()
    if run.strategy not in classes:
        raise ValueError(f"unknown search strategy {run.strategy!r}")
    return PerPair(view, run, classes[run.strategy])
