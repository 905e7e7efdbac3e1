"""Tiny ONNX models and datasets built in the tests (onnx.helper, seeded numpy weights)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(arr.astype(np.float32), name)


def mlp(in_features: int = 16, hidden: int = 32, classes: int = 4, seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    """Linear -> ReLU -> Linear -> ReLU -> Linear classifier with a dynamic (or fixed) batch axis."""
    rng = np.random.default_rng(seed)
    dims = [in_features, hidden, hidden, classes]
    nodes, inits, prev = [], [], "x"
    for i in range(3):
        w = rng.standard_normal((dims[i], dims[i + 1])) / np.sqrt(dims[i])
        b = rng.standard_normal(dims[i + 1]) * 0.1
        inits += [_init(f"w{i}", w), _init(f"b{i}", b)]
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"mm{i}"]))
        out = "logits" if i == 2 else f"h{i}"
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [out if i == 2 else f"a{i}"]))
        if i < 2:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, in_features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)


def cnn(channels: int = 8, classes: int = 10, size: int = 8, seed: int = 0) -> onnx.ModelProto:
    """Conv -> ReLU -> Conv -> ReLU -> GlobalAveragePool -> Flatten -> Gemm, NCHW 1-channel input."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("c1w", rng.standard_normal((channels, 1, 3, 3)) / 3), _init("c1b", rng.standard_normal(channels) * 0.1),
        _init("c2w", rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(9 * channels)), _init("c2b", rng.standard_normal(channels) * 0.1),
        _init("fw", rng.standard_normal((classes, channels)) / np.sqrt(channels)), _init("fb", np.zeros(classes)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c1w", "c1b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "c2w", "c2b"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fw", "fb"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)


def to_bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def reference_outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def dataset_npz(model: onnx.ModelProto, samples: int = 64, seed: int = 1, labels: bool = True, name: str = "x", **extra: np.ndarray) -> bytes:
    """Inputs drawn at random, labels = the model's own argmax (so the original is 100% accurate)."""
    rng = np.random.default_rng(seed)
    dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    x = rng.standard_normal((samples, *dims)).astype(np.float32)
    arrays = {name: x, **extra}
    if labels:
        arrays["labels"] = reference_outputs(model, x).argmax(-1).astype(np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def correlated_features(rng: np.random.Generator, samples: int, features: int) -> np.ndarray:
    """Features that move together (as a layer's inputs do): where a second-order update has something to use."""
    return (rng.standard_normal((samples, features // 4)) @ rng.standard_normal((features // 4, features))
            + 0.1 * rng.standard_normal((samples, features)))
