"""Trained weights back into the ONNX graph they came from, instead of re-exporting the module.

For a method that keeps the architecture (unstructured pruning, weight clustering, binary weights),
the original graph is the best possible output: every operator, input/output name, dynamic axis and
opset exactly as the user's exporter wrote them, so nothing is lost to a second export (torch's
exporters cannot re-trace the converter's shape arithmetic on transformer graphs). Only the
initializers behind nn.Linear / nn.Conv / nn.BatchNorm layers change.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from workers.constant_folding import fold
from workers.trainable.from_onnx import OnnxGraphModule


def can_write_back(original: onnx.ModelProto, module: OnnxGraphModule) -> bool:
    """True when every layer still has the shapes of the initializers it came from."""
    inits = {t.name: tuple(t.dims) for t in fold(original).graph.initializer}
    for key, source in module.sources.items():
        layer = module.layers[key]
        if source["kind"] == "bn":
            if inits.get(source["scale"]) != tuple(layer.weight.shape):
                return False
            continue
        want = tuple(layer.weight.shape)
        if source["kind"] == "matmul" or (source["kind"] == "gemm" and not source["trans_b"]):
            want = want[::-1]
        if inits.get(source["weight"]) != want:
            return False
    return True


def trained_onnx(original: onnx.ModelProto, module: OnnxGraphModule, export_as_new: Callable[[], onnx.ModelProto]) -> onnx.ModelProto:
    """The original graph with the trained weights when the architecture is unchanged; otherwise a
    fresh export (`export_as_new`), for methods that narrow or replace layers."""
    if can_write_back(original, module):
        return write_back(original, module)
    return export_as_new()


def write_back(original: onnx.ModelProto, module: OnnxGraphModule) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(fold(original))  # the graph the module was converted from
    values: dict[str, np.ndarray] = {}
    for key, source in module.sources.items():
        layer = module.layers[key]
        weight = layer.weight.detach().cpu().numpy().astype(np.float32)
        bias = layer.bias.detach().cpu().numpy().astype(np.float32) if getattr(layer, "bias", None) is not None else None
        kind = source["kind"]
        if kind == "conv":
            values[source["weight"]] = weight
        elif kind == "matmul":
            values[source["weight"]] = weight.T
        elif kind == "gemm":
            b = weight if source["trans_b"] else weight.T
            values[source["weight"]] = b / np.float32(source["alpha"])
            if bias is not None:
                bias = bias / np.float32(source["beta"])
        elif kind == "bn":
            values[source["scale"]] = weight
            values[source["mean"]] = layer.running_mean.detach().cpu().numpy().astype(np.float32)
            values[source["var"]] = layer.running_var.detach().cpu().numpy().astype(np.float32)
        if bias is not None and source.get("bias"):
            values[source["bias"]] = bias
    for init in model.graph.initializer:
        if init.name in values:
            value = values[init.name]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            # A Gemm bias stored broadcastable (shape (1,) or ()) takes its trained full width.
            init.CopyFrom(numpy_helper.from_array(value.astype(dtype), init.name))
    return model
