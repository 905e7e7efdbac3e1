"""The huffman step: entropy-coded storage bundle."""

from __future__ import annotations

from typing import ClassVar, Literal

from service.core.methods.common import MethodSpec, StepReport


class HuffmanReport(StepReport):
    method: Literal["huffman"] = "huffman"
    onnx_bytes: int | None = None
    bundle_bytes: int | None = None


class HuffmanStep(MethodSpec):
    """Entropy-code the model's integer tensors (cluster indices, sparse gaps) into a .msz bundle that
    decodes to exactly the same ONNX model (`modelshrink unpack`). Must be the last step."""

    writes_bundle: ClassVar[bool] = True
    listing_order: ClassVar[int] = 50
    report_model: ClassVar[type[StepReport]] = HuffmanReport
    method: Literal["huffman"] = "huffman"
