"""The rows of the step reports: one model per row shape a method writes (per layer, per epoch, per
fine-tuning run). Declared, so the worker's rows are checked under STRICT like the reports that hold
them (service.core.reported), and readers (the report page) take attributes instead of keys.

Each report model says what its page shows through `StepReport.layer_bars` / `StepReport.curves`
(service.core.methods.common), reading these rows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from pydantic import Field

from service.core.reported import Reported


class LayerRow(Reported):
    layer: str = Field(description="The layer's name (torch name, ONNX node or initializer).")


class PruneLayer(LayerRow):
    initializer: str | None = Field(None, description="The ONNX initializer pruned in place (no conversion to torch).")
    shape_before: list[int]
    shape_after: list[int]
    sparsity: float = Field(description="Share of the layer's weights that are zero.")
    removed_fraction: float = Field(description="Share of the layer's parameters removed by narrowing it (structured).")
    importance_threshold: float | None = Field(None, description="The importance below which weights were removed.")
    output_error_masked: float | None = Field(
        None, description="sparsegpt: the layer's relative output error on the calibration data with its mask and no weight update, against the unpruned "
        "model's layer output, bias included (the layer reads its input through the layers pruned before it); with output_weighted, each calibration "
        "position weighed as the fit weighed it.")
    output_error_sparsegpt: float | None = Field(
        None, description="sparsegpt: the same after SparseGPT's column-by-column update, which chose the mask (in its last round, with mask_rounds).")
    output_error: float | None = Field(
        None, description="sparsegpt: the same once the kept weights and the bias are re-solved by least squares for that mask, towards the unpruned "
        "model's output (what was kept).")


class ClusterLayer(LayerRow):
    initializer: str | None = None
    embedding: bool | None = Field(None, description="An embedding table (Gather) clustered with the matrix weights.")
    shape: list[int]
    bits: int
    centroids: int
    sparse: bool = Field(description="Zeros kept exact (a pruned layer's zero is its own centroid).")
    stored_bytes: int
    dense_bytes: int
    output_error_nearest: float | None = Field(
        None, description="gptq assignment: the layer's relative output error on the calibration data with nearest centroids, against the unclustered "
        "model's layer output (the layer reads its input through the layers clustered before it).")
    output_error_assigned: float | None = Field(None, description="gptq assignment: the same with the centroids gptq chose, before the codebooks' refit.")
    output_error: float | None = Field(None, description="gptq assignment: the same after each codebook's centroids were re-solved by least squares (what was kept).")


class LowRankLayer(LayerRow):
    kind: str = Field(description="linear (SVD) or conv (Tucker-2).")
    rank: int | list[int]
    full_rank: int | list[int]
    parameters_before: int
    parameters_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    layer_ms_before: float | None = None
    layer_ms_after: float | None = None


class SeparableLayer(LayerRow):
    kernel: list[int]
    in_channels: int
    out_channels: int
    parameters_before: int
    parameters_after: int
    weight_ratio: float = Field(description="Weights after / before (the bias is unchanged).")
    approximation_error: float
    expected_ratio: float = Field(description="1/O + 1/K^2.")
    ratio_vs_expected: float
    macs_before: int | None = None
    macs_after: int | None = None


class LeftAlone(LayerRow):
    """A layer a step passed over, and why."""

    why: str
    op_type: str | None = None
    parameters: int | None = None


class QuantizedLayer(LayerRow):
    """A weight of an int4 / int8 weight-only model (ONNX graphs and LLM checkpoints alike)."""

    weight: str | None = Field(None, description="The initializer quantized.")
    kind: str | None = Field(None, description="matmul or embedding.")
    shape: list[int] | None = None
    algorithm: str | None = Field(None, description="rtn, gptq, hqq, awq, or shared (a table read through its tied matrix product's codes).")
    bits: int | None = Field(None, description="4, 8, or 32 (left in float).")
    parameters: int | None = None
    relative_error: float | None = Field(None, description="|W - W_q| / |W|.")
    output_error: float | None = Field(None, description="The layer's output error on the calibration data.")
    stored_once_with: str | None = Field(None, description="The matrix product whose codes a tied table reads.")


class QuantizeSensitivity(LayerRow):
    """A layer ranked by what quantizing it costs: alone on the evaluation data (mixed precision), or
    by its output error at 4 and 8 bits on the calibration text (LLMs)."""

    cosine: float | None = None
    accuracy_drop: float | None = None
    damage: float | None = None
    error_int4: float | None = None
    error_int8: float | None = None
    bits: int | None = Field(None, description="LLMs: the bits the layer got.")


class Augmentation(Reported):
    """Inputs fine-tuning drew besides the data: replaced copies of its token sequences, labelled by the original model."""

    input: str = Field(description="The token-id input the copies differ in.")
    copies: int = Field(description="Copies of every training sequence drawn each epoch.")
    replaced_share: float = Field(description="Share of each copy's tokens (not the first or last, not padding) replaced by tokens drawn from the data.")
    samples_per_epoch: int = Field(description="The training samples and their copies: what one epoch trains on.")
    how: str


class FinetuneLog(Reported):
    """One fine-tuning run: what it trained towards, the loss and held-out score per epoch, the epoch kept."""

    epochs: int | None = None
    target: str | None = Field(None, description="labels or the original model's outputs.")
    losses: list[float] = Field(default_factory=list)
    batch_size: int | None = None
    scores_by_epoch: list[float] | None = Field(None, description="Held-out quality before training (epoch 0) and after each epoch.")
    kept_epoch: int | None = Field(None, description="The epoch kept (0: the state before fine-tuning).")
    augmented: Augmentation | None = Field(None, description="Replaced copies of the token sequences trained on besides them (distilling a model that reads token ids).")


class DistillEpoch(Reported):
    epoch: int
    loss: float
    soft: float | None = Field(None, description="The soft-target (teacher) part of the loss.")
    hard: float | None = Field(None, description="The label part of the loss.")
    hint: float | None = Field(None, description="The intermediate-feature part of the loss.")
    validation: float = Field(description="Held-out quality after the epoch.")


@dataclass(frozen=True)
class PerLayer:
    """The per-layer bars a step's report page draws: a title and (layer, value) pairs."""

    title: str
    values: list[tuple[str, float | None]]


@dataclass(frozen=True)
class Curve:
    """A training curve on a step's report page."""

    title: str
    values: list[float]


Row = TypeVar("Row", bound=LayerRow)
SHOWN_LAYERS = 40  # a report page shows no more bars than this per step


def per_layer(title: str, rows: Sequence[Row], value: Callable[[Row], float | None]) -> PerLayer | None:
    return PerLayer(title, [(row.layer, value(row)) for row in rows[:SHOWN_LAYERS]]) if rows else None


def score_curve(title: str, log: FinetuneLog | None) -> list[Curve]:
    """A fine-tuning run's held-out score by epoch, when it kept one."""
    return [Curve(title, log.scores_by_epoch)] if log is not None and log.scores_by_epoch else []
