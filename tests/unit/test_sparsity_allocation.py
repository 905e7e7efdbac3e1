"""SparseGPT's two additions: the kept weights re-solved for the mask (masked_refit, against numpy's
per-row least squares) and each layer's sparsity chosen from its measured sensitivity under the
step's global budget (allocation, on made-up curves and through the prune step)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.core.methods.prune import PruneReport
from service.core.reported import STRICT
from service.core.specs import PruneStep
from tests.builders import correlated_features, mlp
from workers.hessian import DAMP, output_error
from workers.methods import prune
from workers.pruning import allocation
from workers.pruning.masked_refit import refit_kept
from workers.pruning.sparsegpt import _prune
from workers.steps import StepContext, StepData


def test_the_kept_weights_are_the_least_squares_solution_for_the_mask() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 96))
    x = correlated_features(rng, 1024, 96)
    h = torch.from_numpy(2 * x.T @ x / len(x))
    swept, mask = _prune(torch.from_numpy(w), h, 0.5, None)
    refit = refit_kept(swept, torch.from_numpy(w), ~mask, h, DAMP).numpy()
    assert (refit[mask.numpy()] == 0).all()
    damped = h.numpy() + DAMP * np.mean(np.diag(h.numpy())) * np.eye(96)
    for r in range(w.shape[0]):
        keep = ~mask[r].numpy()
        expected = np.linalg.solve(damped[np.ix_(keep, keep)], (damped @ w[r])[keep])
        np.testing.assert_allclose(refit[r, keep], expected, rtol=1e-5, atol=1e-7)
    # Never worse than SparseGPT's own update for the same mask, here clearly better.
    assert output_error(torch.from_numpy(refit), torch.from_numpy(w), h) < 0.95 * output_error(swept, torch.from_numpy(w), h)


def test_the_budget_goes_where_pruning_costs_least_and_holds_overall() -> None:
    # Layer "cheap" loses 10x less than "dear" at every sparsity; "dear" is the same size.
    def points(scale: float) -> dict[float, float]:
        return {s: scale * s ** 3 for s in allocation.measured_points(0.5)}

    curves = {"cheap": points(0.001), "dear": points(0.01), "small": points(0.01)}
    sizes = {"cheap": 1000, "dear": 1000, "small": 100}
    targets = {n: 0.5 for n in curves}
    chosen = allocation.allocate(curves, sizes, targets)
    assert chosen["cheap"] > 0.5 > chosen["dear"]
    assert all(abs(a - 0.5) <= allocation.REACH + 1e-9 for a in chosen.values())
    overall = sum(sizes[n] * chosen[n] for n in chosen) / sum(sizes.values())
    assert 0.5 <= overall <= 0.5 + 0.01
    assert allocation.predicted_loss(curves, chosen) < allocation.predicted_loss(curves, targets)
    # A small amount: the range reaches down to (not below) the smallest step, and the budget still holds.
    low = {n: {s: 0.001 * s ** 2 for s in allocation.measured_points(0.1)} for n in ("a", "b")}
    small = allocation.allocate(low, {"a": 10, "b": 10}, {"a": 0.1, "b": 0.1})
    assert all(allocation.STEP <= a <= 0.35 for a in small.values()) and sum(small.values()) / 2 >= 0.1


def test_a_global_sparsegpt_step_allocates_by_layer_and_keeps_the_amount_overall(tmp_path: Path) -> None:
    model = mlp(in_features=64, hidden=128, classes=8)
    x = correlated_features(np.random.default_rng(1), 512, 64).astype(np.float32)
    step = PruneStep(kind="unstructured", amount=0.6, importance="sparsegpt", finetune_epochs=0, prune_output_layer=True)
    result = prune.apply(model, step, StepData(inputs={"x": x}), StepContext(work_dir=tmp_path))
    report = PruneReport.model_validate({"index": 0, **result.report}, context=STRICT)
    assert report.allocation is not None and len(report.allocation.layers) == 3
    amounts = {row.layer: row.amount for row in report.allocation.layers}
    assert len(set(amounts.values())) > 1  # layers differ in what pruning them costs
    assert report.allocation.predicted_loss_allocated <= report.allocation.predicted_loss_uniform
    sizes = {row.layer: int(np.prod(row.shape_before)) for row in report.layers}
    assert sum(sizes[n] * a for n, a in amounts.items()) / sum(sizes[n] for n in amounts) == pytest.approx(0.6, abs=0.01)
    assert report.achieved == pytest.approx(0.6, abs=0.02)
    for row in report.layers:
        assert row.sparsity == pytest.approx(amounts[row.layer], abs=0.02)
        assert row.output_error <= row.output_error_sparsegpt + 1e-9
    # scope layer keeps one amount everywhere, with nothing measured.
    layer_scope = prune.apply(model, step.model_copy(update={"scope": "layer"}), StepData(inputs={"x": x}), StepContext(work_dir=tmp_path / "layer"))
    assert layer_scope.report.get("allocation") is None


def test_layers_too_large_for_direct_solves_still_move_towards_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.pruning import masked_refit

    rng = np.random.default_rng(2)
    w = torch.from_numpy(rng.standard_normal((12, 96)))
    x = correlated_features(rng, 1024, 96)
    h = torch.from_numpy(2 * x.T @ x / len(x))
    swept, mask = _prune(w, h, 0.5, None)
    exact = refit_kept(swept, w, ~mask, h, DAMP)
    monkeypatch.setattr(masked_refit, "DIRECT_FLOPS", 0)  # conjugate gradients instead
    iterated = refit_kept(swept, w, ~mask, h, DAMP)
    assert (iterated[mask] == 0).all()
    errors = [output_error(c, w, h) for c in (swept, iterated, exact)]
    # Both solve the same damped system; the error is taken without the damping, so conjugate gradients
    # stopped a hair short can land a few parts in a million either side of the exact solve.
    assert errors[1] < errors[0] and errors[2] < errors[0] and errors[1] == pytest.approx(errors[2], rel=0.01)


def test_a_layer_whose_inputs_are_all_zero_is_refitted_without_error() -> None:
    w = torch.from_numpy(np.random.default_rng(3).standard_normal((4, 8)))
    h = torch.zeros(8, 8, dtype=torch.float64)  # the data never reached these inputs
    kept = torch.ones(4, 8, dtype=torch.bool)
    kept[:, ::2] = False
    refit = refit_kept(w * kept, w, kept, h, DAMP)
    assert torch.isfinite(refit).all() and (refit[~kept] == 0).all()
