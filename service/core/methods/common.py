"""What every method's spec shares: strict parsing, the facts the API and the worker read from a
spec (needs a dataset, writes the final bundle, references other uploaded models), and the sub-specs
several methods use (training, calibration)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.core.methods.rows import Curve, PerLayer
from service.core.reported import Reported

# Node, layer and operator names: bounded, so a spec cannot smuggle megabytes into the job store.
NameList = list[Annotated[str, Field(min_length=1, max_length=512)]]


class StrictModel(BaseModel):
    # An unknown field is a typo a user wants to hear about, not silently ignore.
    model_config = ConfigDict(extra="forbid")


@dataclass
class StepCheck:
    """What the API knows when it checks a step against the tenant's uploads (no torch, no files)."""

    index: int
    model: Any  # the job's model row: .inputs, .outputs
    dataset: Any | None  # the job's dataset row (.has_labels), if any
    other_model: Callable[[str], Any]  # another of the tenant's models by id (404 when not theirs)


class StepReport(Reported):
    """What one step did: `index`, `method` and the method's own fields (each method's report model
    lists them; read tolerantly, so older jobs stay readable as reports grow; service.core.reported)."""

    index: int = Field(description="The step's position in the job (0-based).")
    method: str
    # Said by every method that trains or scores on data (only when it did).
    device: str | None = Field(None, description="Where the step trained: cpu or cuda[:n].")
    evaluated_on: str | None = Field(None, description="The data the step scored quality on: evaluation data, training data (no evaluation dataset) or synthetic inputs.")
    why_no_conversion: str | None = Field(None, description="Why the step worked on the ONNX weights where they are stored instead of converting the model to torch.")

    # What the job's report page draws for the step; each method's report knows its own rows.
    def per_layer(self) -> PerLayer | None:
        return None

    def curves(self) -> list[Curve]:
        return []


class MethodSpec(StrictModel):
    """A job step. Each method is one module in service/core/methods/ (this spec and its facts) and
    one in workers/methods/ (its apply); the registries, /v1/methods and the OpenAPI schema derive from them."""

    # Writes the final storage bundle (model.msz), so it must be the job's last step.
    writes_bundle: ClassVar[bool] = False
    # Position in /v1/methods and in the OpenAPI union.
    listing_order: ClassVar[int] = 100
    # The schema of what the step reports (job.metrics.step_reports[i]).
    report_model: ClassVar[type[StepReport]] = StepReport

    def needs_dataset(self) -> bool:
        """True when the step cannot run without the job's dataset (calibration, training, importance)."""
        return False

    def trains(self, has_dataset: bool) -> bool:
        """True when the step takes gradient steps (fine-tuning, distillation, head training): such
        jobs go to GPU workers when any are running (service.core.routing)."""
        return False

    def referenced_models(self) -> list[str]:
        """Ids of other uploaded models the step uses (e.g. a distillation student)."""
        return []

    def check(self, context: StepCheck) -> None:
        """Checks against the tenant's uploads, run by the API before the job is queued (raise InvalidInput)."""


class CalibrationSpec(StrictModel):
    method: Literal["minmax", "entropy", "percentile"] | None = Field(
        None, description="How activation ranges are chosen from the calibration data. Default: minmax and percentile both measured."
    )
    max_samples: int = Field(256, ge=1, le=100_000, description="Cap on calibration samples taken from the dataset.")
    percentile: float = Field(
        99.99, gt=50.0, le=100.0, description="percentile method: the kept fraction of |activations|, in percent."
    )
    num_bins: int = Field(
        2048, ge=128, le=65536, description="entropy/percentile: histogram bins (more than num_quantized_bins, or entropy equals minmax)."
    )
    num_quantized_bins: int = Field(128, ge=16, le=4096, description="entropy: bins of the quantized distribution.")
    symmetric: bool | None = Field(None, description="Symmetric activation ranges; default: the method's own default.")

    @model_validator(mode="after")
    def _bins_must_differ(self) -> "CalibrationSpec":
        if self.method == "entropy" and self.num_bins <= self.num_quantized_bins:
            raise ValueError("entropy calibration needs num_bins > num_quantized_bins (otherwise it equals minmax)")
        return self


class TrainingSpec(StrictModel):
    """How fine-tuning runs (labels when the data has them, otherwise the original model's outputs)."""

    batch_size: int | None = Field(
        None, ge=1, le=65536,
        description="Default (null): 64, smaller on a small dataset so every epoch takes at least 16 optimiser steps (never below 8): "
        "300 sentences at 64 are 5 steps an epoch, too few to recover a pruned or clustered transformer. A number given here is used as it is.",
    )
    lr: float | None = Field(None, gt=0, le=10, description="Default: 1e-4 when fine-tuning the uploaded (trained) model, which a larger step can push further from the original than no fine-tuning at all; 1e-3 when training a new student.")
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0, le=1)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    augment_copies: int | None = Field(
        None, ge=0, le=16,
        description="When fine-tuning distils towards the original model's outputs and the data holds token ids: copies of every training "
        "sequence drawn each epoch with a share of their tokens replaced by tokens from the data, labelled by the original model. Default "
        "(null): 3 (all-MiniLM-L6-v2 pruned 50%, 300 sentences: held-out cosine 0.965 -> 0.968 after 4 epochs); 0 trains on the data alone. "
        "Each copy adds the data's length to an epoch.",
    )
    augment_share: float = Field(0.3, gt=0, le=1, description="Share of a copy's tokens replaced (the first and last real token and padding never are).")
