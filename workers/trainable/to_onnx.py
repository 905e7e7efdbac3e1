"""Trainable module -> single-file ONNX (TorchScript exporter, opset 17, the original I/O names and
a dynamic batch axis where the original had one)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch

from service.core.errors import CompressionFailed

OPSET = 17


def example_input(model: onnx.ModelProto, input_name: str, batch: int = 2) -> np.ndarray:
    """Zeros shaped like one of the model's inputs (dynamic axes -> `batch`), to trace an export."""
    vi = next(i for i in model.graph.input if i.name == input_name)
    shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else batch for d in vi.type.tensor_type.shape.dim]
    return np.zeros(shape, dtype=onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))


def has_dynamic_batch(model: onnx.ModelProto) -> bool:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return bool(dims) and not dims[0].HasField("dim_value")


def export(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_batch: bool,
    fold_constants: bool = True,
) -> onnx.ModelProto:
    """fold_constants=False keeps each layer's weight exactly as trained (no batch norm folded into
    it), for methods that re-encode specific weights after export."""
    module.eval()
    buffer = io.BytesIO()
    # The exporter rejects some valid ONNX names (e.g. "34"): export under placeholders, rename after.
    safe_in = [f"input_{i}" for i in range(len(input_names))]
    safe_out = [f"output_{i}" for i in range(len(output_names))]
    axes = {name: {0: "N"} for name in safe_in + safe_out} if dynamic_batch else None
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, example, buffer, dynamo=False, opset_version=OPSET,
                input_names=safe_in, output_names=safe_out, dynamic_axes=axes, do_constant_folding=fold_constants,
            )
    except Exception as exc:
        raise CompressionFailed(f"exporting the compressed model to ONNX failed: {str(exc).splitlines()[0][:300]}", code="export_failed") from exc
    model = onnx.load_model_from_string(buffer.getvalue())
    names = dict(zip(safe_in + safe_out, input_names + output_names))
    # Weights keep the layer names users know from the original model ("fc1.weight", not
    # "layers.fc1.weight"), so a later step's report and per-layer options use the same names.
    layer_names = getattr(module, "layer_names", {})
    for init in model.graph.initializer:
        head, _, tail = init.name.partition(".")
        key, _, param = tail.partition(".")
        if head == "layers" and key in layer_names and param:
            names[init.name] = f"{layer_names[key]}.{param}"
    # Intermediate values get short names and nodes none: in a compressed model, the exporter's long
    # names ("/layers.fc1/Gemm_output_0") are a visible share of the file.
    keep = set(names) | {i.name for i in model.graph.initializer}
    counter = 0
    for node in model.graph.node:
        node.name = ""
        for out in node.output:
            if out and out not in keep and out not in names:
                names[out] = f"v{counter}"
                counter += 1
    _rename(model, names)
    del model.graph.value_info[:]
    return model


def _rename(model: onnx.ModelProto, names: dict[str, str]) -> None:
    graph = model.graph
    for value in list(graph.input) + list(graph.output):
        value.name = names.get(value.name, value.name)
    for init in graph.initializer:
        init.name = names.get(init.name, init.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = names.get(name, name)
        for i, name in enumerate(node.output):
            node.output[i] = names.get(name, name)
