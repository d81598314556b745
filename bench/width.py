"""Search width: a budget search on one agent exposing 1 or 3 devices of one class (like a TVM agent
fronting phones), with a simulated per-sample device latency, in one run.

The width of a search is the number of live devices of the class, so with 3 devices the budget keeps
3 evaluations in flight. Prints per device count: the wall time of ``tune`` (from the first job to the
end), full evaluations, the widths recorded per decision and the most evaluations that ran at once.

    python bench/width.py [--sim-ms 40] [--layers 24] [--budget 10] [--devices 1 3]

The model is a chain of Gemm+Relu layers with random weights (built here), the data random tensors;
latency measurement is off so the simulated device time dominates. ONNX Runtime runs with one intra-op
thread per device.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tuneqn.agent.backends.ort import OrtBackend
from tuneqn.agent.config import AgentConfig
from tuneqn.agent.server import AgentServer
from tuneqn.controller.config import parse_config
from tuneqn.controller.farm.jobs import Endpoint, FarmSettings
from tuneqn.controller.orchestrator import tune
from tuneqn.controller.study import Study


def deep_mlp(path: Path, layers: int, features: int = 32, seed: int = 0) -> Path:
    """``layers`` Gemm(+Relu) layers, 10 classes at the end."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "input"
    for i in range(layers):
        out_dim = 10 if i == layers - 1 else features
        weights = rng.normal(0, 1.4 / np.sqrt(features), (features, out_dim)).astype(np.float32)
        inits += [
            numpy_helper.from_array(weights, f"W{i}"),
            numpy_helper.from_array(rng.normal(0, 0.1, out_dim).astype(np.float32), f"B{i}"),
        ]
        last = i == layers - 1
        nodes.append(helper.make_node("Gemm", [x, f"W{i}", f"B{i}"], ["logits" if last else f"s{i}"], name=f"gemm{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [f"s{i}"], [f"a{i}"], name=f"relu{i}"))
            x = f"a{i}"
    graph = helper.make_graph(
        nodes,
        "deep_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, path)
    return path


def one(tmp: Path, devices: int, sim_ms: float, layers: int, budget: int) -> dict[str, Any]:
    """One study on an agent with ``devices`` devices of class ``phones``."""
    deep_mlp(tmp / "mlp.onnx", layers)
    data = np.random.default_rng(1).normal(0, 1, (120, 32)).astype(np.float32)
    data[:, 0] *= 30  # one wide feature: per-tensor int8 ranges crush the others (quantization costs accuracy)
    np.save(tmp / "data.npy", data)
    cfg = parse_config(
        {
            "out_dir": str(tmp / "out"),
            "models": [{"path": str(tmp / "mlp.onnx")}],
            "dataset": {"tensors": str(tmp / "data.npy"), "eval": 50, "calibration": 20, "analysis": 8},
            "quantization": {"modes": ["static"]},
            "search": {"strategy": "budget", "ranking": "paper", "budget": budget},
            "evaluation": {"latency_repeats": 0, "intra_op_threads": 1},
        },
        tmp,
    )
    backends = [
        OrtBackend(f"phone{i}", "phones", simulated_latency_ms_per_sample=sim_ms) for i in range(1, devices + 1)
    ]
    server = AgentServer(AgentConfig(state_dir=tmp / "agent"), backends)
    server.start()
    study = Study(cfg)
    try:
        outcome = tune(study, [Endpoint(address=server.address)], FarmSettings.from_config(cfg.evaluation))
    finally:
        study.close()
        server.stop()
    con = sqlite3.connect(tmp / "out" / "tuneqn.db")
    spans = [
        (f - s, f)
        for s, f in con.execute("select json_extract(info, '$.seconds'), finished_at from results where level = 'full'")
    ]
    edges = sorted([(s, 1) for s, _ in spans] + [(f, -1) for _, f in spans])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return {
        "devices": devices,
        "wall_s": max(f for _, f in spans) - min(s for s, _ in spans),
        "full": len(spans),
        "done": outcome.done,
        "failed": outcome.failed,
        "widths": sorted({w for (w,) in con.execute("select width from search_widths")}),
        "most_at_once": most,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sim-ms", type=float, default=40.0, help="simulated device latency per sample (ms)")
    ap.add_argument("--layers", type=int, default=24, help="layers of the model (the budget bisects their prefixes)")
    ap.add_argument("--budget", type=int, default=10, help="full evaluations of the budget search")
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 3], help="device counts to compare")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    rows = []
    for n in args.devices:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            row = one(Path(tmp), n, args.sim_ms, args.layers, args.budget)
            row["tune_s"] = time.perf_counter() - t0
        rows.append(row)
        print(
            f"{n} device(s): evaluation phase {row['wall_s']:.1f} s (whole run {row['tune_s']:.1f} s), "
            f"{row['full']} full evaluations, widths {row['widths']}, at most {row['most_at_once']} at once"
        )
    if len(rows) > 1:
        print(
            f"speed-up {rows[-1]['devices']} vs {rows[0]['devices']} device(s): "
            f"{rows[0]['wall_s'] / rows[-1]['wall_s']:.2f}x (evaluation phase)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
