"""Search strategies: which candidates to evaluate next, from a ranking and the results so far.

``make_strategy`` gives the strategy of one search (:class:`~tuneqn.controller.config.SearchRun`):

* ``sweep``  — the paper's: every k of the ranking with the configured step;
* ``greedy`` — grows an exclusion set one layer at a time by measured gain per byte;
* ``budget`` — at most N full evaluations, spent where the front can still change;
* ``target`` — the smallest model whose accuracy loss is at most ``max_loss`` on every device.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from tuneqn.controller.search.base import LEVELS, Outcome, PairStrategy, PerPair, Request, SearchView, Strategy

if TYPE_CHECKING:
    from tuneqn.controller.config import SearchRun

__all__ = ["LEVELS", "Outcome", "PairStrategy", "PerPair", "Request", "SearchView", "Strategy", "make_strategy"]


#: strategy name -> "module:class" of its per-(model, recipe) part
_PAIRS = {
    "sweep": "sweep:SweepPair",
    "decremental": "sweep:SweepPair",
    "greedy": "greedy:GreedyPair",
    "budget": "budget:BudgetPair",
    "target": "target:TargetPair",
}


def make_strategy(run: SearchRun, view: SearchView) -> Strategy:
    """The strategy of one search over every (model, recipe) of the study."""
    if run.strategy not in _PAIRS:
        raise ValueError(f"unknown search strategy {run.strategy!r}")
    module, _, cls = _PAIRS[run.strategy].partition(":")
    pair_cls = getattr(importlib.import_module(f"tuneqn.controller.search.{module}"), cls)
    return PerPair(view, run, pair_cls)
