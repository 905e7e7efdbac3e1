"""The weights of an ONNX graph, read straight from its initializers: for the methods' paths that need
no training (unstructured pruning and clustering without fine-tuning), which therefore work on any
graph ONNX Runtime runs, whatever operators the trainable converter lacks."""

from __future__ import annotations

import onnx

# Operator -> index of its weight input.
WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1}
# Raised by the converter for a graph it cannot turn into torch; the initializer paths then take over.
CONVERTER_REFUSALS = ("unsupported_operator", "conversion_mismatch")


def weight_initializers(model: onnx.ModelProto) -> dict[str, str]:
    """Float initializers of 2+ dimensions that are a layer's weight, in graph order: name -> the
    consuming node's name (or op type when unnamed). A tensor used by several nodes is listed once."""
    inits = {i.name: i for i in model.graph.initializer}
    found: dict[str, str] = {}
    for node in model.graph.node:
        index = WEIGHT_INPUT.get(node.op_type)
        if index is None or len(node.input) <= index:
            continue
        name = node.input[index]
        init = inits.get(name)
        if init is not None and init.data_type == onnx.TensorProto.FLOAT and len(init.dims) >= 2 and name not in found:
            found[name] = node.name or node.op_type
    return found
