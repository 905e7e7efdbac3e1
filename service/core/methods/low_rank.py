"""The low_rank step: weights factorised into products of thinner ones (architecture design)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from service.core.methods.common import MethodSpec, NameList, StepReport, TrainingSpec
from service.core.methods.rows import Curve, FinetuneLog, LowRankLayer, PerLayer, per_layer, score_curve


class LowRankReport(StepReport):
    method: Literal["low_rank"] = "low_rank"
    layers: list[LowRankLayer] = Field(default_factory=list, description="Per layer: rank(s), parameters, MACs and time before/after.")
    factorised_parameters: dict[str, Any] | None = None
    macs_in_factorised_layers: dict[str, Any] | None = None
    quality_metric: str | None = None
    quality: dict[str, float | None] | None = None
    finetune: FinetuneLog | None = None

    def per_layer(self) -> PerLayer | None:
        return per_layer("parameters after / before per layer", self.layers, lambda row: row.parameters_after / max(1, row.parameters_before))

    def curves(self) -> list[Curve]:
        return score_curve("held-out score by fine-tuning epoch", self.finetune)


class LowRankStep(MethodSpec):
    """Factorise weights: a linear layer W (out x in) by truncated SVD into (in -> r) then (r -> out); a
    K x K convolution by Tucker-2 into 1x1 (C -> r_in), K x K (r_in -> r_out), 1x1 (r_out -> O).
    Each layer is factorised only where that stores fewer numbers; then fine-tuned to recover."""

    listing_order: ClassVar[int] = 70
    report_model: ClassVar[type[StepReport]] = LowRankReport
    method: Literal["low_rank"] = "low_rank"
    rank_ratio: float | None = Field(
        None, gt=0, lt=1, description="Keep this fraction of each layer's full rank (per mode, for convolutions). Default: chosen by `energy`."
    )
    energy: float = Field(0.9, gt=0, le=1, description="When rank_ratio is unset: keep the singular values holding this share of each layer's energy (sum of squares).")
    convolutions: bool = Field(True, description="Also factorise K x K convolutions (K > 1, groups 1) by Tucker-2.")
    layers: NameList | None = Field(None, max_length=4096, description="Only these layers (torch names as reported; default: every linear layer and convolution).")
    output_layer: bool = Field(False, description="Also factorise the last layer (the classifier head), whose rank is at most the number of classes: usually costly.")
    min_layer_parameters: int = Field(1024, ge=0, description="Leave layers with fewer weights than this alone.")
    finetune_epochs: int | None = Field(None, ge=0, le=1000, description="Fine-tuning epochs after factorising (default: 2 with a dataset, 0 without).")
    training: TrainingSpec = Field(default_factory=TrainingSpec)

    def needs_dataset(self) -> bool:
        return (self.finetune_epochs or 0) > 0

    def trains(self, has_dataset: bool) -> bool:
        return (self.finetune_epochs if self.finetune_epochs is not None else (2 if has_dataset else 0)) > 0 and has_dataset
