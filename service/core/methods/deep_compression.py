"""The deep_compression step: prune, cluster, Huffman-code (Han et al.)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from service.core.methods.cluster import ClusterStep
from service.core.methods.common import MethodSpec, StepReport, TrainingSpec
from service.core.methods.prune import PruneStep

# The sparsities the default pruning stage climbs through: from 20% (a sentence encoder loses 0.06 of
# cosine at 50%) to 98%, dense at the top, where each point removes a tenth or more of what is left.
# The first round that does not fit stops the climb. Its fine-tuning per round.
AUTO_SCHEDULE = [0.2, 0.35, 0.5, 0.65, 0.75, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98]
AUTO_FINETUNE_EPOCHS = 2
# Per quality measure, the default of max_quality_drop (why: the field's description).
DEFAULT_QUALITY_DROP = {"accuracy": 0.001, "agreement_with_original": 0.01, "next_token_agreement_with_original": 0.01, "cosine_to_original": 0.03}
PRUNE_SHARE = 0.5
# With the default stages, the rows sharing a codebook when one per layer misses the budget.
AUTO_GROUP_SIZE = 32
# With the default stages, clusters within the budget are tried again at this many fewer bits a weight on average, and
# again. A quarter bit: on all-MiniLM-L6-v2 4 bits kept 0.98, 3.75 bits 0.976 and 3.5 bits 0.964 (budget 0.97), so a half-bit
# step went from the first straight past the last that fits.
AUTO_FEWER_BITS = 0.25

class DeepCompressionReport(StepReport):
    method: Literal["deep_compression"] = "deep_compression"
    stages: list[dict[str, Any]] = Field(default_factory=list, description="Per stage (pruned, clustered, Huffman-coded): size, ratio, accuracy.")
    paper: dict[str, Any] | None = None
    prune: dict[str, Any] | None = Field(None, description="The pruning stage's own report (as a prune step reports).")
    cluster: dict[str, Any] | None = Field(None, description="The clustering stage's own report (as a cluster step reports).")
    labels_for_accuracy: bool | None = Field(None, description="Whether the stages' accuracy came from labels in the held-out data.")
    chosen: dict[str, Any] | None = Field(
        None, description="When `prune` was left to its default: the quality measure and its budget, the sparsities tried and what each "
        "kept, the sparsity chosen and why, and whether the whole step stayed within the budget.")
    warnings: list[str] = Field(default_factory=list, description="Where the step lost more quality than its budget, and what to change.")


class DeepCompressionStep(MethodSpec):
    """The Deep Compression recipe (Han, Mao & Dally, ICLR 2016): prune with fine-tuning, cluster with
    centroid fine-tuning, Huffman-code; a per-stage table of size and accuracy. Must be the last step."""

    writes_bundle: ClassVar[bool] = True
    listing_order: ClassVar[int] = 60
    report_model: ClassVar[type[StepReport]] = DeepCompressionReport
    method: Literal["deep_compression"] = "deep_compression"
    prune: PruneStep | None = Field(
        None, description="The pruning stage. Default: the sparsity chosen on the job's data: unstructured magnitude pruning in rounds of "
        f"{', '.join(f'{a:.0%}' for a in AUTO_SCHEDULE)} with {AUTO_FINETUNE_EPOCHS} fine-tuning epochs each, stopping at the first round "
        "that loses more than half of `max_quality_drop` on the evaluation data and keeping the one before (the report's `chosen` says "
        "which and why; when even the first does not fit, nothing is pruned). Han et al.'s LeNet setting was 92% in 3 rounds of 3 epochs: {\"kind\": \"unstructured\", \"amount\": 0.92, "
        "\"iterations\": 3, \"finetune_epochs\": 3}.")
    cluster: ClusterStep | None = Field(
        None, description="The clustering stage. Default: 4 bits (each layer's bits measured on the job's data), 2 epochs of centroid "
        "fine-tuning (lr 1e-4), a codebook per layer; with `prune` left to its default too, retried with a codebook per 32 rows when that "
        f"misses `max_quality_drop`; when within it, tried again at {AUTO_FEWER_BITS:g} fewer bits a weight on average (`average_bits`) and "
        "again down to one bit fewer, each kept while it stays within it and makes the file smaller (one of the same size passes on down), "
        "then once halfway between the last that fit and the first that did not.")
    huffman: bool = True
    max_quality_drop: float | None = Field(
        None, gt=0, le=1,
        description="How much of the evaluation data's quality the whole step may lose (absolute), when `prune` is left to its default: "
        "accuracy with labels (default 0.001, the 0.1 points Han et al. report as no loss), agreement with the original's top class or "
        "token without (default 0.01), cosine to the original's output for embeddings and other features (default 0.03). Half goes to "
        "pruning, the rest is left for the clusters. With `cluster` left to its default too, a codebook per layer that ends beyond the "
        "budget is retried with a codebook per 32 rows of each unpruned layer (`chosen.clusters`). A step that ends beyond it says so in "
        "its warnings.")

    def needs_dataset(self) -> bool:
        return self.prune is None or self.prune.needs_dataset() or self.clusters().needs_dataset()

    def trains(self, has_dataset: bool) -> bool:
        return has_dataset if self.prune is None else (self.prune.trains(has_dataset) or self.clusters().trains(has_dataset))

    def clusters(self) -> ClusterStep:
        """The clustering stage: as given, or the default."""
        return self.cluster or ClusterStep(bits=4, finetune_epochs=2, bit_allocation="measured", training=TrainingSpec(lr=1e-4))

    @model_validator(mode="after")
    def _budget_with_auto(self) -> "DeepCompressionStep":
        if self.max_quality_drop is not None and self.prune is not None:
            raise ValueError("max_quality_drop sets how far the default pruning stage may go; with `prune` given, set its max_accuracy_drop instead")
        return self

    def auto_prune(self, budget: float) -> PruneStep:
        """The pruning stage chosen on the data: the schedule, stopped within `budget` of quality."""
        # Magnitude, explicitly: the clusters after it keep their gptq assignment and row groups only on unpruned layers, so
        # SparseGPT's default for transformers is not taken here until pruned layers get them too.
        return PruneStep(kind="unstructured", importance="l1", schedule=AUTO_SCHEDULE, finetune_epochs=AUTO_FINETUNE_EPOCHS,
                         max_accuracy_drop=budget, training=TrainingSpec(lr=1e-3))
