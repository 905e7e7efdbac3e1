"""Codebook assignment with GPTQ's error feedback (cluster `assignment: gptq`): on one weight
against nearest-centroid rounding, and the cluster step with it, grouped and not, dense and convolutional."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.core.methods.cluster import ClusterReport
from service.core.reported import STRICT
from service.core.specs import ClusterStep
from tests.builders import cnn, correlated_features, mlp, reference_outputs
from workers.clustering import error_feedback
from workers.clustering.error_feedback import assign
from workers.methods import cluster
from workers.steps import StepContext, StepData


def test_feedback_keeps_each_rows_codebook_and_cuts_the_output_error() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 160))
    x = correlated_features(rng, 2048, 160)
    books = torch.from_numpy(np.sort(rng.standard_normal((32, 16)), axis=1))  # a codebook per row
    labels, errors = assign(torch.from_numpy(w).float(), books, torch.from_numpy(2 * x.T @ x / len(x)))
    assert labels.shape == w.shape and int(labels.min()) >= 0 and int(labels.max()) < 16
    computed = books.gather(1, labels).numpy()
    relative = np.linalg.norm(x @ (computed - w).T) / np.linalg.norm(x @ w.T)
    assert errors["output_error"] == pytest.approx(relative, rel=1e-3)
    assert errors["output_error"] < 0.8 * errors["output_error_nearest"]


def test_columns_go_loudest_first_and_the_labels_come_back_in_place() -> None:
    # A diagonal Hessian spreads no error, so any visiting order must give nearest rounding in place;
    # on features whose loudness varies, loudest first (GPTQ's act-order) leaves less error than in order.
    rng = np.random.default_rng(1)
    w = torch.from_numpy(rng.standard_normal((16, 96)))
    books = torch.from_numpy(np.sort(rng.standard_normal((16, 8)), axis=1))
    loudness = rng.permutation(np.geomspace(0.05, 20, 96))
    labels, _ = assign(w, books, torch.diag(torch.from_numpy(loudness)))
    assert torch.equal(labels, torch.argmin((w[:, :, None] - books[:, None, :]).abs(), dim=2))
    x = correlated_features(rng, 4096, 96) * loudness
    h = torch.from_numpy(2 * x.T @ x / len(x))
    loudest_first = assign(w, books, h)[1]["output_error"]
    try:
        error_feedback.ACT_ORDER = False
        in_order = assign(w, books, h)[1]["output_error"]
    finally:
        error_feedback.ACT_ORDER = True
    assert loudest_first < in_order


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


@pytest.mark.parametrize("group_size", [None, 16])
def test_the_step_assigns_with_feedback_by_default_on_data_and_stays_closer(group_size: int | None, tmp_path: Path) -> None:
    model = mlp(in_features=64, hidden=128, classes=8)
    x = correlated_features(np.random.default_rng(1), 512, 64).astype(np.float32)
    data = StepData(inputs={"x": x})
    reference, out = reference_outputs(model, x), {}
    for assignment in ("nearest", None):  # None: the default, gptq on data
        step = ClusterStep(bits=3, group_size=group_size, finetune_epochs=0, assignment=assignment or "gptq")
        result = cluster.apply(model, step, data, StepContext(work_dir=tmp_path / str(assignment)))
        out[assignment] = (reference_outputs(result.model, x), result.report)
    assert _cosine(out[None][0], reference) > _cosine(out["nearest"][0], reference)
    report = ClusterReport.model_validate({"index": 0, **out[None][1]}, context=STRICT)
    assert report.assignment == "gptq" and report.reconstruction is not None
    assert report.reconstruction["gptq"] < report.reconstruction["nearest"]
    assert all(row.output_error is not None and row.output_error <= row.output_error_nearest for row in report.layers if not row.embedding)
    # The codebooks' least-squares refit after the assignment only moves the output closer (to within the fit's damping).
    assert all(row.output_error <= 1.01 * row.output_error_assigned for row in report.layers if not row.embedding)
    assert report.reconstruction["refit"] <= 1.01 * report.reconstruction["gptq"]
    assert ClusterStep(bits=4).resolved_assignment(True) == "gptq" and ClusterStep(bits=4).resolved_assignment(False) == "nearest"


def test_convolutions_take_their_centroids_with_feedback(tmp_path: Path) -> None:
    model = cnn(channels=16)
    x = np.random.default_rng(0).standard_normal((128, 1, 8, 8)).astype(np.float32)
    result = cluster.apply(model, ClusterStep(bits=3, min_elements=16, finetune_epochs=0, assignment="gptq"), StepData(inputs={"x": x}),
                           StepContext(work_dir=tmp_path))
    convs = [row for row in result.report["layers"] if len(row["shape"]) == 4]
    assert len(convs) == 2 and all(row["output_error"] <= row["output_error_nearest"] for row in convs)
    assert reference_outputs(result.model, x[:3]).shape == (3, 10)


def test_gptq_assignment_needs_a_dataset(tmp_path: Path) -> None:
    from service.core.errors import CompressionFailed

    with pytest.raises(CompressionFailed) as refused:
        cluster.apply(mlp(), ClusterStep(bits=4, assignment="gptq"), StepData(inputs={}), StepContext(work_dir=tmp_path))
    assert refused.value.code == "dataset_required"
