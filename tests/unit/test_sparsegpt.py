"""SparseGPT pruning (importance sparsegpt): the second-order update on one weight against numpy's own
arithmetic, and the prune step with it on a dense network and a convolutional one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.core.methods.prune import PruneReport
from service.core.reported import STRICT
from service.core.specs import PruneStep
from tests.builders import cnn, correlated_features, mlp, reference_outputs
from workers.methods import prune
from workers.pruning.sparsegpt import BLOCK, prune_weight
from workers.steps import StepContext, StepData


def test_the_update_keeps_the_amount_per_block_and_cuts_the_output_error_of_the_same_mask() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 2 * BLOCK))
    x = correlated_features(rng, 2048, 2 * BLOCK)
    h = torch.from_numpy(2 * x.T @ x / len(x))
    already = torch.zeros(w.shape, dtype=torch.bool)
    already[:, :5] = True  # a previous round's zeros
    w[:, :5] = 0
    new, errors = prune_weight(torch.from_numpy(w).float(), h, 0.5, pruned=already)
    new = new.double().numpy()
    for start in range(0, w.shape[1], BLOCK):
        assert (new[:, start:start + BLOCK] == 0).mean() == pytest.approx(0.5, abs=1 / (24 * BLOCK))
    assert (new[:, :5] == 0).all()
    # The reported errors are the layer's relative output error on the data, as numpy computes it.
    relative = np.linalg.norm(x @ (new - w).T) / np.linalg.norm(x @ w.T)
    assert errors["output_error"] == pytest.approx(relative, rel=1e-3)
    masked = np.where(new == 0, 0.0, w)
    assert errors["output_error_masked"] == pytest.approx(np.linalg.norm(x @ (masked - w).T) / np.linalg.norm(x @ w.T), rel=1e-3)
    assert errors["output_error"] < 0.7 * errors["output_error_masked"]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def test_the_step_reconstructs_a_dense_network_better_than_wanda_and_reports_each_layer(tmp_path: Path) -> None:
    model = mlp(in_features=64, hidden=128, classes=8)
    rng = np.random.default_rng(1)
    x = correlated_features(rng, 512, 64).astype(np.float32)
    data = StepData(inputs={"x": x})
    outputs, reports = {}, {}
    for importance in ("wanda", "sparsegpt"):
        step = PruneStep(kind="unstructured", amount=0.6, importance=importance, finetune_epochs=0, scope="layer")
        result = prune.apply(model, step, data, StepContext(work_dir=tmp_path / importance))
        outputs[importance], reports[importance] = reference_outputs(result.model, x), result.report
    reference = reference_outputs(model, x)
    assert _cosine(outputs["sparsegpt"], reference) > _cosine(outputs["wanda"], reference)
    report = PruneReport.model_validate({"index": 0, **reports["sparsegpt"]}, context=STRICT)  # every key declared
    assert report.achieved == pytest.approx(0.6, abs=0.02)
    assert report.reconstruction is not None and report.reconstruction["updated"] < report.reconstruction["masked"]
    pruned = [row for row in report.layers if row.sparsity > 0]
    assert pruned and all(row.output_error is not None and row.output_error < row.output_error_masked for row in pruned)


def test_convolutions_are_reconstructed_from_their_unfolded_patches(tmp_path: Path) -> None:
    model = cnn(channels=16)
    x = np.random.default_rng(0).standard_normal((128, 1, 8, 8)).astype(np.float32)
    step = PruneStep(kind="unstructured", amount=0.5, importance="sparsegpt", finetune_epochs=0, scope="layer")
    result = prune.apply(model, step, StepData(inputs={"x": x}), StepContext(work_dir=tmp_path))
    rows = {row["layer"]: row for row in result.report["layers"]}
    convs = [row for name, row in rows.items() if len(row["shape_before"]) == 4]
    assert len(convs) == 2
    for row in convs:
        assert row["sparsity"] == pytest.approx(0.5, abs=0.05) and row["output_error"] <= row["output_error_masked"]
    assert reference_outputs(result.model, x[:3]).shape == (3, 10)


def test_sparsegpt_needs_unstructured_pruning_and_data() -> None:
    with pytest.raises(ValueError, match="sparsegpt"):
        PruneStep(kind="structured", importance="sparsegpt")
    assert PruneStep(importance="sparsegpt").needs_dataset()


def test_the_mask_chosen_in_rounds_keeps_the_amount_and_the_zeros_and_re_solves_the_bias() -> None:
    """prune_and_refit: in three rounds the layer keeps the amount per block and a previous round's
    zeros (even where the first round's share is below what is already zero), its bias is solved with
    the kept weights (an input with a large mean: the fit's error has no mean left over), and on the
    calibration data the rounds end no worse than one pass."""
    from workers.hessian import output_error
    from workers.pruning.sparsegpt import prune_and_refit

    rng = np.random.default_rng(2)
    x = correlated_features(rng, 4096, 2 * BLOCK) + 3.0  # inputs far from zero mean: the bias has work to do
    augmented = np.concatenate([x, np.ones((len(x), 1))], 1)
    h = torch.from_numpy(2 * augmented.T @ augmented / len(x))
    w, b = rng.standard_normal((16, 2 * BLOCK)), rng.standard_normal(16)
    w[:, :BLOCK // 2] = 0  # a previous round's zeros: more than the first of three rounds' share of 0.6 in that block
    target = torch.from_numpy(np.concatenate([w, b[:, None]], 1))
    already = torch.from_numpy(w == 0)
    errors = {}
    for rounds in (1, 3):
        new, swept, mask = prune_and_refit(target, h, 2 * BLOCK, 0.6, already, rounds=rounds)
        weight = new[:, :-1].numpy()
        for start in range(0, w.shape[1], BLOCK):
            assert (weight[:, start:start + BLOCK] == 0).mean() == pytest.approx(0.6, abs=1 / (16 * BLOCK))
        assert (weight[already.numpy()] == 0).all() and bool(mask[already].all())
        assert new[:, -1].ne(target[:, -1]).all()  # the bias moved with the fit
        errors[rounds] = output_error(new, target, h)
        if rounds == 1:  # one mask for both: solved with the weights, the bias lowers the error beyond what they reach alone
            alone, _, _ = prune_and_refit(target[:, :-1], h[:-1, :-1], 2 * BLOCK, 0.6, already, rounds=1)
            assert errors[1] < output_error(torch.cat([alone, target[:, -1:]], 1), target, h)
        assert errors[rounds] <= output_error(swept, target, h) + 1e-12  # the re-solve never adds error to its sweep
    assert errors[3] < 0.9 * errors[1]  # measured 0.0116 against 0.0155
