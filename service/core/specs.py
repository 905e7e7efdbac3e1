"""Job step specs, joined in a discriminated union on `method`, and the measurement spec.

The specs themselves live one per method in service/core/methods/; they are shared by the API
(validation, /v1/methods, OpenAPI) and the workers (which re-parse a job's stored steps), so a spec
is checked by the same code on both sides. Names are re-exported here for the modules that use them.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field, TypeAdapter

from service.core.methods import STEP_TYPES
from service.core.methods.cluster import ClusterStep
from service.core.methods.common import CalibrationSpec, MethodSpec, NameList, StepCheck, StrictModel, TrainingSpec
from service.core.methods.deep_compression import DeepCompressionStep
from service.core.methods.distill import DistillStep, HintSpec, StudentSpec
from service.core.methods.huffman import HuffmanStep
from service.core.methods.prune import PruneStep
from service.core.methods.quantize import QUANTIZE_FAMILIES, QualityTarget, QuantizeStep

__all__ = ["STEP_TYPES", "CalibrationSpec", "ClusterStep", "DeepCompressionStep", "DistillStep", "HintSpec", "HuffmanStep", "MeasureSpec",
           "MethodSpec", "NameList", "PruneStep", "QUANTIZE_FAMILIES", "QualityTarget", "QuantizeStep", "StepCheck", "StepSpec", "StrictModel",
           "StudentSpec", "TrainingSpec", "step_adapter"]

StepSpec = Annotated[Union[STEP_TYPES], Field(discriminator="method")]  # type: ignore[valid-type]
step_adapter: TypeAdapter[MethodSpec] = TypeAdapter(StepSpec)


class MeasureSpec(StrictModel):
    """How the before/after metrics are measured (same settings for both models)."""

    warmup: int = Field(5, ge=0, le=1000)
    runs: int = Field(50, ge=5, le=100_000, description="Timed runs per batch size.")
    batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default_factory=lambda: [1, 32], min_length=1, max_length=4)
    threads: int = Field(1, ge=1, le=64, description="ONNX Runtime intra-op threads for both models.")
    max_eval_samples: int = Field(1000, ge=1, le=1_000_000, description="Cap on samples for accuracy and fidelity.")
    eval_tokens: int = Field(16384, ge=64, le=10_000_000, description="LLM checkpoints: tokens of evaluation text for perplexity and agreement.")
    window: int = Field(512, ge=16, le=32768, description="LLM checkpoints: tokens per perplexity window (at most the model's context length).")
