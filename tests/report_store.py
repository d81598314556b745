"""A real study store (SQLite in a tmp dir) filled the way the controller fills it, for report tests."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from tuneqn.controller.config import parse_config
from tuneqn.controller.store import Store
from tuneqn.controller.study import candidate_id

MODEL = "net"
CLASSES = 10
_clock = itertools.count(1)


def open_store(
    tmp: Path, *, objectives: list[dict[str, Any]] | None = None, name: str = "unit", recipes: list[str] | None = None
) -> Store:
    """An empty store with a study config (objectives and recipe presets as given) and a name."""
    raw: dict[str, Any] = {
        "name": name,
        "models": [{"path": "net.onnx"}],
        "dataset": {"images": "images"},
        "objectives": objectives or [{"name": "accuracy_loss"}, {"name": "size"}],
    }
    cfg = parse_config(raw, tmp)
    if recipes:
        cfg = cfg.model_copy(update={"quantization": cfg.quantization.with_recipes(recipes)})
    store = Store.open(tmp / "out")
    store.set_meta("config", cfg.model_dump_json())
    store.set_meta("name", name)
    return store


def add_model(store: Store, name: str = MODEL, size: int = 4_000_000) -> None:
    """A prepared model row and its FP32 baseline candidate."""
    store.put_model(
        {
            "name": name,
            "source": f"local:{name}.onnx",
            "path": f"/models/{name}.onnx",
            "sha256": "a" * 64,
            "source_sha256": "a" * 64,
            "size_bytes": size,
            "opset_original": 13,
            "opset_used": 13,
            "upgraded": False,
            "input_name": "x",
            "input_shape": json.dumps([1, 3, 8, 8]),
            "notes": json.dumps([]),
        }
    )
    store.put_candidate(
        {
            "id": f"{name}:fp32",
            "model": name,
            "mode": "fp32",
            "k": None,
            "kind": "fp32",
            "label": "fp32",
            "excluded": [],
            "settings_key": "",
            "build_key": "a" * 64,
            "path": f"/models/{name}.onnx",
            "size_bytes": size,
            "sha256": "a" * 64,
            "runtime": {},
        }
    )


def layers(k: int) -> list[str]:
    """The first ``k`` layer names of the test model."""
    return [f"conv_{i}" for i in range(k)]


def cand_id(k: int, *, model: str = MODEL, recipe: str = "static", excluded: list[str] | None = None) -> str:
    """The content-addressed id of the candidate excluding ``excluded`` (default: the first ``k`` layers)."""
    return candidate_id(model, recipe, layers(k) if excluded is None else excluded)


def add_candidate(
    store: Store,
    cid: str | None = None,
    *,
    model: str = MODEL,
    k: int | None = None,
    kind: str = "set",
    size: int = 1_000_000,
    mode: str = "static",
    label: str | None = None,
    excluded: list[str] | None = None,
) -> str:
    """A candidate row (id from its content unless given: ``model:recipe:fq`` / ``model:recipe:x…``); its id."""
    ex = excluded if excluded is not None else layers(k or 0)
    if cid is None:
        cid = candidate_id(model, mode, ex)
    store.put_candidate(
        {
            "id": cid,
            "model": model,
            "mode": mode,
            "k": len(ex),
            "kind": kind,
            "label": label or (f"k={k}" if k is not None else cid),
            "excluded": ex,
            "settings_key": "s",
            "build_key": "b",
            "path": f"/cands/{cid}.onnx",
            "size_bytes": size,
            "sha256": hashlib.sha256(cid.encode()).hexdigest(),
            "runtime": {},
        }
    )
    return cid


def add_search(
    store: Store, name: str, *, strategy: str, ranking: str, budget: int | None = None, max_loss: float | None = None
) -> float:
    """A search row, as the orchestrator records it; returns its ``started_at``."""
    store.put_search(name, {"ranking": ranking, "strategy": strategy, "budget": budget, "max_loss": max_loss})
    return float(next(s["started_at"] for s in store.searches() if s["name"] == name))


def add_proposal(store: Store, search: str, cid: str, level: str, *, label: str = "") -> None:
    """A search's request for a (stored) candidate at a level (label: the candidate's unless given)."""
    row = store.candidate(cid)
    assert row is not None, cid
    store.put_proposal(search, cid, level, row["model"], row["mode"], label or row["label"])


def add_eval_split(
    store: Store,
    labels: list[int] | None,
    *,
    model: str = MODEL,
    skipped: list[dict[str, str]] | None = None,
    screen: int | None = None,
    recipes: tuple[str, ...] | list[str] = ("static",),
) -> None:
    """The eval split of ``model`` (labels may be None; ``skipped``: unreadable inputs) and, with
    ``screen``, each recipe's screening split (here: the first ``screen`` samples)."""
    n = len(labels) if labels is not None else 0
    store.put_dataset(
        f"{model}/eval", Path(f"/data/{model}/eval.npy"), "d" * 64, [f"img_{i}.png" for i in range(n)], labels, skipped
    )
    for recipe in recipes if screen is not None else ():
        store.put_dataset(
            f"{model}/screen/{recipe}",
            Path(f"/data/{model}/screen-{recipe}-{screen}.npy"),
            "e" * 64,
            [f"img_{i}.png" for i in range(screen)],
            labels[:screen] if labels else labels,
        )


def predictions(n: int, rng: np.random.Generator, k: int = 5) -> np.ndarray:
    """``n x k`` distinct class indices per sample."""
    return np.stack([rng.permutation(CLASSES)[:k] for _ in range(n)]).astype("<i4")


def add_result(
    store: Store,
    cid: str,
    device: str,
    topk: np.ndarray,
    *,
    latency: tuple[float, float, float] | None = (5.0, 4.8, 5.4),
    level: str = "full",
    seconds: float | None = None,
    finished_at: float | None = None,
    split: str | None = None,
    info: dict[str, Any] | None = None,
) -> str:
    """A job for (cid, device) at ``level`` and its result, as the dispatcher stores them; returns the job id.
    ``info`` adds to the result's info (e.g. ``backend``, ``tuned``, ``compile_seconds``).

    A screening result predicts its recipe's screening split (``screen/<recipe>``, the recipe
    read from the candidate's row)."""
    if split is None:
        cand = store.candidate(cid)
        split = f"screen/{cand['mode'] if cand else 'static'}" if level == "screen" else "eval"
    job_id = f"tq-{cid}-{device}-{level}-{next(_clock)}"
    store.add_job(job_id, cid, device, level)
    median, p10, p90 = latency if latency is not None else (None, None, None)
    stats = {
        "median_ms": median or 0.0,
        "p10_ms": p10 or 0.0,
        "p90_ms": p90 or 0.0,
        "mean_ms": median or 0.0,
        "std_ms": 0.1,
        "min_ms": p10 or 0.0,
        "max_ms": p90 or 0.0,
        "count": 20 if latency else 0,
    }
    stored = store.put_result(
        {
            "job_id": job_id,
            "candidate_id": cid,
            "device": device,
            "agent": "a1",
            "agent_id": "id-a1",
            "num_samples": int(topk.shape[0]),
            "top_k": int(topk.shape[1]),
            "topk": topk.astype("<i4").tobytes(),
            "agreement": None,
            "accuracy": None,
            "accuracy_top5": None,
            "latency_ms": median,
            "latency": json.dumps(stats),
            "size_bytes": 1,
            "simulated": 0.0,
            "finished_at": float(next(_clock)) if finished_at is None else finished_at,
            "info": json.dumps({**({"seconds": seconds} if seconds is not None else {}), **(info or {})}),
            "attempt": 1,
            "level": level,
            "split": split,
        }
    )
    assert stored
    return job_id


def add_device(store: Store, name: str, device_class: str | None = None) -> None:
    """A device row."""
    store.put_device(name, device_class or name, {"cores": 4})
