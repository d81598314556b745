"""Small ONNX models for the tests, built with onnx.helper (no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _conv(name: str, w: np.ndarray, b: np.ndarray, inp: str, out: str) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    node = helper.make_node("Conv", [inp, f"{name}.W", f"{name}.B"], [out], name=name, pads=[1, 1, 1, 1])
    return node, [
        numpy_helper.from_array(w.astype(np.float32), f"{name}.W"),
        numpy_helper.from_array(b.astype(np.float32), f"{name}.B"),
    ]


def cnn(
    path: Path,
    seed: int = 0,
    wide_layer: str | None = None,
    batch: int | str = "N",
    size: int = 16,
    opset: int = OPSET,
    activation: str = "Relu",
    channels: int = 8,
) -> Path:
    """conv1+Relu → conv2+Relu → conv3+Clip(0,6) → conv4 → GlobalAveragePool → Flatten → fc (Gemm, 10 classes).

    ``wide_layer="conv2"`` gives conv2 a far wider activation range than any other layer: its
    channel 0 fires 30 (≈20× its other values) at one corner of every sample (a padding-aware kernel on a
    constant channel) and is ignored downstream, so per-tensor quantization of conv2's
    output crushes its other channels. conv3's large bias keeps the damage from
    dominating later layers' relative errors. ``activation`` replaces relu1 (e.g. ``Celu``, which ONNX
    Runtime runs and TVM's ONNX frontend cannot import).
    """
    rng = np.random.default_rng(seed)
    c = channels
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    w1 = rng.normal(0, 0.4, (c, 3, 3, 3))
    b1 = rng.normal(0, 0.1, c)
    w2 = rng.normal(0, 0.25, (c, c, 3, 3))
    b2 = rng.normal(0, 0.1, c)
    w3 = rng.normal(0, 0.25, (c, c, 3, 3))
    b3 = rng.normal(0, 0.1, c)
    if wide_layer == "conv2":
        w1[0] = 0.0
        b1[0] = 1.0  # channel 0 of conv1 = 1 everywhere
        w2[0] = 0.0
        a = 30.0
        w2[0, 0] = [[a, -a, 0], [-a, a, 0], [0, 0, 0]]  # non-zero only at the top-left corner
        b2[0] = 0.0
        w2[1:, 0] = 0.0
        w3[:, 0] = 0.0  # conv3 ignores the outlier channel
        b3[:] = 3.0
    n, i = _conv("conv1", w1, b1, "input", "c1")
    nodes += [n, helper.make_node(activation, ["c1"], ["r1"], name="relu1")]
    inits += i
    n, i = _conv("conv2", w2, b2, "r1", "c2")
    nodes += [n, helper.make_node("Relu", ["c2"], ["r2"], name="relu2")]
    inits += i
    n, i = _conv("conv3", w3, b3, "r2", "c3")
    inits += i
    inits += [
        numpy_helper.from_array(np.array(0, np.float32), "zero"),
        numpy_helper.from_array(np.array(6, np.float32), "six"),
    ]
    nodes += [n, helper.make_node("Clip", ["c3", "zero", "six"], ["r3"], name="clip3")]
    n, i = _conv("conv4", rng.normal(0, 0.25, (c, c, 3, 3)), rng.normal(0, 0.1, c), "r3", "c4")
    nodes.append(n)
    inits += i
    nodes += [
        helper.make_node("GlobalAveragePool", ["c4"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.W", "fc.B"], ["logits"], name="fc", transB=1),
    ]
    inits += [
        numpy_helper.from_array(rng.normal(0, 0.5, (10, c)).astype(np.float32), "fc.W"),
        numpy_helper.from_array(rng.normal(0, 0.1, 10).astype(np.float32), "fc.B"),
    ]
    return _save_classifier(path, "cnn", nodes, inits, batch, size, opset)


def mlp(path: Path, seed: int = 1, features: int = 32, batch: int | str = "N") -> Path:
    """A MatMul model: MatMul+Add+Relu → MatMul+Add+Relu → MatMul (10 classes)."""
    rng = np.random.default_rng(seed)
    dims = [features, 64, 64, 10]
    nodes, inits = [], []
    x = "input"
    for li in range(3):
        w = numpy_helper.from_array(
            rng.normal(0, 1 / np.sqrt(dims[li]), (dims[li], dims[li + 1])).astype(np.float32), f"W{li}"
        )
        b = numpy_helper.from_array(rng.normal(0, 0.1, dims[li + 1]).astype(np.float32), f"B{li}")
        inits += [w, b]
        nodes.append(helper.make_node("MatMul", [x, f"W{li}"], [f"mm{li}"], name=f"matmul{li}"))
        out = "logits" if li == 2 else f"a{li}"
        nodes.append(helper.make_node("Add", [f"mm{li}", f"B{li}"], [out if li == 2 else f"s{li}"], name=f"add{li}"))
        if li < 2:
            nodes.append(helper.make_node("Relu", [f"s{li}"], [out], name=f"relu{li}"))
        x = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save_model(model, path)
    return path


def write_images(folder: Path, n: int, size: int = 20, seed: int = 0, labelled: bool = False) -> Path:
    """``n`` random RGB PNG images (names img_<i>_<label>.png when labelled)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
        name = f"img_{i:03d}_{i % 10}.png" if labelled else f"img_{i:03d}.png"
        Image.fromarray(arr).save(folder / name)
    return folder


def padded_cnn(path: Path, seed: int = 2, batch: int | str = "N", size: int = 12) -> Path:
    """What pre-processing changes: a separate Pad before a Conv and constant-foldable subgraphs.

    input → conv1 (weights = Mul(raw, 0.5) of constants) + Relu → Pad (pads from a Constant
    node) → conv2 (no pads of its own) + Relu → GlobalAveragePool → Reshape (shape from
    Constant → Concat) → fc (Gemm, 10 classes).
    """
    rng = np.random.default_rng(seed)
    c = 6
    f32 = np.float32
    nodes = [
        helper.make_node(
            "Constant", [], ["half"], name="half_const", value=numpy_helper.from_array(np.array(0.5, f32))
        ),
        helper.make_node("Mul", ["conv1.Wraw", "half"], ["conv1.W"], name="scale_w1"),
        helper.make_node("Conv", ["input", "conv1.W", "conv1.B"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node(
            "Constant",
            [],
            ["pads"],
            name="pads_const",
            value=numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
        ),
        helper.make_node("Pad", ["r1", "pads"], ["p1"], name="pad2", mode="constant"),
        helper.make_node("Conv", ["p1", "conv2.W", "conv2.B"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node(
            "Constant", [], ["minus1"], name="minus1_const", value=numpy_helper.from_array(np.array([-1], np.int64))
        ),
        helper.make_node(
            "Constant", [], ["chan"], name="chan_const", value=numpy_helper.from_array(np.array([c], np.int64))
        ),
        helper.make_node("Concat", ["minus1", "chan"], ["shape"], name="shape_concat", axis=0),
        helper.make_node("Reshape", ["gap", "shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.W", "fc.B"], ["logits"], name="fc", transB=1),
    ]
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.8, (c, 3, 3, 3)).astype(f32), "conv1.Wraw"),
        numpy_helper.from_array(rng.normal(0, 0.1, c).astype(f32), "conv1.B"),
        numpy_helper.from_array(rng.normal(0, 0.3, (c, c, 3, 3)).astype(f32), "conv2.W"),
        numpy_helper.from_array(rng.normal(0, 0.1, c).astype(f32), "conv2.B"),
        numpy_helper.from_array(rng.normal(0, 0.5, (10, c)).astype(f32), "fc.W"),
        numpy_helper.from_array(rng.normal(0, 0.1, 10).astype(f32), "fc.B"),
    ]
    return _save_classifier(path, "padded_cnn", nodes, inits, batch, size, OPSET)


def _save_classifier(
    path: Path,
    name: str,
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    batch: int | str,
    size: int,
    opset: int,
) -> Path:
    """Check and save a graph ``input [batch, 3, size, size]`` → ``logits [batch, 10]``."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save_model(model, path)
    return path


def qdq_zoo(path: Path, seed: int = 3, batch: int | str = "N", size: int = 16, graph_output_conv: bool = False) -> Path:
    """Every op kind ONNX Runtime's QDQ quantizer treats differently, for the graph-edit candidates' proof.

    conv1+Relu → MaxPool → conv2+Clip(0,6) → conv3 + residual Add (with the MaxPool's output) → swish
    (Sigmoid, Mul) → [AveragePool → conv4+Relu (its output also read by an Add) | conv5 (1×1)] and
    [Split → Where → Resize | MaxPool] → Concat → GlobalAveragePool → Flatten → Gemm (transB, beta 0.5) + Relu, + Gather
    (of an initializer), Clip → Reshape → MatMul + Add (bias initializer) → logits.
    conv6 shares conv5's weights (not its bias).
    ``graph_output_conv``: conv5's output is also a
    graph output.
    """
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def conv(name: str, inp: str, cin: int, cout: int, k: int, out: str, weight: str | None = None) -> None:
        w = weight or init(f"{name}.W", rng.normal(0, 0.5 / np.sqrt(cin * k * k), (cout, cin, k, k)).astype(np.float32))
        b = init(f"{name}.B", rng.normal(0, 0.1, cout).astype(np.float32))
        pads = [k // 2] * 4
        nodes.append(helper.make_node("Conv", [inp, w, b], [out], name=name, pads=pads))

    c = 8
    conv("conv1", "input", 3, c, 3, "y1")
    nodes.append(helper.make_node("Relu", ["y1"], ["r1"], name="relu1"))
    nodes.append(helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]))
    conv("conv2", "p1", c, c, 3, "y2")
    nodes.append(
        helper.make_node("Clip", ["y2", init("zero", np.float32(0)), init("six", np.float32(6))], ["r2"], name="clip2")
    )
    conv("conv3", "r2", c, c, 3, "y3")
    nodes.append(helper.make_node("Add", ["y3", "p1"], ["a3"], name="residual"))
    nodes.append(helper.make_node("Sigmoid", ["a3"], ["s3"], name="sigmoid"))
    nodes.append(helper.make_node("Mul", ["a3", "s3"], ["m3"], name="swish"))
    nodes.append(helper.make_node("AveragePool", ["m3"], ["ap"], name="avgpool", kernel_shape=[2, 2], strides=[2, 2]))
    conv("conv4", "ap", c, c, 3, "y4")
    nodes.append(helper.make_node("Relu", ["y4"], ["r4"], name="relu4"))
    nodes.append(helper.make_node("Add", ["r4", "y4"], ["a4"], name="add4"))
    conv("conv5", "ap", c, 4, 1, "y5")
    conv("conv6", "ap", c, 4, 1, "y6", weight="conv5.W")
    # Split → Where → Resize | MaxPool (shared scales, conditional on their inputs)
    nodes.append(
        helper.make_node(
            "Split", ["m3", init("halves", np.array([4, 4], dtype=np.int64))], ["sa", "sb"], name="split", axis=1
        )
    )
    nodes.append(
        helper.make_node("Where", [init("cond", rng.random((1, 4, 1, 1)) > 0.5), "sa", "sb"], ["wsel"], name="where")
    )
    nodes.append(
        helper.make_node(
            "Resize",
            ["wsel", "", init("scales", np.array([1, 1, 0.5, 0.5], dtype=np.float32))],
            ["rz"],
            name="resize",
            mode="nearest",
        )
    )
    nodes.append(helper.make_node("MaxPool", ["sb"], ["sbp"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]))
    nodes.append(helper.make_node("Concat", ["a4", "y5", "y6", "rz", "sbp"], ["cat"], name="concat", axis=1))
    nodes.append(helper.make_node("GlobalAveragePool", ["cat"], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    init("fc1.W", rng.normal(0, 0.3, (16, 3 * c)).astype(np.float32))
    init("fc1.B", rng.normal(0, 0.1, 16).astype(np.float32))
    nodes.append(helper.make_node("Gemm", ["flat", "fc1.W", "fc1.B"], ["h"], name="fc1", transB=1, beta=0.5))
    nodes.append(helper.make_node("Relu", ["h"], ["hr"], name="relu_fc"))
    nodes.append(
        helper.make_node(
            "Gather",
            [init("table", rng.normal(0, 1, (3, 16)).astype(np.float32)), init("row", np.array([1], dtype=np.int64))],
            ["emb"],
            name="gather",
            axis=0,
        )
    )
    nodes.append(helper.make_node("Add", ["hr", "emb"], ["he"], name="add_emb"))
    nodes.append(helper.make_node("Clip", ["he", "zero", "six"], ["hc"], name="clip_fc"))
    nodes.append(
        helper.make_node("Reshape", ["hc", init("shape", np.array([-1, 16], dtype=np.int64))], ["rs"], name="reshape")
    )
    nodes.append(
        helper.make_node(
            "MatMul", ["rs", init("fc2.W", rng.normal(0, 0.25, (16, 10)).astype(np.float32))], ["mm"], name="fc2"
        )
    )
    nodes.append(
        helper.make_node(
            "Add", ["mm", init("fc2.B", rng.normal(0, 0.1, 10).astype(np.float32))], ["logits"], name="fc2_bias"
        )
    )
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])]
    if graph_output_conv:
        outputs.append(helper.make_tensor_value_info("y5", TensorProto.FLOAT, [batch, 4, size // 4, size // 4]))
    graph = helper.make_graph(
        nodes,
        "qdq_zoo",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, size, size])],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save_model(model, path)
    return path
