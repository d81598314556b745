"""Compute the report from the store: base (:mod:`.base`) + fronts and summary (:mod:`.finalize`).

Reads only; writes neither the store nor files (that is :mod:`.write`).
"""

from __future__ import annotations

from typing import Any

from tuneqn.controller.store import Store

from .answer import Constraint
from .base import build_base, is_partial
from .finalize import finalize_report

__all__ = ["compute_report", "is_partial"]


def compute_report(store: Store, answer_constraint: Constraint | None = None) -> dict[str, Any]:
    """The finalized report of the study in ``store`` (keys: see :mod:`.finalize`); ``answer_constraint``
    replaces the study's constraint of the answer."""
    return finalize_report(build_base(store, partial=is_partial(store)), answer_constraint)
