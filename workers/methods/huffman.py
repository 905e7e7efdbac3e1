"""huffman: Deep Compression's last stage. The model itself is unchanged; the job ships it as a .msz
bundle (integer tensors Huffman-coded, the rest deflated) that `modelshrink unpack` turns back into
exactly the same ONNX bytes."""

from __future__ import annotations

import onnx

from service.core.errors import CompressionFailed
from service.core.specs import HuffmanStep
from workers import bundle
from workers.steps import StepContext, StepData, StepResult

name = "huffman"
SPEC = HuffmanStep


def apply(model: onnx.ModelProto, spec: HuffmanStep, data: StepData, ctx: StepContext) -> StepResult:
    ctx.progress(0.0, "entropy coding")
    model_bytes = model.SerializeToString()
    packed, report = bundle.encode(model_bytes)
    if bundle.decode(packed) != model_bytes:  # never ship a bundle that does not round-trip
        raise CompressionFailed("the Huffman bundle did not decode to the same model", code="bundle_mismatch")
    ctx.progress(1.0, "entropy coded", milestone=True)
    return StepResult(model=model, report={"onnx_bytes": len(model_bytes), "bundle_bytes": len(packed), **report}, bundle=packed)
