"""The prune step: unstructured (stored sparse) or structured (layers narrowed)."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.core.methods.common import MethodSpec, NameList, StepReport, TrainingSpec
from service.core.methods.rows import Curve, FinetuneLog, PerLayer, PruneLayer, per_layer, score_curve


class RefitLayer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    round: int
    layer: str
    output_error_pruned: float = Field(description="||X' W - Y||^2 / ||Y||^2: the pruned layer against its output before the round.")
    output_error_refit: float = Field(description="The same after the least-squares refit.")
    kept: str = Field(description="refitted, or pruned weights when the fit was no better.")


class AllocatedLayer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: str
    amount: float = Field(description="The sparsity this layer was given.")
    measured: dict[str, float] = Field(description="The distillation loss to the original's outputs with this layer alone pruned, by sparsity.")


class SparsityAllocation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    how: str
    predicted_loss_uniform: float = Field(description="The layers' measured losses added up at the same amount everywhere.")
    predicted_loss_allocated: float = Field(description="The same at the amounts chosen (lower: the allocation's expected gain).")
    layers: list[AllocatedLayer]


class WeightedLayer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: str
    position_spread: float = Field(description="The 90th over the 10th percentile of the weights its calibration positions got (1: all alike).")
    channel_spread: float = Field(description="The same over its output channels.")


class OutputSensitivity(BaseModel):
    model_config = ConfigDict(extra="forbid")
    how: str
    probes: int = Field(description="Random probes of the output per calibration batch (the Gauss-Newton diagonal's estimate).")
    power: float = Field(description="The measured weights are raised to this power before use (tempered).")
    seconds: float
    layers: list[WeightedLayer]


class PruneReport(StepReport):
    method: Literal["prune"] = "prune"
    kind: str | None = None
    path: str | None = Field(None, description="onnx_initializers when the ONNX weights were pruned where they are stored (the step trains nothing: no conversion to torch).")
    achieved: float | None = Field(None, description="Share of the chosen weights (unstructured) or parameters (structured) removed.")
    target_reached: bool | None = None
    stopped: str | None = None
    quality_metric: str | None = None
    output_kind: str | None = Field(None, description="classifier, token_logits or features: what fine-tuning trains towards and how quality is scored.")
    baseline: float | None = None
    final: float | None = None
    rounds: list[dict[str, Any]] = Field(default_factory=list)
    layers: list[PruneLayer] = Field(default_factory=list, description="Per layer: shape before/after, sparsity, threshold.")
    storage: dict[str, Any] | None = None
    finetune_epochs: int | None = None
    ffn: dict[str, Any] | None = Field(None, description="Feed-forward units removed on the graph itself (transformers whose MLP reshapes around its layers with the width spelled out, as GPT-2's Conv1D): units before/after per block, the importance used.")
    heads: dict[str, Any] | None = Field(None, description="Attention heads removed (with `heads`): how many of how many, per block which ones and every head's measured importance.")
    importance: str | None = Field(None, description="How weights or channels were ranked (magnitude, l1, l2, taylor, wanda, apoz, ...).")
    importance_chosen: str | None = Field(None, description="Why the importance used is not the spec's default, when the step chose it (structured pruning of a transformer with data).")
    scope: str | None = Field(None, description="layer or global: where the amount applies.")
    target_amount: float | None = Field(None, description="The amount asked for.")
    lottery_ticket: bool | None = None
    kept_round: int | str | None = Field(None, description="The round whose model was kept (ticket: the rewound and retrained lottery ticket).")
    finetune_lr: float | None = None
    reconstruction: dict[str, float] | None = Field(
        None, description="sparsegpt: the pruned layers' mean relative output error on the calibration data: with the mask and no update (masked), after "
        "SparseGPT's update (sparsegpt: its last round's sweep) and with the kept weights and bias re-solved for the mask (updated: what was kept); "
        "each on the layer's whole output, bias included.")
    output_sensitivity: OutputSensitivity | None = Field(
        None, description="sparsegpt with output_weighted: how unevenly each layer's fit weighed its calibration positions and output channels "
        "by how much the model's output depends on them.")
    allocation: SparsityAllocation | None = Field(
        None, description="sparsegpt with scope global: each layer's sparsity chosen from its measured sensitivity so that the amount holds over the layers together.")
    finetune_by_round: list[FinetuneLog] = Field(default_factory=list, description="Each round's fine-tuning outcome: epochs, losses, the best epoch kept.")
    refit: list[RefitLayer] | None = Field(
        None, description="structured with refit: per round and layer whose inputs lost channels, its relative output error on the calibration data "
        "with the pruned weights and after the least-squares refit.")

    def per_layer(self) -> PerLayer | None:
        if self.kind == "structured":
            return per_layer("removed per layer", self.layers, lambda row: row.removed_fraction)
        return per_layer("sparsity per layer", self.layers, lambda row: row.sparsity)

    def curves(self) -> list[Curve]:
        return [c for r, log in enumerate(self.finetune_by_round) for c in score_curve(f"held-out score by fine-tuning epoch, round {r + 1}", log)]


class PruneStep(MethodSpec):
    """Prune weights (unstructured: stored sparse, so the file shrinks) or whole neurons/channels
    (structured: layers physically narrower), optionally in rounds of prune -> fine-tune."""

    listing_order: ClassVar[int] = 20
    report_model: ClassVar[type[StepReport]] = PruneReport
    method: Literal["prune"] = "prune"
    kind: Literal["unstructured", "structured"] = "unstructured"
    amount: float = Field(0.5, ge=0, lt=1, description="Fraction of weights (unstructured) or channels/neurons (structured) to remove; 0 only with `heads` (attention heads alone).")
    heads: float = Field(
        0.0, ge=0, lt=1,
        description="structured, transformers: fraction of all attention heads to remove as well (query/key/value and output projections "
        "narrowed in the graph). Heads are ranked by how much the outputs change with each one switched off, on the job's data; at "
        "least one head is kept per block. Needs separate query/key/value projections (BERT, MiniLM, RoBERTa, ViT; not GPT-2's fused c_attn).",
    )
    scope: Literal["global", "layer"] = Field(
        "global", description="global: the amount holds over all the layers together (magnitude: one threshold across layers; sparsegpt: each "
        "layer's sparsity chosen from its measured sensitivity, within 0.25 of the amount; the report's allocation gives them); layer: the same "
        "fraction in every layer.")
    importance: Literal["l1", "l2", "apoz", "taylor", "wanda", "sparsegpt"] | None = Field(
        None, description="Default (left out or null): l1, except on a transformer with a dataset: structured pruning uses wanda "
        "(measured: all-MiniLM-L6-v2 0.805 -> 0.960 held-out cosine at 30% of its feed-forward units), unstructured pruning sparsegpt "
        "(MiniLM at 50% with the defaults: 0.891 -> 0.973; not with lottery_ticket). The report's importance_chosen says so. l1/l2 weight magnitude; apoz: how often a neuron outputs zero on the data (structured only); taylor: |weight x gradient|; "
        "wanda: |weight| x the L2 norm of its input feature on the data, compared within each output row (Sun et al. 2023); structured: a "
        "channel's RMS at the layers that read it x the norm of their weights for it (what it carries into them); "
        "sparsegpt: each layer pruned to its amount with the remaining weights updated to reproduce its output on the data "
        "(second-order, Frantar & Alistarh 2023; unstructured only), the kept weights then re-solved by least squares for the mask; the report gives each "
        "layer's output error without an update, after SparseGPT's and after the re-solve.",
    )
    layer_amounts: dict[str, float] = Field(default_factory=dict, description="Per-layer overrides of `amount`, by layer name (see the step report).")
    skip_layers: NameList = Field(default_factory=list, max_length=4096, description="Layers left untouched.")
    channel_multiple: int = Field(
        8, ge=1, le=256,
        description="structured: keep a multiple of this many channels/neurons per layer. Odd widths (14, 55...) run slower than the wider multiple of 8 on most CPU and GPU kernels; 1 keeps the exact amount.",
    )
    prune_output_layer: bool = Field(False, description="Also prune the last layer (structured pruning never narrows the model's outputs).")
    iterations: int = Field(1, ge=1, le=50, description="Rounds of prune -> fine-tune; the pruned fraction grows to `amount` over the rounds.")
    schedule: list[float] | None = Field(
        None, min_length=1, max_length=50,
        description="unstructured: the sparsity after each round, increasing, instead of an even ramp to `amount` (`iterations` and "
        "`amount` then follow from it: one round per entry, ending at the last). With `max_accuracy_drop`, the rounds stop at the first "
        "one the evaluation data does not allow and the last one within it is kept: the sparsity the data supports, measured.")
    finetune_epochs: int | None = Field(
        None, ge=0, le=1000,
        description="Fine-tuning epochs after each round. Default: 2 when the job has a dataset, else 0. The best epoch on the evaluation data is kept, so fine-tuning never leaves the model worse than pruning alone.",
    )
    max_accuracy_drop: float | None = Field(
        None, ge=0, le=1, description="Stop before accuracy (absolute, on the evaluation data) drops more than this; keep the best model within it."
    )
    lottery_ticket: bool = Field(False, description="Iterative magnitude pruning with rewinding to the uploaded weights (Frankle & Carbin).")
    refit: bool | None = Field(
        None, description="structured: after each round, every layer whose inputs lost channels gets the weights and bias that best reproduce "
        "(least squares on the job's data) what it output before, from what it receives now (ThiNet; Kwon et al. 2022's mask tuning); "
        "the report gives each layer's output error before and after. Default: on when the step does not fine-tune (one-shot: a residual "
        "CNN on MNIST at half its channels 67.2% -> 96.0%) and on transformers ranked by wanda (MiniLM fine-tuned: 0.928 -> 0.938); off "
        "otherwise (fine-tuned from the refit by l1, MiniLM and the CNN ended 0.2-2.5 points lower). Needs a dataset.")
    output_weighted: bool = Field(
        True, description="sparsegpt: weigh each layer's fit by how much the model's output depends on each calibration position (token, "
        "pixel) and output channel, measured by gradient probes of the output on the data (output-aware layer objectives); false fits every "
        "position alike, as the paper does. Measured on all-MiniLM-L6-v2 at 50%, no fine-tuning: held-out cosine 0.963 -> 0.972 (0.960 -> 0.968 with the mask in one pass).")
    mask_rounds: int = Field(
        3, ge=1, le=10, description="sparsegpt: rounds in which each layer's mask is chosen, each taking 1/mask_rounds more of the layer's amount "
        "on the weights the last round re-solved, the kept weights and the bias re-solved by least squares after each (Boza 2024's gradual "
        "mask); 1 chooses the whole mask in one pass, as the paper does. Measured on all-MiniLM-L6-v2 at 50%, no fine-tuning: held-out cosine "
        "0.9677 (one pass) -> 0.9715 (3 rounds, the bias re-solved too).")
    training: TrainingSpec = Field(default_factory=TrainingSpec)

    @model_validator(mode="after")
    def _consistent(self) -> "PruneStep":
        if self.heads and self.kind != "structured":
            raise ValueError("heads removes whole attention heads, so it needs kind 'structured'")
        if self.amount == 0 and not self.heads:
            raise ValueError("amount must be > 0 (0 is allowed only with heads > 0: attention heads alone)")
        if self.importance == "apoz" and self.kind != "structured":
            raise ValueError("importance 'apoz' ranks neurons, so it needs kind 'structured'")
        if self.importance == "sparsegpt" and (self.kind != "unstructured" or self.lottery_ticket):
            raise ValueError("importance 'sparsegpt' chooses single weights, so it needs kind 'unstructured' (and no lottery_ticket)")
        if self.importance == "wanda" and self.lottery_ticket:
            raise ValueError("importance 'wanda' measures the data; lottery_ticket ranks by magnitude alone")
        if self.lottery_ticket and (self.kind != "unstructured" or (self.finetune_epochs or 0) < 1):
            raise ValueError("lottery_ticket needs kind 'unstructured' and finetune_epochs >= 1 (the ticket is trained)")
        for name, amount in self.layer_amounts.items():
            if not 0 <= amount < 1:
                raise ValueError(f"layer_amounts['{name}'] must be in [0, 1)")
        if self.schedule is not None:
            self._follow_schedule(self.schedule)
        return self

    def _follow_schedule(self, schedule: list[float]) -> None:
        if self.kind != "unstructured" or self.lottery_ticket:
            raise ValueError("schedule sets the sparsity of each round of unstructured pruning: it needs kind 'unstructured' (and no lottery_ticket)")
        if any(not 0 < a < 1 for a in schedule) or any(b <= a for a, b in zip(schedule, schedule[1:])):
            raise ValueError(f"schedule must increase strictly, each entry in (0, 1): {schedule}")
        # Assigned past validation (pydantic would re-run this validator on each assignment).
        object.__setattr__(self, "amount", schedule[-1])
        object.__setattr__(self, "iterations", len(schedule))

    def round_fraction(self, round_index: int) -> float:
        """How far towards `amount` round `round_index` (0-based) goes, as the pruning's geometric ramp
        takes it (workers.pruning.unstructured.round_target: pruned = 1 - (1 - amount) ** fraction),
        so that with a schedule the round reaches its entry (and each layer override its share)."""
        if self.schedule is not None:
            return math.log1p(-self.schedule[round_index]) / math.log1p(-self.schedule[-1])
        return (round_index + 1) / self.iterations

    def needs_dataset(self) -> bool:
        return (self.finetune_epochs or 0) > 0 or self.importance in ("apoz", "taylor", "wanda", "sparsegpt") or self.max_accuracy_drop is not None

    def trains(self, has_dataset: bool) -> bool:
        return (self.finetune_epochs if self.finetune_epochs is not None else (2 if has_dataset else 0)) > 0 and has_dataset
