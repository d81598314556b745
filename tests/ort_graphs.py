"""What ONNX Runtime really runs: the optimized graph of a session, and its float and quantized layers."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort


def ran_graph(model_path: str, tmp: Path, disabled: list[str]) -> onnx.ModelProto:
    """The graph ONNX Runtime actually runs (default optimization level, as the agent)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp / "optimized.onnx")
    ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    return onnx.load(str(tmp / "optimized.onnx"))


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Float Conv / float Gemm (float weight initializer) and quantized operators in a graph."""
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    out = {"float_conv": 0, "float_gemm": 0, "QLinearConv": 0, "QGemm": 0}
    for n in model.graph.node:
        if n.op_type in ("Conv", "FusedConv") and n.input[1] in floats:
            out["float_conv"] += 1
        elif n.op_type in ("Gemm", "FusedGemm", "MatMul") and n.input[1] in floats:
            out["float_gemm"] += 1
        elif n.op_type in ("QLinearConv", "QGemm"):
            out[n.op_type] += 1
    return out
