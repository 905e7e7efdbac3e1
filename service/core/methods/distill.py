"""The distill step: a student trained on the uploaded model's outputs."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from service.core.errors import InvalidInput
from service.core.methods.common import MethodSpec, NameList, StepCheck, StepReport, StrictModel, TrainingSpec
from service.core.methods.rows import Curve, DistillEpoch

class StudentSpec(StrictModel):
    """How the service derives the student from the teacher."""

    kind: Literal["width", "depth", "low_rank"] = "width"
    width: float = Field(0.5, gt=0, lt=1, description="width: fraction of every hidden layer's neurons/channels kept (the teacher's most important, by L2 norm).")
    drop_layers: NameList = Field(default_factory=list, max_length=4096, description="depth: layers to remove (each must map its input shape to itself, e.g. a residual block's conv).")
    drop_count: int = Field(1, ge=1, le=100, description="depth, when drop_layers is empty: remove this many whole blocks (a transformer's, or a CNN's identity-shortcut residual blocks; every other one first), or, in a network without either, this many shape-preserving layers, last first.")
    rank: int | None = Field(None, ge=1, le=65536, description="low_rank: rank of every factorised linear layer.")
    energy: float = Field(0.9, gt=0, le=1, description="low_rank, when rank is unset: keep the singular values holding this share of the energy.")


class HintSpec(StrictModel):
    teacher_layer: str
    student_layer: str


class DistillReport(StepReport):
    method: Literal["distill"] = "distill"
    student: dict[str, Any] | None = Field(None, description="How the student was made (kind, width, ranks, dropped layers, or an uploaded model).")
    teacher_parameters: int | None = None
    student_parameters: int | None = None
    output_kind: str | None = Field(None, description="classifier, token_logits or features: it decides the loss.")
    quality_metric: str | None = None
    teacher_score: float | None = None
    student_score: float | None = None
    best_epoch: int | None = None
    curve: list[DistillEpoch] = Field(default_factory=list)
    teacher_architecture: list[dict[str, Any]] = Field(default_factory=list, description="Per layer of the teacher: type, weight shapes, parameters.")
    student_architecture: list[dict[str, Any]] = Field(default_factory=list, description="The same for the student.")
    temperature: float | None = None
    loss: str | None = Field(None, description="The distillation loss, in words (it follows output_kind).")
    alpha: float | None = Field(None, description="The labels' share of the loss (0 without labels).")
    labels_used: bool | None = None
    stopped_early: bool | None = Field(None, description="Training stopped when validation had not improved for `patience` epochs.")
    baseline_from_scratch: dict[str, Any] | None = Field(None, description="With compare_to_scratch: the same student trained on the labels alone (score, best epoch, curve).")
    distillation_gain: float | None = Field(None, description="student_score minus the from-scratch baseline's score.")

    def curves(self) -> list[Curve]:
        return [Curve("held-out score by distillation epoch", [e.validation for e in self.curve])] if self.curve else []


class DistillStep(MethodSpec):
    """Train a smaller student on the uploaded model's outputs (knowledge distillation)."""

    listing_order: ClassVar[int] = 30
    report_model: ClassVar[type[StepReport]] = DistillReport
    method: Literal["distill"] = "distill"
    student_model_id: str | None = Field(None, description="Use this uploaded model as the student (same inputs and outputs as the teacher).")
    student: StudentSpec = Field(default_factory=StudentSpec, description="How to derive the student when student_model_id is not given.")
    temperature: float = Field(4.0, gt=0, le=100, description="Softmax temperature of the soft targets; the soft loss is scaled by T^2.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the hard-label cross-entropy when the data has labels (soft loss: 1 - alpha).")
    hints: list[HintSpec] = Field(default_factory=list, max_length=64, description="Feature distillation: match these intermediate outputs (a learned projection bridges different widths).")
    hint_weight: float = Field(1.0, ge=0, le=1000, description="Weight of the feature (hint) loss against the logit loss.")
    epochs: int = Field(10, ge=1, le=1000)
    patience: int | None = Field(None, ge=1, le=1000, description="Early stopping: stop after this many epochs without a better validation score.")
    schedule: Literal["cosine", "constant"] = "cosine"
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    compare_baseline: bool = Field(False, description="Also train the same student from scratch on hard labels with the same budget, and report both.")

    def needs_dataset(self) -> bool:
        return True

    def trains(self, has_dataset: bool) -> bool:
        return True

    def referenced_models(self) -> list[str]:
        return [self.student_model_id] if self.student_model_id else []

    def check(self, context: StepCheck) -> None:
        if self.compare_baseline and context.dataset is not None and not context.dataset.has_labels:
            raise InvalidInput(f"steps[{context.index}]: compare_baseline trains on hard labels, but the dataset has no 'labels' array")
        if self.student_model_id:
            student, teacher = context.other_model(self.student_model_id), context.model
            t_in = [(i["name"], i["shape"][1:]) for i in teacher.inputs]
            s_in = [(i["name"], i["shape"][1:]) for i in student.inputs]
            if t_in != s_in:
                raise InvalidInput(f"steps[{context.index}]: the student's inputs {s_in} do not match the teacher's {t_in}", code="invalid_student")
            t_out, s_out = teacher.outputs[0]["shape"][1:], student.outputs[0]["shape"][1:]
            if t_out != s_out:
                raise InvalidInput(f"steps[{context.index}]: the student's output shape {s_out} does not match the teacher's {t_out}", code="invalid_student")
