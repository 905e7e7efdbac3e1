"""The depthwise_separable step: standard convolutions replaced by depthwise + pointwise (architecture design)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from service.core.methods.common import MethodSpec, NameList, StepReport, TrainingSpec
from service.core.methods.rows import Curve, FinetuneLog, LeftAlone, PerLayer, SeparableLayer, per_layer, score_curve


class DepthwiseSeparableReport(StepReport):
    method: Literal["depthwise_separable"] = "depthwise_separable"
    layers: list[SeparableLayer] = Field(default_factory=list, description="Per layer: weight ratio against 1/O + 1/K^2, approximation error, MACs.")
    left_alone: list[LeftAlone] = Field(default_factory=list)
    quality_metric: str | None = None
    quality: dict[str, float | None] | None = None
    distillation: FinetuneLog | None = None

    def per_layer(self) -> PerLayer | None:
        return per_layer("weights kept per layer", self.layers, lambda row: row.weight_ratio)

    def curves(self) -> list[Curve]:
        return score_curve("held-out score by distillation epoch", self.distillation)


class DepthwiseSeparableStep(MethodSpec):
    """Replace standard K x K convolutions (groups 1) by a depthwise K x K convolution followed by a
    pointwise 1x1 one (MobileNet's block), initialised to the best approximation of the original
    weights (a rank-1 fit per input channel), then distilled from the original model. A replaced
    layer keeps 1/O + 1/K^2 of its weights (O output channels)."""

    listing_order: ClassVar[int] = 80
    report_model: ClassVar[type[StepReport]] = DepthwiseSeparableReport
    method: Literal["depthwise_separable"] = "depthwise_separable"
    layers: NameList | None = Field(None, max_length=4096, description="Replace only these convolutions (torch names as reported). Default: every K x K convolution with groups 1 and more than `min_in_channels` input channels.")
    min_in_channels: int = Field(4, ge=1, description="Leave convolutions with fewer input channels (an RGB or grayscale stem) alone by default.")
    finetune_epochs: int | None = Field(None, ge=0, le=1000, description="Distillation epochs after replacing (default: 3 with a dataset, 0 without).")
    training: TrainingSpec = Field(default_factory=TrainingSpec)

    def needs_dataset(self) -> bool:
        return (self.finetune_epochs or 0) > 0

    def trains(self, has_dataset: bool) -> bool:
        return (self.finetune_epochs if self.finetune_epochs is not None else (3 if has_dataset else 0)) > 0 and has_dataset
