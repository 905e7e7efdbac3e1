"""The cluster step: weight sharing (k-means codebooks, packed indices)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.core.methods.common import MethodSpec, NameList, StepReport, TrainingSpec
from service.core.methods.rows import Augmentation, ClusterLayer, Curve, PerLayer, per_layer

class AllocatedBits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: str
    bits: int
    measured: dict[str, float] = Field(description="The distillation loss to the original with this layer alone clustered, by bits.")


class BitAllocation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    how: str
    budget_bits: float = Field(description="The bits a weight the measured layers' clusters could take on average: average_bits, or bits.")
    stored_bits_uniform: int = Field(description="What the measured layers' indices, codebooks and the nodes unpacking them take at `bits` everywhere.")
    stored_bits_allocated: int = Field(description="The same at the bits chosen (no more than budget_bits everywhere would take).")
    predicted_loss_uniform: float = Field(description="The layers' measured losses added up at `bits` everywhere.")
    predicted_loss_allocated: float = Field(description="The same at the bits chosen (lower: the allocation's expected gain).")
    seconds: float = Field(description="How long measuring and choosing took.")
    reused: bool = Field(False, description="The costs were measured earlier in the same step on the same model and used again (deep_compression's "
                         "fewer-bits ladder measures once per codebook layout).")
    layers: list[AllocatedBits]


class ClusterReport(StepReport):
    method: Literal["cluster"] = "cluster"
    bits: int | None = None
    path: str | None = None
    layers: list[ClusterLayer] = Field(default_factory=list, description="Per layer: bits, centroids, stored and dense bytes.")
    quality_before_finetune: float | None = None
    quality_after: float | None = None
    finetune_epochs: int | None = None
    init: str | None = Field(None, description="How centroids were initialised (linear, density, kmeans++).")
    finetune_loss: list[float] = Field(default_factory=list, description="Centroid fine-tuning's loss per epoch.")
    target: str | None = Field(None, description="What fine-tuning trained towards: labels or the original model's outputs.")
    batch_size: int | None = None
    scores_by_epoch: list[float] | None = Field(None, description="Held-out quality after each epoch (the clustered state first).")
    kept_epoch: int | None = Field(None, description="The epoch kept (0: the clustered state before fine-tuning).")
    augmented: Augmentation | None = Field(None, description="Replaced copies of the token sequences fine-tuning trained on besides them (a model that reads token ids).")
    assignment: str | None = Field(None, description="nearest or gptq: how weights took their centroids.")
    bit_allocation: BitAllocation | None = Field(None, description="measured bit allocation: each layer's bits and the costs they were chosen from.")
    reconstruction: dict[str, float] | None = Field(
        None, description="gptq: the assigned layers' mean relative output error on the calibration data against the unclustered model's: nearest-centroid "
        "assignment, gptq's, and gptq's after the codebooks' least-squares refit (refit: what was kept).")

    def per_layer(self) -> PerLayer | None:
        return per_layer("bits per layer", self.layers, lambda row: row.bits)

    def curves(self) -> list[Curve]:
        out = [Curve("finetune loss", self.finetune_loss)] if self.finetune_loss else []
        return out + ([Curve("held-out score by fine-tuning epoch", self.scores_by_epoch)] if self.scores_by_epoch else [])


class ClusterStep(MethodSpec):
    """Weight sharing: k-means per layer; the model stores a codebook and bit-packed indices."""

    listing_order: ClassVar[int] = 40
    report_model: ClassVar[type[StepReport]] = ClusterReport
    method: Literal["cluster"] = "cluster"
    bits: int = Field(5, ge=2, le=8, description="2^bits centroids per layer (a pruned layer reserves one for zero).")
    init: Literal["linear", "density", "kmeans++"] = Field("linear", description="Centroid initialisation (Han et al. found linear best).")
    layer_bits: dict[str, int] = Field(default_factory=dict, description="Per-layer overrides of `bits`, by layer name.")
    skip_layers: NameList = Field(default_factory=list, max_length=4096)
    min_elements: int = Field(256, ge=1, le=2**31, description="Smaller weight tensors stay float32.")
    group_size: int | None = Field(
        None, ge=1, le=2**20,
        description="Output channels (rows) sharing one codebook; default: one codebook per layer. Transformer weights, whose rows differ "
        "in scale, keep far more fidelity with groups (e.g. 32) at a few bytes per row. Pruned layers keep one codebook.",
    )
    embeddings: bool = Field(
        True, description="Also cluster embedding tables (a Gather's weight): often most of a language model's size. They are clustered as they are, not fine-tuned.",
    )
    finetune_epochs: int | None = Field(
        None, ge=0, le=1000,
        description="Fine-tune the centroids (gradients summed per cluster). Default: 2 when the job has a dataset, else 0; the best epoch on the evaluation data is kept.",
    )
    assignment: Literal["nearest", "gptq"] | None = Field(
        None, description="Which centroid each weight takes: nearest, or gptq (input columns in turn, each weight's rounding error "
        "spread over the columns not yet assigned through the inverse of the layer's input Hessian on the data, so the layer's output "
        "moves least; layer by layer on inputs through the layers already clustered). Default: gptq when the step fine-tunes "
        "(the job has a dataset), else nearest. gptq needs a dataset; linear layers and ordinary convolutions, pruned layers keep nearest.",
    )
    bit_allocation: Literal["measured", "uniform"] | None = Field(
        None, description="How many bits each layer gets. measured: each layer (and embedding table) alone is clustered at bits - 1, bits and "
        "bits + 1 on the unchanged model, its cost taken as the distillation loss to the original's outputs on a few samples, and each "
        "takes the bits that make the summed costs least with the clusters no larger than `bits` everywhere (the tables that lose little "
        "at fewer bits pay for more bits where they matter; needs a dataset). uniform: `bits` everywhere. Layers in `layer_bits` keep "
        "theirs. Default: measured when the step fine-tunes (the job has a dataset), else uniform.",
    )
    average_bits: float | None = Field(
        None, ge=2, le=8, description="With measured bit allocation: the bits a weight the clusters may take on average (indices and "
        "codebooks), between bits - 1 and bits + 1, e.g. 3.5 with `bits: 4` for a smaller model that spends its bits where they cost "
        "least. Default: `bits`.",
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec)

    def budget_bits(self) -> float:
        return self.average_bits if self.average_bits is not None else float(self.bits)

    def resolved_bit_allocation(self, has_dataset: bool) -> str:
        # The default follows fine-tuning: a step that trains runs on the trainable form the measurement needs.
        if self.bit_allocation:
            return self.bit_allocation
        return "measured" if self.average_bits is not None or self.trains(has_dataset) else "uniform"

    def resolved_assignment(self, has_dataset: bool) -> str:
        return self.assignment or ("gptq" if self.trains(has_dataset) else "nearest")

    @model_validator(mode="after")
    def _bits(self) -> "ClusterStep":
        for name, bits in self.layer_bits.items():
            if not 2 <= bits <= 8:
                raise ValueError(f"layer_bits['{name}'] must be between 2 and 8")
        if self.average_bits is not None:
            if self.bit_allocation == "uniform":
                raise ValueError("average_bits needs bit_allocation measured: with uniform bits every layer takes `bits`")
            if not self.bits - 1 <= self.average_bits <= self.bits + 1:
                raise ValueError(f"average_bits must be within 1 of bits ({self.bits}): each layer's bits are chosen from bits - 1, bits and bits + 1")
        return self

    def needs_dataset(self) -> bool:
        return (self.finetune_epochs or 0) > 0 or self.assignment == "gptq" or self.bit_allocation == "measured" or self.average_bits is not None

    def trains(self, has_dataset: bool) -> bool:
        return (self.finetune_epochs if self.finetune_epochs is not None else (2 if has_dataset else 0)) > 0 and has_dataset
