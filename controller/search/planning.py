"""Device-class planning: which recipe runs on which device class (``[evaluation] feasibility``).

The :class:`Planner` keeps what the device classes can run (their supported op types) and the
decisions taken so far; :meth:`Planner.plan` looks at every restricted class and returns
*decisions* — :class:`Probe` (build this fully quantized candidate to check it) and
:class:`Settle` (plan this recipe there) — which the orchestrator applies (builds, analysis
of a variant, the store, the jobs held for it). It never calls back into the orchestrator.
The pure rules (op types, the next variant, descriptions) are in :mod:`.feasibility`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneqn.controller.quantize.feasibility import (
    ADAPTED,
    FEASIBLE,
    GAVE_UP,
    model_op_types,
    next_recipe,
    ops_digest,
    unsupported,
)

if TYPE_CHECKING:
    from tuneqn.controller.study import CandidatePlan, Study

log = logging.getLogger(__name__)

Key = tuple[str, str, str]  # (model, recipe, device class)


@dataclass(frozen=True)
class Settle:
    """Decision: ``planned`` runs instead of (model, recipe) on the class of ``key``."""

    key: Key
    planned: str
    status: str
    unsupported: list[str]
    tried: list[dict[str, Any]] = field(default_factory=list)
    digest: str = ""
    persist: bool = True  # False: read back from the store (decided before on the same op types)


@dataclass(frozen=True)
class Probe:
    """Decision: build ``plan`` (a fully quantized candidate) so that its op types can be checked."""

    plan: CandidatePlan
    variant: bool  # a variant's: a failed build gives the variant up instead of failing the study


class Planner:
    """Supported op types per device class and the recipe planned per (model, recipe, class)."""

    def __init__(self, study: Study, feasibility: str) -> None:
        self.study = study
        self.feasibility = feasibility
        self._lock = threading.Lock()
        self._class_ops: dict[str, frozenset[str] | None] = {}  # supported op types (None: not known yet)
        self._planned: dict[Key, str] = {}  # (model, recipe, class) -> recipe that runs there
        self._tried: dict[Key, list[dict[str, Any]]] = {}  # recipes checked so far
        self._trying: dict[Key, str] = {}  # the recipe whose fully quantized model is checked next
        self._variant_base: dict[tuple[str, str], str] = {}  # (model, variant recipe) -> its base recipe
        self._op_types: dict[str, frozenset[str]] = {}  # built candidate id -> its op types
        self._probes: set[str] = set()  # fully quantized candidates of variants, built to check them
        self._probe_errors: dict[str, str] = {}  # ... and why one did not build

    # ------------------------------------------------------------------ what the classes run
    def register(self, device_class: str, supported: frozenset[str] | None) -> bool:
        """A class appeared or a device of it told its ``supported`` op types (empty: no restriction;
        None: declared only). True when the class's op types became known just now."""
        with self._lock:
            known = self._class_ops.get(device_class)
            if supported is not None:
                # Devices of one class are interchangeable: the class runs what all of its restricted ones run.
                ops = known & supported if known and supported else (known or supported)
                self._class_ops[device_class] = ops
                if known is not None and ops != known:
                    log.warning("device class %s: devices differ in supported op types; planning kept", device_class)
            else:
                self._class_ops.setdefault(device_class, None)
            return known is None and supported is not None

    def known(self, device_class: str) -> bool:
        """Whether a device of the class said what it runs (or the class was released)."""
        with self._lock:
            return self._class_ops.get(device_class) is not None

    def release(self, device_class: str) -> bool:
        """A declared class no device of which ever connected: plan as if unrestricted (its jobs then end
        unreachable). True when that changed something."""
        with self._lock:
            if device_class not in self._class_ops or self._class_ops[device_class] is not None:
                return False
            self._class_ops[device_class] = frozenset()
            return True

    # ------------------------------------------------------------------ what runs where
    def planned_on(self, model: str, recipe: str, device_class: str) -> bool:
        """Whether candidates of (model, recipe) run on a device class (False while that is undecided)."""
        if recipe == "fp32":
            return True
        with self._lock:
            base = self._variant_base.get((model, recipe))
            if base is not None:
                return self._planned.get((model, base, device_class)) == recipe
            if self.feasibility != "adapt":
                return True
            ops = self._class_ops.get(device_class)
            if ops is None:
                return False  # its devices have not said what they run yet
            return not ops or self._planned.get((model, recipe, device_class)) == recipe

    def classes_of(self, model: str, recipe: str, classes: list[str]) -> list[str]:
        """Of ``classes``, those a recipe's results come from: where it is planned, or may still be (undecided)."""
        classes = sorted(classes)
        with self._lock:
            if recipe == "fp32":
                return classes
            base = self._variant_base.get((model, recipe))
            if base is not None:
                return [c for c in classes if self._planned.get((model, base, c)) == recipe]
            return [c for c in classes if self._planned.get((model, recipe, c), recipe) == recipe]

    def variants(self) -> list[tuple[tuple[str, str], str]]:
        """((model, variant), base recipe) of the variants planned so far, sorted."""
        with self._lock:
            return sorted(self._variant_base.items())

    def planned_recipes(self) -> set[tuple[str, str]]:
        """(model, recipe that runs) of every decision and variant so far."""
        with self._lock:
            return {(m, v) for (m, _, _), v in self._planned.items()} | set(self._variant_base)

    def _restricted(self) -> list[tuple[str, frozenset[str]]]:
        with self._lock:
            return [(c, ops) for c, ops in sorted(self._class_ops.items()) if ops]

    def deciding(self) -> bool:
        """Some (model, recipe) of a restricted device class is not planned yet."""
        if self.feasibility != "adapt":
            return False
        with self._lock:
            planned = set(self._planned)
        return any(
            (m, r, c) not in planned
            for c, _ in self._restricted()
            for m in self.study.models
            for r in self.study.recipes(m)
        )

    # ------------------------------------------------------------------ probes (builds of variants)
    def is_probe(self, cid: str) -> bool:
        """Whether ``cid`` was built only to check a variant."""
        return cid in self._probes

    def probe_failed(self, cid: str, error: str) -> None:
        """A variant's fully quantized candidate did not build."""
        self._probe_errors[cid] = error

    # ------------------------------------------------------------------ deciding
    def plan(self, built_path: Callable[[str], Path | None]) -> list[Settle | Probe]:
        """``feasibility = "adapt"``: for every restricted device class, what runs instead of each study
        recipe, as far as the built candidates (``built_path(id)``: its file, None until built) tell."""
        if self.feasibility != "adapt":
            return []
        out: list[Settle | Probe | None] = []
        for cls, ops in self._restricted():
            for model in self.study.models:
                for recipe in self.study.recipes(model):
                    with self._lock:
                        decided = (model, recipe, cls) in self._planned
                    if not decided:
                        out.append(self._decide((model, recipe, cls), ops, built_path))
        return [d for d in out if d is not None]

    def settle(self, decision: Settle) -> None:
        """Record a decision (the orchestrator calls this once it analyzed a variant, before its jobs)."""
        model, recipe, _ = decision.key
        with self._lock:
            self._planned[decision.key] = decision.planned
            if decision.planned != recipe:
                self._variant_base[(model, decision.planned)] = recipe

    def _decide(self, key: Key, ops: frozenset[str], built_path: Callable[[str], Path | None]) -> Settle | Probe | None:
        model, recipe, cls = key
        digest = ops_digest(ops)
        if key not in self._tried:
            stored = self.study.store.feasibility(model, recipe, cls)
            if stored and stored[0]["ops_digest"] == digest:  # decided before on the same op types
                row = stored[0]
                return Settle(
                    key, row["planned"], row["status"], row["unsupported"], row["tried"], digest, persist=False
                )
        tried = self._tried.setdefault(key, [])
        while True:
            current = self._trying.setdefault(key, recipe)
            fq = self.study.make_plan(model, current, ())
            path = built_path(fq.id)
            if path is None and fq.id in self._probe_errors:
                tried.append({"recipe": current, "unsupported": [], "error": self._probe_errors[fq.id]})
                return Settle(key, recipe, GAVE_UP, tried[0]["unsupported"], tried, digest)
            if path is None:
                if current != recipe:
                    self._probes.add(fq.id)
                return Probe(fq, current != recipe)  # checked when it is built
            bad = unsupported(self._ops_of(fq.id, path), ops)
            tried.append({"recipe": current, "unsupported": bad})
            first = tried[0]["unsupported"]
            if not bad:
                return Settle(key, current, FEASIBLE if current == recipe else ADAPTED, first, tried, digest)
            nxt = next_recipe(self.study.cfg.quantization, current, bad, ops, path, self.study.models[model].path)
            if nxt is None or any(t["recipe"] == nxt for t in tried):
                return Settle(key, recipe, GAVE_UP, first, tried, digest)
            self._trying[key] = nxt

    def _ops_of(self, cid: str, path: Path) -> frozenset[str]:
        ops = self._op_types.get(cid)
        if ops is None:
            ops = self._op_types[cid] = model_op_types(path)
        return ops
