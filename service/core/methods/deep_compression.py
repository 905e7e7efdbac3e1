"""The deep_compression step: prune, cluster, Huffman-code (Han et al.)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from service.core.methods.cluster import ClusterStep
from service.core.methods.common import MethodSpec, StepReport, TrainingSpec
from service.core.methods.prune import PruneStep

class DeepCompressionReport(StepReport):
    method: Literal["deep_compression"] = "deep_compression"
    stages: list[dict[str, Any]] = Field(default_factory=list, description="Per stage (pruned, clustered, Huffman-coded): size, ratio, accuracy.")
    paper: dict[str, Any] | None = None
    prune: dict[str, Any] | None = Field(None, description="The pruning stage's own report (as a prune step reports).")
    cluster: dict[str, Any] | None = Field(None, description="The clustering stage's own report (as a cluster step reports).")
    labels_for_accuracy: bool | None = Field(None, description="Whether the stages' accuracy came from labels in the held-out data.")


class DeepCompressionStep(MethodSpec):
    """The Deep Compression recipe (Han, Mao & Dally, ICLR 2016): prune with fine-tuning, cluster with
    centroid fine-tuning, Huffman-code; a per-stage table of size and accuracy. Must be the last step."""

    writes_bundle: ClassVar[bool] = True
    listing_order: ClassVar[int] = 60
    report_model: ClassVar[type[StepReport]] = DeepCompressionReport
    method: Literal["deep_compression"] = "deep_compression"
    prune: PruneStep = Field(default_factory=lambda: PruneStep(kind="unstructured", amount=0.92, iterations=3, finetune_epochs=3, training=TrainingSpec(lr=1e-3)))
    cluster: ClusterStep = Field(default_factory=lambda: ClusterStep(bits=4, finetune_epochs=2, training=TrainingSpec(lr=1e-4)))
    huffman: bool = True

    def needs_dataset(self) -> bool:
        return self.prune.needs_dataset() or self.cluster.needs_dataset()

    def trains(self, has_dataset: bool) -> bool:
        return self.prune.trains(has_dataset) or self.cluster.trains(has_dataset)
