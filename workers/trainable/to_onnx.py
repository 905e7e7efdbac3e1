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
    axes = {name: {0: "N"} for name in input_names + output_names} if dynamic_batch else None
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, example, buffer, dynamo=False, opset_version=OPSET,
                input_names=input_names, output_names=output_names, dynamic_axes=axes, do_constant_folding=True,
            )
    except Exception as exc:
        raise CompressionFailed(f"exporting the compressed model to ONNX failed: {str(exc).splitlines()[0][:300]}", code="export_failed") from exc
    return onnx.load_model_from_string(buffer.getvalue())
