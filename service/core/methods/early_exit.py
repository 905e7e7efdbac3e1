"""The early_exit step: classifier heads at chosen depths and a confidence policy (dynamic computation)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from service.core.methods.common import MethodSpec, NameList, StepReport


class EarlyExitReport(StepReport):
    method: Literal["early_exit"] = "early_exit"
    exits: list[dict[str, Any]] = Field(default_factory=list)
    model_macs: int | None = None
    thresholds: list[dict[str, Any]] = Field(default_factory=list, description="Per threshold: accuracy, average MACs, share leaving at each exit.")
    chosen: dict[str, Any] | None = None
    deployable: dict[str, Any] | None = Field(None, description="The nested-If model: ONNX Runtime time per sample at batch 1, exit shares measured.")
    quality_metric: str | None = None
    original_score: float | None = Field(None, description="The original model's score on the held-out data, in quality_metric.")


class EarlyExitStep(MethodSpec):
    """Attach classifier heads after chosen layers, train them by distillation from the model's own
    final head (the backbone is frozen, so the final exit keeps the original's accuracy exactly), and
    choose a confidence threshold on held-out data: a sample leaves at the first exit whose top softmax
    probability reaches it. The artifact computes only up to the exit taken (nested ONNX `If`), keeps
    the original's input and first output, and adds `exit_index`."""

    listing_order: ClassVar[int] = 90
    report_model: ClassVar[type[StepReport]] = EarlyExitReport
    method: Literal["early_exit"] = "early_exit"
    exits: NameList | None = Field(
        None, max_length=8, description="Layers after which to attach an exit (torch names as reported). Default: up to 3 layers, evenly spaced among those within the first half of the model's MACs."
    )
    max_accuracy_drop: float = Field(0.002, ge=0, le=1, description="Largest accuracy loss (0.002 = 0.2 points) the chosen threshold may cost on the held-out data.")
    thresholds: list[Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]] | None = Field(None, min_length=1, max_length=64, description="Confidence thresholds to evaluate (default: 0.5 to 0.9999).")
    head_grid: int = Field(6, ge=1, le=16, description="A convolutional exit average-pools its feature map to head_grid x head_grid before its linear classifier.")
    head_hidden: int = Field(128, ge=0, le=4096, description="Hidden units of each exit head's one hidden layer (ReLU); 0 for a single linear layer.")
    epochs: int = Field(10, ge=1, le=1000, description="Head training epochs (on cached features: cheap).")
    temperature: float = Field(2.0, gt=0, le=100, description="Distillation temperature of the final head's soft targets.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the label cross-entropy when the data has labels (soft loss: 1 - alpha).")

    def needs_dataset(self) -> bool:
        return True

    def trains(self, has_dataset: bool) -> bool:
        return True
