"""The recipe gate of recipes chosen automatically (``[quantization] recipes = "auto"``, the default).

Which recipes auto tries on a model is decided when the study is prepared
(:func:`tuneqn.controller.quantize.auto.auto_recipes`).

The gate. Every auto recipe's fully quantized model is evaluated in full on every device first.
Then, per model, recipe r goes on to the search unless, on every device where it has a result,
another recipe's fully quantized model *covers* it there (:func:`covers`): it is no larger, and
it disagrees with FP32 on clearly fewer of the same images — b − c > 1.96·√(b + c), b (c) the
images only r (only the other) gets wrong, a paired (McNemar) test at 95 %, so it takes at least 4
images. So a recipe continues when its point (accuracy loss, size) is on the front of the recipes'
fully quantized points on some device, or behind it only within the sample's noise. Equal points
do not stop each other: on EfficientNet-Lite0 per-tensor-percentile's fully quantized model is
wrong on exactly per-tensor's images (10 bytes larger), yet its search finds 1 % loss at 4.81 MB
where per-tensor's best is 5.93 MB — the same fully quantized predictions do not mean the same
front. A device where
a recipe's fully quantized model failed for good (or where FP32 failed) is left out of its decision;
a recipe with no result anywhere stops with that reason. Until every recipe's fully quantized model
is final on every device the model's decisions are ``pending``.

:func:`decide` is the rule (a pure function of the points); :func:`fq_points` reads the points
from the store, so the orchestrator (which recipes it searches) and the report
(``report["recipe_selection"]``) take the same decisions from the same stored results, also on a
resumed study.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tuneqn.controller import accuracy
from tuneqn.controller.quantize.auto import META
from tuneqn.controller.store import FINAL_JOB_STATES, Store

#: z of the paired test: one-sided 97.5 % (the two-sided 95 % of McNemar's test).
Z = 1.96
SEARCHED, STOPPED, PENDING = "searched", "stopped", "pending"

RULE = (
    "every auto recipe's fully quantized model is evaluated on every device; a recipe goes on to the "
    "search unless, on every device, another recipe's fully quantized model is no larger and disagrees "
    "with FP32 on clearly fewer of the same images (b − c > 1.96·√(b + c), b and c the images only one "
    "of the two gets wrong: a paired 95 % test, at least 4 images)"
)


# --------------------------------------------------------------------------- the rule


@dataclass(frozen=True)
class FqPoint:
    """A recipe's fully quantized model on one device: its size and where it disagrees with FP32."""

    size_bytes: int
    n: int  # samples of the evaluation
    wrong: frozenset[int]  # positions where its top-1 differs from FP32's
    candidate: str = ""
    overlap: float | None = None  # mean share of FP32's top-k in its top-k (accuracy.overlap)

    @property
    def loss(self) -> float:
        """Accuracy loss: 1 − top-1 agreement with FP32."""
        return len(self.wrong) / self.n if self.n else 0.0


@dataclass(frozen=True)
class FqFailed:
    """A recipe's fully quantized model has no result on a device, for good."""

    reason: str
    candidate: str = ""


Point = FqPoint | FqFailed | None  # None: not final yet


@dataclass(frozen=True)
class Decision:
    """What the gate decided for one recipe of one model."""

    recipe: str
    status: str  # searched | stopped | pending
    reason: str
    points: dict[str, Point]

    def to_dict(self, model: str) -> dict[str, Any]:
        """The entry of ``report["recipe_selection"][].recipes``."""
        fq = next(
            (p.candidate for p in self.points.values() if p is not None and p.candidate), f"{model}:{self.recipe}:fq"
        )
        devices = []
        for dev, p in self.points.items():
            entry: dict[str, Any] = {
                "device": dev,
                "accuracy_loss": None,
                "size_bytes": None,
                "n": None,
                "candidate": None,
                "error": None,
            }
            if isinstance(p, FqPoint):
                entry.update({"accuracy_loss": p.loss, "size_bytes": p.size_bytes, "n": p.n, "candidate": p.candidate})
            elif isinstance(p, FqFailed):
                entry.update({"error": p.reason, "candidate": p.candidate})
            devices.append(entry)
        return {
            "recipe": self.recipe,
            "status": self.status,
            "reason": self.reason,
            "fq_candidate": fq,
            "devices": devices,
        }


def clearly_fewer(mine: frozenset[int], theirs: frozenset[int]) -> bool:
    """Whether ``theirs`` disagrees with FP32 on clearly fewer of the same images than ``mine`` (paired test)."""
    b, c = len(mine - theirs), len(theirs - mine)
    return b - c > Z * math.sqrt(b + c)


def covers(other: FqPoint, mine: FqPoint) -> bool:
    """``other`` is no larger than ``mine`` and wrong on clearly fewer of the same images."""
    if other.size_bytes > mine.size_bytes or other.n != mine.n:
        return False
    return clearly_fewer(mine.wrong, other.wrong)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n} B"


def _covered_by(by: str, q: Point, device: str, p: FqPoint) -> str:
    """Why ``p`` stops on ``device``: recipe ``by``'s point ``q`` covers it."""
    if not isinstance(q, FqPoint):
        return f"on {device} {by} covers it"
    how = f"wrong on clearly fewer of the same {p.n} images"
    return (
        f"on {device} {by} is {_mb(q.size_bytes)} (≤ {_mb(p.size_bytes)}) at loss {q.loss:.1%} (vs {p.loss:.1%}; {how})"
    )


def decide(points: dict[str, dict[str, Point]]) -> list[Decision]:
    """The gate's decision for each recipe of one model, in the order of ``points``.

    ``points[recipe][device]``: the recipe's fully quantized point on the device, :class:`FqFailed`
    when it has none for good, None while it is not final (then every decision is ``pending``).
    """
    recipes = list(points)
    if any(p is None for per in points.values() for p in per.values()):
        waiting = sorted({d for per in points.values() for d, p in per.items() if p is None})
        return [
            Decision(r, PENDING, f"waiting for the fully quantized models' results on {', '.join(waiting)}", points[r])
            for r in recipes
        ]
    out = []
    for r in recipes:
        mine = {d: p for d, p in points[r].items() if isinstance(p, FqPoint)}
        if not mine:
            fails = "; ".join(f"{d}: {p.reason}" for d, p in points[r].items() if isinstance(p, FqFailed))
            nothing = f"its fully quantized model has no result on any device ({fails or 'no device'})"
            out.append(Decision(r, STOPPED, nothing, points[r]))
            continue
        kept: list[str] = []
        why: list[str] = []
        for d, p in mine.items():
            by = next(
                (s for s in recipes if s != r and isinstance(q := points[s].get(d), FqPoint) and covers(q, p)), None
            )
            if by is None:
                kept.append(d)
            else:
                why.append(_covered_by(by, points[by][d], d, p))
        failed = [d for d, p in points[r].items() if isinstance(p, FqFailed)]
        note = f"; no result on {', '.join(failed)}" if failed else ""
        if kept:
            out.append(
                Decision(
                    r,
                    SEARCHED,
                    f"on or near the front of the fully quantized models on {', '.join(kept)}{note}",
                    points[r],
                )
            )
        else:
            out.append(Decision(r, STOPPED, "; ".join(why) + note, points[r]))
    return out


# --------------------------------------------------------------------------- from the store


def auto_models(store: Store) -> dict[str, list[str]]:
    """The recipes auto chose per model ({} when the study's recipes were explicit)."""
    raw = store.get_meta(META)
    info = json.loads(raw) if raw else {}
    return {str(m): [str(r) for r in rs] for m, rs in (info.get("models") or {}).items()} if info.get("auto") else {}


def fq_points(
    store: Store,
    model: str,
    recipes: Sequence[str],
    devices: Sequence[str],
    candidate_of: Callable[[str], str | None] | None = None,
) -> dict[str, dict[str, Point]]:
    """Each recipe's fully quantized point on each device class, from the store (``candidate_of``: the
    candidate id of another point of each recipe, e.g. its best case, instead of its fully quantized model).

    On a class where feasibility planning runs a variant instead (``<recipe>.float-Conv``), the
    variant's fully quantized model stands for the recipe. The newest full job of the candidate on
    the class counts: no job yet or not final → None; final without a result, or without an
    agreement because FP32 failed there → :class:`FqFailed`.
    """
    final = FINAL_JOB_STATES
    planned = {(r["recipe"], r["device_class"]): r["planned"] for r in store.feasibility(model=model)}
    base_jobs = _newest(store.jobs(level="full", candidate_id=accuracy.baseline_id(model)))
    out: dict[str, dict[str, Point]] = {}
    for recipe in recipes:
        per: dict[str, Point] = {}
        for dev in devices:
            planned_recipe = planned.get((recipe, dev), recipe)
            other = candidate_of(planned_recipe) if candidate_of is not None else None
            cid = other or f"{model}:{planned_recipe}:fq"
            job = _newest(store.jobs(level="full", candidate_id=cid)).get(dev)
            if job is None or job["state"] not in final:
                per[dev] = None
                continue
            result = store.result(job["id"]) if job["state"] == "done" else None
            if result is None:
                per[dev] = FqFailed(f"{job['state']}: {job.get('error') or 'no result'}", cid)
                continue
            if result["agreement"] is None:
                base = base_jobs.get(dev)
                if base is not None and base["state"] in final and base["state"] != "done":
                    per[dev] = FqFailed(f"FP32 {base['state']} there: nothing to compare with", cid)
                else:
                    per[dev] = None
                continue
            cand = store.candidate(cid)
            size = int(cand["size_bytes"]) if cand else 0
            wrong = frozenset(accuracy.disagreeing_of(store, result))
            per[dev] = FqPoint(size, int(result["num_samples"] or 0), wrong, cid, accuracy.overlap_of(store, result))
        out[recipe] = per
    return out


def search_order(
    recipes: Sequence[str], fq: dict[str, dict[str, Point]], best: dict[str, dict[str, Point]]
) -> list[str]:
    """The order in which a model's recipes are searched: the recipe whose *best case* loses least first
    (worst device; the best case is the candidate with every searched layer in float, the lowest loss its
    candidates can be expected to reach; without one, the fully quantized point stands for it), then the
    fully quantized model closest to FP32 by top-k overlap, then by loss, then the smaller fully quantized
    file, then the given order.

    The answer is the smallest file within the loss limit: the recipe that can come closest to FP32 is the
    likeliest to hold it, whatever its fully quantized model loses. Recipes that differ only in weight
    granularity have the same best case (no weight is quantized in it); their fully quantized models then
    decide, by top-k overlap first: on a small sample, top-1 loss moves one image at a time (1.4 % on 70)
    while the overlap counts each of the top k, so it tells apart what the loss cannot."""

    def worst(points: dict[str, Point]) -> tuple[float, int, float]:
        per = [p for p in points.values() if isinstance(p, FqPoint)]
        if not per:
            return (math.inf, 0, 0.0)
        return (max(p.loss for p in per), max(p.size_bytes for p in per), min(p.overlap or 0.0 for p in per))

    def key(item: tuple[int, str]) -> tuple[float, float, float, int, int]:
        i, recipe = item
        fq_loss, fq_size, fq_overlap = worst(fq.get(recipe, {}))
        best_loss, _, _ = worst(best.get(recipe, {}))
        return (fq_loss if best_loss == math.inf else best_loss, -fq_overlap, fq_loss, fq_size, i)

    return [r for _, r in sorted(enumerate(recipes), key=key)]


def _newest(jobs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    newest: dict[str, dict[str, Any]] = {}
    for j in jobs:  # ordered by created_at: the newest wins
        newest[str(j["device"])] = j
    return newest


def decisions(store: Store, model: str, recipes: Sequence[str], devices: Sequence[str]) -> list[Decision]:
    """The gate's decisions for a model's auto recipes on the given device classes, from the store."""
    if not devices:
        return [Decision(r, PENDING, "no device yet", {}) for r in recipes]
    return decide(fq_points(store, model, recipes, devices))


def selection(store: Store) -> list[dict[str, Any]]:
    """``report["recipe_selection"]``: per model whose recipes auto chose, every recipe's decision."""
    models = auto_models(store)
    if not models:
        return []
    devices = [d["name"] for d in store.devices()]
    return [
        {"model": model, "rule": RULE, "recipes": [d.to_dict(model) for d in decisions(store, model, recipes, devices)]}
        for model, recipes in models.items()
    ]
