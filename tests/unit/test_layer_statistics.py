"""Layer-wise reconstruction's statistics against the original model (hessian.statistics): a layer
whose input went through layers already pruned or clustered has its errors measured against what the
original layer computed on the original input; and the codebook refit after gptq assignment
(error_feedback.refit_codebooks)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from workers.clustering.error_feedback import assign, refit_codebooks
from workers.hessian import LayerStatistics, error_to_reference, statistics


def _stats(x: np.ndarray, x0: np.ndarray) -> LayerStatistics:
    n = len(x)
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    return LayerStatistics(t(2 * x.T @ x / n), t(2 * x0.T @ x / n), t(2 * x0.T @ x0 / n))


def _inputs(seed: int = 0, features: int = 96, samples: int = 3000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((samples, features // 4)) @ rng.standard_normal((features // 4, features)) + 0.1 * rng.standard_normal((samples, features))
    drift = np.eye(features) + 0.05 * rng.standard_normal((features, features))  # what earlier compressed layers did to the input
    return x0 @ drift, x0, rng.standard_normal((24, features))


def test_errors_are_measured_against_the_original_layer_on_its_own_input() -> None:
    x, x0, w = _inputs()
    candidate = w + 0.1 * np.random.default_rng(1).standard_normal(w.shape)
    measured = error_to_reference(torch.from_numpy(candidate), torch.from_numpy(w), _stats(x, x0))
    assert measured == pytest.approx(np.linalg.norm(x @ candidate.T - x0 @ w.T) / np.linalg.norm(x0 @ w.T), rel=1e-6)


def test_statistics_read_both_modules_on_the_same_positions() -> None:
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    changed = copy.deepcopy(reference)
    with torch.no_grad():
        changed[0].weight.mul_(0.9)
    batch = torch.randn(5, 7, 8, dtype=torch.float64)
    real = torch.ones(5, 7, dtype=torch.bool)
    real[:, 5:] = False  # padded positions: left out of every statistic
    stats = statistics(changed, changed[2], [((batch,), real)], reference, reference[2])
    x, x0 = changed[1](changed[0](batch))[real], reference[1](reference[0](batch))[real]
    n = len(x)
    assert stats.cross is not None and stats.h_reference is not None
    assert torch.allclose(stats.h, 2 * x.T @ x / n) and torch.allclose(stats.cross, 2 * x0.T @ x / n)
    assert torch.allclose(stats.h_reference, 2 * x0.T @ x0 / n)


def test_the_codebook_refit_solves_each_groups_least_squares_and_keeps_unused_centroids() -> None:
    x, _, w = _inputs(2, features=64)
    h = torch.from_numpy(2 * x.T @ x / len(x))
    rng = np.random.default_rng(3)
    books = torch.from_numpy(np.sort(rng.standard_normal((2, 8)), axis=1))
    books[1, 7] = 50.0  # far from every weight: nobody takes it
    group = torch.arange(24) // 12
    weight = torch.from_numpy(w)
    labels, _ = assign(weight, books[group], h)
    refitted = refit_codebooks(weight, labels, books, group, h)
    assert refitted[1, 7] == pytest.approx(50.0)
    # Group 0 against numpy: the centroids minimising the output error of its rows, assignments fixed.
    design = np.concatenate([x @ np.eye(8)[labels[r].numpy()] for r in range(12)])  # [12 * samples, 8]
    expected = np.linalg.lstsq(design, np.concatenate([x @ w[r] for r in range(12)]), rcond=None)[0]
    assert refitted[0].numpy() == pytest.approx(expected, rel=1e-5, abs=1e-8)
    before = error_to_reference(books[group].gather(1, labels), weight, LayerStatistics(h))
    after = error_to_reference(refitted[group].gather(1, labels), weight, LayerStatistics(h))
    assert after < before
