"""Metrics of an evaluation result, computed once when the result arrives and stored with it.

The live loop (the dispatcher calls :func:`on_result` right after ``store.put_result``)
and the report share this module; the report only reads the stored values.

* ``agreement``: top-1 agreement with the FP32 baseline result (candidate ``f"{model}:fp32"``)
  of the same prepared model (``model_sha256``: the file the candidate was built from), on
  the same evaluation sample (``sample_sha256``) and the same device class; the newest such
  result when there are several. The paper's accuracy loss is ``1 - agreement``. None until
  that baseline is stored, or when the two results cover different numbers of samples. The
  job id of the FP32 result used is stored with the result (``baseline_job``). Results stored
  without the two hashes (an older tuneqn) match any FP32 result of their model and device.
* ``accuracy`` / ``accuracy_top5``: top-1 / top-5 hits against the labels of the
  model's evaluation split (``store.dataset(f"{model}/eval")["labels"]``; samples with
  a negative label are left out). None without labels.

A baseline is itself a result: when it arrives, every stored result of that model on
that device whose baseline it now is (it lacked one, or the baseline it was scored against
is no longer the newest of its model and sample) is scored again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from tuneqn.controller.store import Store

log = logging.getLogger(__name__)

METRIC_KEYS = ("agreement", "accuracy", "accuracy_top5")
FP32_SUFFIX = ":fp32"


def baseline_id(model: str) -> str:
    """Candidate id of a model's FP32 baseline."""
    return f"{model}{FP32_SUFFIX}"


def topk_of(row: dict[str, Any]) -> np.ndarray:
    """The ``(num_samples, top_k)`` class indices of a stored result row."""
    data = np.frombuffer(row["topk"], dtype="<i4")
    n, k = int(row["num_samples"]), int(row["top_k"])
    if data.size != n * k:
        raise ValueError(f"result {row.get('job_id')!r}: {data.size} class indices, expected {n} x {k}")
    return data.reshape(n, k)


def agreement(topk: np.ndarray, baseline_topk: np.ndarray) -> float | None:
    """Fraction of samples whose top-1 class equals the baseline's; None if the sample counts differ."""
    if len(topk) != len(baseline_topk) or len(topk) == 0:
        return None
    return float((topk[:, 0] == baseline_topk[:, 0]).mean())


def overlap(topk: np.ndarray, baseline_topk: np.ndarray) -> float | None:
    """Mean share of the baseline's top-k classes that are also in the candidate's top-k."""
    if topk.shape != baseline_topk.shape or len(topk) == 0:
        return None
    k = topk.shape[1]
    hits = (topk[:, :, None] == baseline_topk[:, None, :]).any(axis=2).sum(axis=1)
    return float(hits.mean() / k)


def overlap_of(store: Store, row: dict[str, Any]) -> float | None:
    """:func:`overlap` of a stored result with its model's FP32 result on the same device and samples."""
    model = model_of(store, row["candidate_id"])
    base = _reference(store, model, row) if model else None
    return None if base is None else overlap(topk_of(row), topk_of(base))


def disagreeing_of(store: Store, row: dict[str, Any]) -> tuple[int, ...]:
    """Positions of the samples where a stored result's top-1 differs from its FP32 reference's."""
    model = model_of(store, row["candidate_id"])
    base = _reference(store, model, row) if model else None
    if base is None:
        return ()
    t, b = topk_of(row), topk_of(base)
    if t.shape != b.shape:
        return ()
    return tuple(int(i) for i in np.flatnonzero(t[:, 0] != b[:, 0]))


def accuracy(topk: np.ndarray, labels: Sequence[int] | None, k: int = 1) -> float | None:
    """Top-``k`` accuracy against ``labels`` (negative = unlabelled, skipped); None without labels.

    None also when the result has fewer than ``k`` classes per sample or another sample count.
    """
    if not labels or topk.ndim != 2 or topk.shape[1] < k:
        return None
    lab = np.asarray(labels)
    if len(lab) != len(topk):
        return None
    mask = lab >= 0
    if not mask.any():
        return None
    hit = (topk[mask, :k] == lab[mask, None]).any(axis=1)
    return float(hit.mean())


def compute(
    row: dict[str, Any], baseline: dict[str, Any] | None, labels: Sequence[int] | None
) -> dict[str, float | None]:
    """The metrics of result ``row`` given its baseline result row (or None) and the eval labels."""
    t = topk_of(row)
    return {
        "agreement": agreement(t, topk_of(baseline)) if baseline is not None else None,
        "accuracy": accuracy(t, labels, 1),
        "accuracy_top5": accuracy(t, labels, 5),
    }


def model_of(store: Store, candidate_id: str) -> str | None:
    """The model of a candidate (from its row; an FP32 baseline id names it too)."""
    cand = store.candidate(candidate_id)
    if cand is not None:
        return str(cand["model"])
    if candidate_id.endswith(FP32_SUFFIX):
        return candidate_id[: -len(FP32_SUFFIX)]
    return None


def _matches(base: dict[str, Any], row: dict[str, Any]) -> bool:
    """Whether the FP32 result ``base`` was measured on what ``row`` is compared with: the same prepared
    model and the same evaluation sample (a hash unknown on either side, an older store's, matches)."""
    return all(not base.get(k) or not row.get(k) or base[k] == row[k] for k in ("model_sha256", "sample_sha256"))


def _baselines(store: Store, model: str, device: str) -> list[dict[str, Any]]:
    """The model's full FP32 results on a device class, oldest first."""
    return [
        b for b in store.results(candidate_id=baseline_id(model), device=device, level="full") if _split(b) == "eval"
    ]


def _baseline(
    store: Store, model: str, row: dict[str, Any], baselines: list[dict[str, Any]] | None = None
) -> dict[str, Any] | None:
    """The FP32 result a result's agreement is computed against (see the module docstring), or None."""
    rows = [
        b for b in (_baselines(store, model, row["device"]) if baselines is None else baselines) if _matches(b, row)
    ]
    return rows[-1] if rows else None  # newest


def _split(row: dict[str, Any]) -> str:
    """The split a result predicted: ``eval`` (full) or ``screen/<recipe>`` (a screening subset)."""
    return row.get("split") or "eval"


def _screen_indices(store: Store, model: str, split: str) -> list[int] | None:
    """Positions in the evaluation sample of the samples of a screening split."""
    sub, ev = store.dataset(f"{model}/{split}"), store.dataset(f"{model}/eval")
    if sub is None or ev is None:
        return None
    pos = {name: i for i, name in enumerate(ev["items"])}
    if any(name not in pos for name in sub["items"]):
        return None
    return [pos[name] for name in sub["items"]]


def _reference(
    store: Store, model: str, row: dict[str, Any], baselines: list[dict[str, Any]] | None = None
) -> dict[str, Any] | None:
    """The FP32 result a result is compared with (:func:`_baseline`), restricted to the screening split's
    samples for a screening result (no FP32 screen is run); ``baselines``: :func:`_baselines`, if read."""
    base = _baseline(store, model, row, baselines)
    if base is None or _split(row) == "eval":
        return base
    ev = store.dataset(f"{model}/eval")
    if ev is None or (row.get("sample_sha256") and ev["sha256"] != row["sample_sha256"]):
        return None  # the screen's positions are known only in the current evaluation sample
    idx = _screen_indices(store, model, _split(row))
    if idx is None:
        return None
    t = topk_of(base)[idx]
    return {"job_id": base["job_id"], "topk": t.astype("<i4").tobytes(), "num_samples": len(idx), "top_k": t.shape[1]}


def _labels(store: Store, model: str, split: str = "eval") -> list[int] | None:
    row = store.dataset(f"{model}/{split}")
    return None if row is None else row.get("labels")


def on_result(store: Store, job_id: str) -> None:
    """Compute and store the metrics of the result of ``job_id`` (call right after ``put_result``).

    When the result is an FP32 baseline, also fill in the agreement of every stored result
    of that model on that device that lacks one. Runs in one store transaction, so a result
    and its baseline arriving on two threads at once cannot overwrite each other's metrics.
    Raises ValueError when no result is stored for ``job_id`` or its predictions are malformed.
    """
    with store.transaction():
        _on_result(store, job_id)


def _on_result(store: Store, job_id: str) -> None:
    row = store.result(job_id)
    if row is None:
        raise ValueError(f"no result stored for job {job_id!r}")
    model = model_of(store, row["candidate_id"])
    if model is None:
        log.warning("result %s: candidate %s is unknown; metrics not computed", job_id, row["candidate_id"])
        return
    device = row["device"]
    labels = _labels(store, model, _split(row))
    is_baseline = _is_baseline(row, model)
    baseline = row if is_baseline else _reference(store, model, row)
    store.set_result_metrics(job_id, compute(row, baseline, labels), _job_of(baseline))
    if not is_baseline:
        return
    of_model = {c["id"] for c in store.candidates(model=model)}
    baselines = _baselines(store, model, device)
    n = 0
    for other in store.results(device=device):
        if other["candidate_id"] not in of_model or _is_baseline(other, model) or not _matches(row, other):
            continue  # not a candidate of the model, or measured on another model or sample: not its baseline
        metrics = {k: other[k] for k in METRIC_KEYS}
        try:
            ref = _reference(store, model, other, baselines)
            if ref is None or (ref["job_id"] == other["baseline_job"] and other["agreement"] is not None):
                continue  # no baseline of its own sample and model, or scored against the right one already
            metrics["agreement"] = agreement(topk_of(other), topk_of(ref))
        except ValueError as exc:  # another result's malformed row must not cost the baseline its metrics
            log.warning("result %s: agreement not computed: %s", other["job_id"], exc)
            continue
        store.set_result_metrics(other["job_id"], metrics, ref["job_id"])
        n += 1
    if n:
        log.info("baseline %s on %s: %d results scored against FP32 result %s", model, device, n, job_id)


def _is_baseline(row: dict[str, Any], model: str) -> bool:
    """Whether a result is one of the model's full FP32 results (its own baseline)."""
    return row["candidate_id"] == baseline_id(model) and _split(row) == "eval"


def _job_of(baseline: dict[str, Any] | None) -> str | None:
    return None if baseline is None else str(baseline["job_id"])


def backfill(store: Store) -> int:
    """Compute metrics that stored results lack although they could have them; returns how many rows changed.

    For results stored without :func:`on_result` (an older tuneqn, or a caller that did
    not call it); a no-op on a store the live loop kept up to date except for rows whose
    metrics cannot exist (no baseline, no labels), which are checked cheaply and skipped.
    """
    with store.transaction():
        return _backfill(store)


def _backfill(store: Store) -> int:
    changed = 0
    labels: dict[tuple[str, str], list[int] | None] = {}
    fp32: dict[tuple[str, str], list[dict[str, Any]]] = {}
    baselines: dict[tuple[str, ...], dict[str, Any] | None] = {}
    models: dict[str, str | None] = {}
    for row in store.results():
        cid = row["candidate_id"]
        if cid not in models:
            models[cid] = model_of(store, cid)
        model = models[cid]
        if model is None:
            continue
        split = _split(row)
        if (model, split) not in labels:
            labels[(model, split)] = _labels(store, model, split)
        if (model, row["device"]) not in fp32:
            fp32[(model, row["device"])] = _baselines(store, model, row["device"])
        key = (model, row["device"], split, row.get("model_sha256") or "", row.get("sample_sha256") or "")
        if key not in baselines:
            baselines[key] = _reference(store, model, row, fp32[(model, row["device"])])
        baseline = row if _is_baseline(row, model) else baselines[key]
        base_job = _job_of(baseline)
        want_agreement = baseline is not None and (row["agreement"] is None or row.get("baseline_job") != base_job)
        want_accuracy = row["accuracy"] is None and bool(labels[(model, split)])
        if not (want_agreement or want_accuracy):
            continue
        try:
            metrics = compute(row, baseline, labels[(model, split)])
        except ValueError as exc:  # a malformed stored row must not stop every report
            log.warning("result %s: metrics not computed: %s", row["job_id"], exc)
            continue
        if any(metrics[k] != row[k] for k in METRIC_KEYS) or row.get("baseline_job") != base_job:
            store.set_result_metrics(row["job_id"], metrics, base_job)
            changed += 1
    if changed:
        log.info("computed the metrics of %d stored results that lacked them", changed)
    return changed
