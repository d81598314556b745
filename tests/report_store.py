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

MODEL = "net"
CLASSES = 10
_clock = itertools.count(1)


def open_store(tmp: Path, *, objectives: list[dict[str, Any]] | None = None, name: str = "unit") -> Store:
    """An empty store with a study config (objectives as given) and a name."""
    cfg = parse_config(
        {"name": name, "models": [{"path": "net.onnx"}], "dataset": {"images": "images"},
         "objectives": objectives or [{"name": "accuracy_loss"}, {"name": "size"}]},
        tmp,
    )
    store = Store.open(tmp / "out")
    store.set_meta("config", cfg.model_dump_json())
    store.set_meta("name", name)
    return store


def add_model(store: Store, name: str = MODEL, size: int = 4_000_000) -> None:
    """A prepared model row and its FP32 baseline candidate."""
    store.put_model({
        "name": name, "source": f"local:{name}.onnx", "path": f"/models/{name}.onnx", "sha256": "a" * 64,
        "source_sha256": "a" * 64, "size_bytes": size, "opset_original": 13, "opset_used": 13, "upgraded": False,
        "input_name": "x", "input_shape": json.dumps([1, 3, 8, 8]), "notes": json.dumps([]),
    })
    add_candidate(store, f"{name}:fp32", model=name, k=None, kind="fp32", size=size, mode="fp32")


def add_candidate(store: Store, cid: str, *, model: str = MODEL, k: int | None, kind: str = "ranked",
                  size: int = 1_000_000, mode: str = "static") -> None:
    """A candidate row."""
    store.put_candidate({
        "id": cid, "model": model, "mode": mode, "k": k, "kind": kind, "label": f"top-{k}" if k is not None else cid,
        "excluded": [f"conv_{i}" for i in range(k or 0)], "settings_key": "s", "build_key": "b",
        "path": f"/cands/{cid}.onnx", "size_bytes": size, "sha256": hashlib.sha256(cid.encode()).hexdigest(), "runtime": {},
    })


def add_eval_split(store: Store, labels: list[int] | None, *, model: str = MODEL,
                   skipped: list[dict[str, str]] | None = None) -> None:
    """The eval split of ``model`` (labels may be None; ``skipped``: unreadable inputs)."""
    n = len(labels) if labels is not None else 0
    store.put_dataset(f"{model}/eval", Path(f"/data/{model}/eval.npy"), "d" * 64, [f"img_{i}.png" for i in range(n)],
                      labels, skipped)


def predictions(n: int, rng: np.random.Generator, k: int = 5) -> np.ndarray:
    """``n x k`` distinct class indices per sample."""
    return np.stack([rng.permutation(CLASSES)[:k] for _ in range(n)]).astype("<i4")


def add_result(store: Store, cid: str, device: str, topk: np.ndarray, *,
               latency: tuple[float, float, float] | None = (5.0, 4.8, 5.4)) -> str:
    """A job for (cid, device) and its result, as the dispatcher stores them; returns the job id."""
    job_id = f"tq-{cid}-{device}-{next(_clock)}"
    store.add_job(job_id, cid, device)
    median, p10, p90 = latency if latency is not None else (None, None, None)
    stats = {"median_ms": median or 0.0, "p10_ms": p10 or 0.0, "p90_ms": p90 or 0.0, "mean_ms": median or 0.0,
             "std_ms": 0.1, "min_ms": p10 or 0.0, "max_ms": p90 or 0.0, "count": 20 if latency else 0}
    stored = store.put_result({
        "job_id": job_id, "candidate_id": cid, "device": device, "agent": "a1", "agent_id": "id-a1",
        "num_samples": int(topk.shape[0]), "top_k": int(topk.shape[1]), "topk": topk.astype("<i4").tobytes(),
        "agreement": None, "accuracy": None, "accuracy_top5": None, "latency_ms": median,
        "latency": json.dumps(stats), "size_bytes": 1, "simulated": 0.0, "finished_at": float(next(_clock)),
        "info": "{}", "attempt": 1,
    })
    assert stored
    return job_id


def add_device(store: Store, name: str, device_class: str | None = None) -> None:
    """A device row."""
    store.put_device(name, device_class or name, {"cores": 4})
