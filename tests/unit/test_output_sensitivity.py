"""Output-aware layer objectives (workers/output_sensitivity.py): the probes estimate the output's
Gauss-Newton diagonal at a layer, padded positions weigh nothing, a weighted SparseGPT fit keeps
what the output reads, and the prune step reports the weights it used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.core.methods.prune import PruneReport
from service.core.reported import STRICT
from service.core.specs import PruneStep
from tests.builders import correlated_features, mlp
from workers import output_sensitivity
from workers.methods import prune
from workers.pruning import sparsegpt
from workers.steps import StepContext, StepData


class _Pooled(nn.Module):
    """Tokens through one linear layer, summed with a weight per position (position 0 counts
    `first` times the others), then normalised: a sentence embedding whose first token dominates."""

    def __init__(self, width: int, positions: int, first: float, squash: bool = True) -> None:
        super().__init__()
        self.squash = squash
        torch.manual_seed(0)
        self.layer = nn.Linear(width, width)
        self.weights = torch.ones(positions)
        self.weights[0] = first

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.layer(x) * (self.weights * mask)[..., None]
        return F.normalize((torch.tanh(out) if self.squash else out).sum(1), dim=-1)


def _exact(module: _Pooled, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diag(J^T J) at the layer's output, J = d(normalised output)/d(layer output), by full Jacobians."""
    o = module.layer(x)

    def head(o_one: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return F.normalize(torch.tanh(o_one * (module.weights * m)[..., None]).sum(0), dim=-1)

    squared = torch.stack([torch.autograd.functional.jacobian(lambda t, m=mask[b]: head(t, m), o[b].detach()) ** 2 for b in range(len(x))])  # [B, out, T, C]
    return squared.sum((1, 3)), squared.sum((0, 1, 2))  # per position [B, T], per channel [C]


def _batches(x: torch.Tensor, mask: torch.Tensor, size: int) -> list:
    return [((x[i:i + size], mask[i:i + size]), mask[i:i + size]) for i in range(0, len(x), size)]


def test_the_probes_estimate_the_outputs_gauss_newton_diagonal_and_padding_weighs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    module = _Pooled(width=6, positions=5, first=3.0)
    x = torch.randn(12, 5, 6, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(12, 5)
    mask[::3, 3:] = 0  # padded positions
    monkeypatch.setattr(output_sensitivity, "POWER", 1.0)  # untempered: the estimate itself
    found = output_sensitivity.measure(module, {"layer": module.layer}, _batches(x, mask, 4), "features", probes=3000)["layer"]
    positions, channels = _exact(module, x, mask)
    estimated = torch.cat(found.positions).double()
    expected = positions / positions[mask.bool()].mean()
    real = mask.bool()
    assert torch.allclose(estimated[real], expected[real].double(), rtol=0.15, atol=0.02)
    assert torch.allclose(found.channels.double(), (channels / channels.mean()).double(), rtol=0.1)
    # The output never reads a padded position: it sits at the floor.
    assert torch.allclose(estimated[~real], torch.full_like(estimated[~real], output_sensitivity.FLOOR))
    # Position 0 counts three times the others in the output, so it weighs more (less than nine times:
    # its larger values saturate the tanh).
    assert float(estimated[:, 0].mean() / estimated[:, 1:3].mean()) > 2
    assert found.spread() > 2


def test_a_fit_weighted_by_the_output_keeps_what_the_output_reads() -> None:
    # Position 0 dominates the output, and its inputs vary where the other positions' hardly do:
    # fitting every position alike, SparseGPT finds the weights position 0 needs cheap (the Hessian
    # is small there) and prunes them; weighted by the output, it keeps them.
    width, positions = 32, 8
    module = _Pooled(width, positions, first=10.0, squash=False)
    generator = torch.Generator().manual_seed(3)

    def inputs(samples: int) -> torch.Tensor:
        x = torch.randn(samples, positions, width, generator=generator)
        x[:, 1:, width // 2:] *= 0.05
        x[:, 0, : width // 2] *= 0.05
        return x

    train, held_out = inputs(256), inputs(256)
    ones = torch.ones(256, positions)
    batches = _batches(train, ones, 64)
    dense = module.layer.weight.detach().clone()
    with torch.no_grad():
        reference = module(held_out, ones)
    cosine = {}
    for weighted in (False, True):
        module.layer.weight.data.copy_(dense)
        found = output_sensitivity.measure(module, {"layer": module.layer}, batches, "features") if weighted else None
        sparsegpt.prune_layers(module, {"layer": module.layer}, {"layer": 0.5}, lambda: batches, lambda *a: None, sensitivity=found)
        assert float((module.layer.weight == 0).double().mean()) == pytest.approx(0.5, abs=0.01)
        with torch.no_grad():
            cosine[weighted] = float(F.cosine_similarity(module(held_out, ones), reference).mean())
    assert 1 - cosine[True] < 0.5 * (1 - cosine[False])


def test_the_prune_step_reports_the_weights_its_fit_used_and_can_fit_every_position_alike(tmp_path: Path) -> None:
    model = mlp(in_features=16, hidden=32, classes=4)
    x = correlated_features(np.random.default_rng(2), 256, 16).astype(np.float32)
    reports = {}
    for weighted in (True, False):
        step = PruneStep(kind="unstructured", amount=0.5, importance="sparsegpt", finetune_epochs=0, output_weighted=weighted)
        result = prune.apply(model, step, StepData(inputs={"x": x}), StepContext(work_dir=tmp_path / str(weighted)))
        reports[weighted] = PruneReport.model_validate({"index": 0, **result.report}, context=STRICT)
    found = reports[True].output_sensitivity
    assert found is not None and found.probes == output_sensitivity.PROBES and found.power == output_sensitivity.POWER
    # Every layer SparseGPT pruned was weighed (the classifier's output through its class probabilities).
    assert {row.layer for row in found.layers} == {row.layer for row in reports[True].layers if row.sparsity > 0}
    assert all(row.position_spread >= 1 and row.channel_spread >= 1 for row in found.layers)
    assert "probabilities" in found.how
    assert reports[False].output_sensitivity is None
    assert reports[True].achieved == pytest.approx(0.5, abs=0.02) and reports[False].achieved == pytest.approx(0.5, abs=0.02)


def test_a_classifier_sure_enough_to_underflow_a_probability_still_gets_finite_weights() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    with torch.no_grad():
        module[1].weight.mul_(1000)  # logits hundreds apart: float32 softmax gives exact zeros
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    assert bool((torch.softmax(module(x), -1) == 0).any())
    found = output_sensitivity.measure(module, {"first": module[0], "second": module[1]}, [((x,), None)], "classifier", probes=4)
    assert set(found) == {"first", "second"}
    assert all(bool(torch.isfinite(t).all()) for s in found.values() for t in [*s.positions, s.channels])


def test_an_output_torch_cannot_differentiate_leaves_the_fits_unweighted_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Stands for a graph op without a torch derivative (autograd raises RuntimeError): the job still prunes.
    def no_derivative(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("derivative for aten::some_op is not implemented\nmore")

    monkeypatch.setattr(output_sensitivity, "measure", no_derivative)
    x = correlated_features(np.random.default_rng(2), 128, 16).astype(np.float32)
    step = PruneStep(kind="unstructured", amount=0.5, importance="sparsegpt", finetune_epochs=0)
    result = prune.apply(mlp(in_features=16, hidden=32, classes=4), step, StepData(inputs={"x": x}), StepContext(work_dir=tmp_path))
    report = PruneReport.model_validate({"index": 0, **result.report}, context=STRICT)
    assert report.output_sensitivity is not None and report.output_sensitivity.layers == []
    assert report.output_sensitivity.how.startswith("not measured") and "aten::some_op" in report.output_sensitivity.how
    assert report.achieved == pytest.approx(0.5, abs=0.02)
