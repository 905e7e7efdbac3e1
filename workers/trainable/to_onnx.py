"""Trainable module -> single-file ONNX (TorchScript exporter, opset 17, the original I/O names and
a dynamic batch axis where the original had one)."""

from __future__ import annotations

import io
import warnings

import onnx
import torch

from service.core.errors import CompressionFailed

OPSET = 17


def export(module: torch.nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str], output_names: list[str], dynamic_batch: bool) -> onnx.ModelProto:
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
                input_names=safe_in, output_names=safe_out, dynamic_axes=axes, do_constant_folding=True,
            )
    except Exception as exc:
        raise CompressionFailed(f"exporting the compressed model to ONNX failed: {str(exc).splitlines()[0][:300]}", code="export_failed") from exc
    model = onnx.load_model_from_string(buffer.getvalue())
    _rename(model, dict(zip(safe_in + safe_out, input_names + output_names)))
    return model


def _rename(model: onnx.ModelProto, names: dict[str, str]) -> None:
    graph = model.graph
    for value in list(graph.input) + list(graph.output):
        value.name = names.get(value.name, value.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = names.get(name, name)
        for i, name in enumerate(node.output):
            node.output[i] = names.get(name, name)
