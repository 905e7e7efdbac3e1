"""Pruning's acceptance numbers on real MNIST (../shared/data/mnist): the train split fine-tunes,
the test split evaluates."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from service.core.specs import PruneStep
from tests import mnist
from tests.builders import reference_outputs
from tests.cnn_models import downsample, train_residual_cnn
from workers.methods import prune
from workers.steps import StepContext, StepData
from workers.metrics import macs_per_sample, parameter_counts

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not mnist.available(), reason="../shared/data/mnist is missing")]


def error_rate(model: onnx.ModelProto, images: np.ndarray, labels: np.ndarray) -> float:
    return float((reference_outputs(model, images).argmax(-1) != labels).mean())


@pytest.fixture(scope="module")
def lenet() -> onnx.ModelProto:
    return onnx.load_model_from_string(mnist.lenet_300_100(epochs=4))


def test_lenet_300_100_unstructured_92_percent(lenet: onnx.ModelProto, tmp_path: Path) -> None:
    train_x, train_y = mnist.load("train")
    test_x, test_y = mnist.load("test")
    data = StepData(inputs={"x": train_x}, labels=train_y, evaluation=StepData(inputs={"x": test_x}, labels=test_y))
    spec = PruneStep(kind="unstructured", amount=0.92, iterations=3, finetune_epochs=2, training={"lr": 5e-4, "batch_size": 128})
    result = prune.apply(lenet, spec, data, StepContext(work_dir=tmp_path))

    onnx.checker.check_model(result.model, full_check=True)
    before, after = error_rate(lenet, test_x, test_y), error_rate(result.model, test_x, test_y)
    assert after - before <= 0.002, f"test error {before:.4f} -> {after:.4f}"
    stored_ratio = len(lenet.SerializeToString()) / len(result.model.SerializeToString())
    assert stored_ratio >= 5, stored_ratio
    assert result.report["achieved"] == pytest.approx(0.92, abs=0.005)
    hidden = [row for row in result.report["layers"] if row["layer"] != "4"]
    assert all(row["sparsity"] > 0.8 for row in hidden)


@pytest.fixture(scope="module")
def small_mnist():
    """MNIST at 14x14 (8,000 training and 2,000 test images) and a residual CNN trained on it."""
    train_x, train_y = mnist.load("train")
    test_x, test_y = mnist.load("test")
    train = (downsample(train_x[:8000]), train_y[:8000])
    return train, (downsample(test_x[:2000]), test_y[:2000]), train_residual_cnn(*train)


def test_residual_cnn_with_batch_norm_structured_half_the_channels(small_mnist, tmp_path: Path) -> None:
    (train_x, train_y), (test_x, test_y), net = small_mnist
    buffer = io.BytesIO()
    # do_constant_folding=False keeps BatchNormalization nodes (folding would fuse them into the convs).
    torch.onnx.export(net, (torch.zeros(2, 1, 14, 14),), buffer, dynamo=False, opset_version=17, do_constant_folding=False,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    model = onnx.load_model_from_string(buffer.getvalue())
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 4
    assert any(n.op_type == "Add" for n in model.graph.node)

    data = StepData(inputs={"x": train_x}, labels=train_y, evaluation=StepData(inputs={"x": test_x}, labels=test_y))
    spec = PruneStep(kind="structured", amount=0.5, scope="layer", finetune_epochs=2, max_accuracy_drop=0.03, training={"lr": 1e-3})
    result = prune.apply(model, spec, data, StepContext(work_dir=tmp_path))

    onnx.checker.check_model(result.model, full_check=True)
    assert parameter_counts(result.model)[0] <= 0.5 * parameter_counts(model)[0]
    assert macs_per_sample(result.model) <= 0.5 * macs_per_sample(model)
    assert error_rate(result.model, test_x, test_y) - error_rate(model, test_x, test_y) <= 0.03
    widths = {row["layer"]: row["shape_after"][0] for row in result.report["layers"]}
    assert widths["stem.0"] == widths["block.3"] == 8  # the residual add keeps both branches equally wide


@pytest.fixture(scope="module")
def mnist_data() -> StepData:
    train_x, train_y = mnist.load("train")
    test_x, test_y = mnist.load("test")
    return StepData(inputs={"x": train_x}, labels=train_y, evaluation=StepData(inputs={"x": test_x}, labels=test_y))


def test_lenet_distilled_into_a_quarter_size_student(lenet: onnx.ModelProto, mnist_data: StepData, tmp_path: Path) -> None:
    from service.core.specs import DistillStep
    from workers.methods import distill

    spec = DistillStep(student={"kind": "width", "width": 0.25}, epochs=10, compare_baseline=True, training={"lr": 2e-3, "batch_size": 128})
    labelled = distill.apply(lenet, spec, mnist_data, StepContext(work_dir=tmp_path))
    report = labelled.report
    assert report["student_parameters"] <= report["teacher_parameters"] / 4
    test_x, test_y = mnist_data.evaluation.inputs["x"], mnist_data.evaluation.labels
    teacher_error, student_error = error_rate(lenet, test_x, test_y), error_rate(labelled.model, test_x, test_y)
    assert student_error - teacher_error <= 0.005, f"{teacher_error:.4f} -> {student_error:.4f}"
    assert report["baseline_from_scratch"]["score"] > 0.9  # the from-scratch student is reported next to it
    assert len(report["curve"]) == 10 and report["best_epoch"] >= 1

    unlabelled_data = StepData(inputs=mnist_data.inputs, labels=None, evaluation=mnist_data.evaluation)
    unlabelled = distill.apply(lenet, spec.model_copy(update={"compare_baseline": False}), unlabelled_data, StepContext(work_dir=tmp_path))
    assert unlabelled.report["labels_used"] is False
    assert (1 - error_rate(unlabelled.model, test_x, test_y)) >= 0.97 * (1 - student_error)


def test_residual_cnn_clustered_at_4_bits(small_mnist, tmp_path: Path) -> None:
    from service.core.specs import ClusterStep
    from workers.methods import cluster

    (train_x, train_y), (test_x, test_y), net = small_mnist
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.zeros(2, 1, 14, 14),), buffer, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    model = onnx.load_model_from_string(buffer.getvalue())
    data = StepData(inputs={"x": train_x}, labels=train_y, evaluation=StepData(inputs={"x": test_x}, labels=test_y))
    result = cluster.apply(model, ClusterStep(bits=4, finetune_epochs=2, min_elements=64), data, StepContext(work_dir=tmp_path))
    onnx.checker.check_model(result.model, full_check=True)
    assert len(model.SerializeToString()) / len(result.model.SerializeToString()) >= 6
    assert error_rate(result.model, test_x, test_y) - error_rate(model, test_x, test_y) <= 0.01
