"""A finalized-report fixture without a store: ``make_study()`` is the base report of a small two-device study."""

from __future__ import annotations

from typing import Any

from tuneqn.controller.study import candidate_id

MB = 1_000_000
ORIGINAL_SIZE = 10 * MB

# (k, size_bytes, cpu agreement, cpu latency, gpu result) for the ranked candidates.
# With objectives accuracy_loss (min, max 0.30) and size (min), in (loss, size MB):
#   cpu: k0 (.40, 2.5) infeasible, k1 (.25, 3), k2 (.26, 4), k3 (.10, 5), k4 (.08, 6), k5 (.08, 7), E (.28, 3.5)
#        front 1 = k1 k3 k4; front 2 = k2 k5 E.  Compromise on front 1: k3.
#   gpu: k0 (.20, 2.5), k1 failed, k2 (.15, 4), k3 (.05, 5), k4 (.05, 6), k5 (.06, 7), E pending
#        front 1 = k0 k2 k3; front 2 = k4; front 3 = k5.  Compromise on front 1: k2.
#   cross-device worst over {cpu, gpu}: k2 (.26, 4), k3 (.10, 5), k4 (.08, 6), k5 (.08, 7);
#        k0, k1, E excluded.  front 1 = k2 k3 k4; front 2 = k5.  Compromise: k3.
_RANKED: list[tuple[int, int, float, float, dict[str, Any]]] = [
    (0, 2_500_000, 0.60, 5.0, {"status": "done", "agreement": 0.80}),
    (1, 3_000_000, 0.75, 6.0, {"status": "failed", "agreement": None, "error": "TVM compile error: unsupported op"}),
    (2, 4_000_000, 0.74, 6.5, {"status": "done", "agreement": 0.85}),
    (3, 5_000_000, 0.90, 7.0, {"status": "done", "agreement": 0.95}),
    (4, 6_000_000, 0.92, 8.0, {"status": "done", "agreement": 0.95}),
    (5, 7_000_000, 0.92, 9.0, {"status": "done", "agreement": 0.94}),
]
LAYER_NAMES = [f"conv_{i}" for i in range(25)]
EXPLICIT = ["conv_0", "fc"]


def cid(k: int | str, recipe: str = "static") -> str:
    """The content-addressed id of ranked candidate k (the first k layers) or of the explicit set."""
    return candidate_id("toynet", recipe, LAYER_NAMES[:k] if isinstance(k, int) else EXPLICIT)


def result_entry(device: str, **kw: Any) -> dict[str, Any]:
    base = {
        "device": device,
        "status": "done",
        "agreement": None,
        "accuracy": None,
        "accuracy_top5": None,
        "latency_ms": None,
        "latency_p10_ms": None,
        "latency_p90_ms": None,
        "error": None,
    }
    base.update(kw)
    return base


def make_study() -> dict[str, Any]:
    """A base report: one model, static mode, cpu + gpu, ranked k = 0..5 and one explicit candidate."""
    candidates: list[dict[str, Any]] = []
    for k, size, cpu_agree, cpu_lat, gpu in _RANKED:
        candidates.append(
            {
                "id": cid(k),
                "model": "toynet",
                "mode": "static",
                "recipe": "static",
                "k": k,
                "kind": "set",
                "label": f"paper k={k}",
                "excluded": LAYER_NAMES[:k],
                "size_bytes": size,
                "sha256": f"{k:064x}",
                "results": [
                    result_entry(
                        "cpu",
                        agreement=cpu_agree,
                        latency_ms=cpu_lat,
                        latency_p10_ms=cpu_lat - 0.25,
                        latency_p90_ms=cpu_lat + 0.5,
                    ),
                    result_entry("gpu", **gpu),
                ],
            }
        )
    candidates.append(
        {
            "id": cid("keep-stem"),
            "model": "toynet",
            "mode": "static",
            "recipe": "static",
            "k": 2,
            "kind": "explicit",
            "label": "keep <stem> & head",
            "excluded": EXPLICIT,
            "size_bytes": 3_500_000,
            "sha256": "e" * 64,
            "results": [result_entry("cpu", agreement=0.72, latency_ms=6.2), result_entry("gpu", status="pending")],
        }
    )
    layers = [
        {
            "model": "toynet",
            "mode": "static",
            "name": name,
            "op_type": "Conv",
            "index": i,
            "qdq_err": 0.5 - i * 0.01,
            "xmodel_err": 0.3 - i * 0.01,
            "score": 1.0 - i / 24,
            "rank": i + 1,
        }
        for i, name in enumerate(LAYER_NAMES)
    ]
    return {
        "tuneqn_version": "0.1.0",
        "generated_at": "2025-01-01T00:00:00Z",
        "partial": True,
        "study": {"name": "toy <study>", "out_dir": "/tmp/toy", "settings": {"seed": 0}},
        "objectives": [
            {"name": "accuracy_loss", "direction": "min", "max": 0.30, "min": None},
            {"name": "size", "direction": "min", "max": None, "min": None},
        ],
        "devices": [
            {"name": "cpu", "device_class": "cpu", "info": {"cores": 8}},
            {"name": "gpu", "device_class": "mali", "info": {}},
        ],
        "models": [
            {
                "name": "toynet",
                "source": "local:toynet.onnx",
                "size_bytes": ORIGINAL_SIZE,
                "sha256": "f" * 64,
                "opset_original": 11,
                "opset_used": 13,
                "upgraded": True,
            }
        ],
        "layers": layers,
        "baselines": [
            {
                "model": "toynet",
                "device": "cpu",
                "status": "done",
                "accuracy": None,
                "accuracy_top5": None,
                "latency_ms": 10.0,
                "size_bytes": ORIGINAL_SIZE,
            },
            {
                "model": "toynet",
                "device": "gpu",
                "status": "done",
                "accuracy": None,
                "accuracy_top5": None,
                "latency_ms": None,
                "size_bytes": ORIGINAL_SIZE,
            },
        ],
        "candidates": candidates,
    }
