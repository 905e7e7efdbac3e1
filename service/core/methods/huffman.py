"""The huffman step: entropy-coded storage bundle."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from service.core.methods.common import MethodSpec, StepReport


class HuffmanReport(StepReport):
    method: Literal["huffman"] = "huffman"
    onnx_bytes: int | None = None
    bundle_bytes: int | None = None
    tensors: list[dict[str, Any]] = Field(default_factory=list, description="Per tensor: the codec and the bytes before and after.")
    skeleton_bytes: int | None = Field(None, description="The graph without its weights, as stored in the bundle.")
    header_bytes: int | None = None


class HuffmanStep(MethodSpec):
    """Entropy-code the model's integer tensors (cluster indices, sparse gaps) into a .msz bundle that
    decodes to exactly the same ONNX model (`modelshrink unpack`). Must be the last step."""

    writes_bundle: ClassVar[bool] = True
    listing_order: ClassVar[int] = 50
    report_model: ClassVar[type[StepReport]] = HuffmanReport
    method: Literal["huffman"] = "huffman"
