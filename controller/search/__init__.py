"""Search strategies: which candidates to evaluate next, from the ranking and the results so far."""

from tuneqn.controller.search.base import SearchView, Strategy
from tuneqn.controller.search.sweep import Sweep

__all__ = ["SearchView", "Strategy", "Sweep", "make_strategy"]


def make_strategy(name: str, view: SearchView) -> Strategy:
    """The strategy called ``name`` for a study."""
    if name in ("sweep", "decremental"):
        return Sweep(view)
    raise ValueError(f"unknown search strategy {name!r}")
