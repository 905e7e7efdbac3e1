"""Distillation on small models, called directly: derived students, losses, reports and bad specs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from pydantic import ValidationError

from service.core.errors import CompressionFailed, InvalidInput
from service.core.specs import DistillStep
from tests.builders import cnn, mlp, reference_outputs
from workers.methods import distill
from workers.steps import StepContext, StepData
from workers.metrics import parameter_counts


def data_for(model: onnx.ModelProto, n: int = 256, labels: bool = True) -> StepData:
    dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    x = np.random.default_rng(0).standard_normal((n, *dims)).astype(np.float32)
    return StepData(inputs={"x": x}, labels=reference_outputs(model, x).argmax(-1) if labels else None)


def run(model: onnx.ModelProto, data: StepData, tmp_path: Path, **spec):
    messages: list[str] = []
    ctx = StepContext(work_dir=tmp_path, report_progress=lambda f, m, milestone=False: messages.append(m))
    result = distill.apply(model, DistillStep(**spec), data, ctx)
    onnx.checker.check_model(result.model, full_check=True)
    return result, messages


def test_width_student_keeps_io_and_narrows_hidden_layers(tmp_path: Path) -> None:
    teacher = mlp(in_features=32, hidden=64)
    result, messages = run(teacher, data_for(teacher), tmp_path, student={"kind": "width", "width": 0.5}, epochs=3)
    shapes = [row["weights"][0] for row in result.report["student_architecture"]]
    assert shapes == [[32, 32], [32, 32], [4, 32]]
    assert parameter_counts(result.model)[0] < parameter_counts(teacher)[0] / 2
    assert reference_outputs(result.model, np.zeros((3, 32), np.float32)).shape == (3, 4)
    assert sum("distilling: epoch" in m for m in messages) == 3
    assert [e["epoch"] for e in result.report["curve"]] == [1, 2, 3]
    assert result.report["labels_used"] and result.report["alpha"] == 0.5


def test_unlabelled_data_uses_soft_targets_only(tmp_path: Path) -> None:
    teacher = mlp(in_features=32, hidden=64)
    result, _ = run(teacher, data_for(teacher, labels=False), tmp_path, epochs=2)
    assert result.report["labels_used"] is False and result.report["quality_metric"] == "agreement_with_teacher"
    assert all("hard" not in e for e in result.report["curve"])


def test_depth_student_drops_shape_preserving_layers(tmp_path: Path) -> None:
    teacher = mlp(in_features=32, hidden=64)
    result, _ = run(teacher, data_for(teacher), tmp_path, student={"kind": "depth"}, epochs=1)
    assert result.report["student"]["dropped_layers"] == ["w1"]
    assert [row["type"] for row in result.report["student_architecture"]] == ["Linear", "Identity", "Linear"]


def test_low_rank_student_factorises_linear_layers(tmp_path: Path) -> None:
    teacher = mlp(in_features=32, hidden=64)
    result, _ = run(teacher, data_for(teacher), tmp_path, student={"kind": "low_rank", "rank": 8}, epochs=1)
    assert result.report["student"]["ranks"] == {"w0": 8, "w1": 8}
    assert result.report["student_parameters"] < result.report["teacher_parameters"]


def test_hint_distillation_with_projection(tmp_path: Path) -> None:
    teacher = mlp(in_features=32, hidden=64)
    result, _ = run(teacher, data_for(teacher), tmp_path, student={"width": 0.5}, epochs=2, hints=[{"teacher_layer": "w1", "student_layer": "w1"}])
    assert all(e["hint"] > 0 for e in result.report["curve"])


def test_conv_student_and_baseline(tmp_path: Path) -> None:
    teacher = cnn(channels=16)
    result, _ = run(teacher, data_for(teacher, n=128), tmp_path, student={"width": 0.5}, epochs=2, compare_baseline=True)
    assert "baseline_from_scratch" in result.report and "distillation_gain" in result.report
    assert reference_outputs(result.model, np.zeros((2, 1, 8, 8), np.float32)).shape == (2, 10)


def test_uploaded_student_must_fit_the_teacher(tmp_path: Path) -> None:
    teacher = mlp(in_features=32, hidden=64)
    wrong = mlp(in_features=32, hidden=16, classes=3)
    ctx = StepContext(work_dir=tmp_path, load_model=lambda _id: wrong)
    with pytest.raises(InvalidInput, match="output shape"):
        distill.apply(teacher, DistillStep(student_model_id="mdl_x", epochs=1), data_for(teacher), ctx)
    right = mlp(in_features=32, hidden=16, seed=3)
    ctx = StepContext(work_dir=tmp_path, load_model=lambda _id: right)
    result = distill.apply(teacher, DistillStep(student_model_id="mdl_x", epochs=1), data_for(teacher), ctx)
    assert result.report["student"] == {"kind": "uploaded", "model_id": "mdl_x"}


def test_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        DistillStep(temperature=0)
    teacher = mlp(in_features=32, hidden=64)
    with pytest.raises(CompressionFailed) as info:
        distill.apply(teacher, DistillStep(), StepData(), StepContext(work_dir=tmp_path))
    assert info.value.code == "dataset_required"
    with pytest.raises(CompressionFailed) as info:
        distill.apply(teacher, DistillStep(compare_baseline=True), data_for(teacher, labels=False), StepContext(work_dir=tmp_path))
    assert info.value.code == "labels_required"


def test_same_seed_gives_the_same_student(tmp_path: Path) -> None:
    teacher = mlp(in_features=32, hidden=64)
    data = data_for(teacher)
    first, _ = run(teacher, data, tmp_path, epochs=2, training={"seed": 7})
    second, _ = run(teacher, data, tmp_path, epochs=2, training={"seed": 7})
    assert first.model.SerializeToString() == second.model.SerializeToString()
    assert first.report["curve"] == second.report["curve"]
