"""SparseGPT (Frantar & Alistarh 2023): unstructured pruning that reconstructs what it removes. Each
layer's weights are visited column by column; a pruned weight's error is spread over the columns not
yet visited through the inverse of the layer's input Hessian (X^T X on the calibration data), so the
layer's output on that data changes as little as a second-order (OBS) model can make it. The mask is
chosen as it goes, by w^2 / [H^-1]_jj^2 within blocks of 128 columns.

Layers are pruned in the order the data reaches them, each on inputs that went through the layers
already pruned (the paper's sequential pass), so later layers correct what earlier ones lost.

Written here because no maintained library does this on an arbitrary torch module: the paper's
code and llm-compressor / torch-pruning's variants walk a transformer's own block structure, and
ours is the ONNX graph converted to torch (workers/trainable), any architecture. The column loop is
the reference algorithm's (IST-DASLab/sparsegpt, sparsegpt.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from workers.hessian import DAMP, Batch, error_to_reference, inverse_factor, output_error, statistics
from workers.output_sensitivity import Sensitivity
from workers.pruning.masked_refit import refit_kept

BLOCK = 128  # columns per lazy update and mask selection, as in the paper (32 and per-row choice measured the same on MiniLM)


@torch.no_grad()
def prune_weight(weight: torch.Tensor, h: torch.Tensor, amount: float, pruned: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """`weight` [out, in] with `amount` of each block's weights set to zero and the rest updated to
    make up for them; `pruned` marks weights already zero that must stay so; `rows` weighs each
    output row's error (workers.output_sensitivity's channels). Returns the new weight and the
    layer's output error on the calibration data, relative, before and after the update."""
    w, mask = _prune(weight.double(), h, amount, pruned, rows)
    original = weight.double()
    return w.to(weight.dtype), {"output_error_masked": round(output_error(original.masked_fill(mask, 0), original, h), 6),
                                "output_error": round(output_error(w, original, h), 6)}


@torch.no_grad()
def _prune(weight: torch.Tensor, h: torch.Tensor, amount: float, pruned: torch.Tensor | None,
           rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's column loop on a float64 `weight`: the pruned and updated weight, and its mask. A
    weight's cost of going, w^2 / [H^-1]_jj^2, is the error it adds to its row's output; with `rows`
    that error is weighed by how much the row's output matters downstream, so the mask (chosen over
    all rows of a block together) keeps more of the rows that matter more."""
    w = weight.clone()
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv = inverse_factor(h)
    columns = w.shape[1]
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, columns, BLOCK):
        i2 = min(i1 + BLOCK, columns)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        score = w1 ** 2 / torch.diag(hinv1).reshape(1, -1) ** 2
        if rows is not None:
            score = score * rows.to(score.dtype).reshape(-1, 1)
        if pruned is not None:
            score[pruned[:, i1:i2]] = -1.0  # already pruned: first in line
        mask1 = torch.zeros_like(score, dtype=torch.bool)
        k = int(round(amount * score.numel()))
        if k > 0:
            mask1.view(-1)[torch.argsort(score.flatten())[:k]] = True
        for i in range(i2 - i1):
            col, d = w1[:, i], hinv1[i, i]
            q = col.clone()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            e = (col - q) / d
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        mask[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w, mask


@torch.no_grad()
def prune_layers(module: nn.Module, layers: dict[str, nn.Module], amounts: dict[str, float], batches: Callable[[], Iterable[Batch]],
                 progress: Callable[[int, int, str], None], reference: nn.Module | None = None,
                 reference_layers: dict[str, nn.Module] | None = None,
                 sensitivity: dict[str, Sensitivity] | None = None) -> dict[str, dict[str, float]]:
    """Each supported layer pruned in turn (in the order of `layers`, the graph's), its Hessian taken
    on inputs through the layers already pruned; returns each layer's output error before/after the
    update. Already-zero weights stay zero (a later round of an iterative schedule). With a
    `reference` (the model before pruning, its layers by the same names), the errors are measured
    against the reference layer's output on the reference's own inputs. Once SparseGPT has chosen a
    layer's mask, its kept weights are re-solved exactly for that mask (masked_refit: the errors give
    SparseGPT's and the final one).

    Each layer reproduces its own dense output on the inputs it now gets (the paper's sequential
    pass), not the reference's output: that generalises better (hessian.LayerStatistics).

    With `sensitivity` (workers.output_sensitivity, measured on the same batches in the same order),
    each layer's positions and output rows are weighed by how much the model's output depends on
    them, and the errors returned are weighed the same way."""
    module.eval()
    errors = {}
    for index, (name, layer) in enumerate(layers.items()):
        progress(index, len(layers), name)
        weight = layer.weight
        shape = weight.shape
        flat = weight.reshape(shape[0], -1)
        weights = (sensitivity or {}).get(name)
        stats = statistics(module, layer, batches(), reference, (reference_layers or {}).get(name), weights.positions if weights else None)
        target = flat.double()
        swept, mask = _prune(target, stats.h, amounts[name], pruned=flat == 0, rows=weights.channels if weights else None)
        new = refit_kept(swept, target, ~mask, stats.h, DAMP)
        original = flat.double()
        errors[name] = {"output_error_masked": round(error_to_reference(original.masked_fill(mask, 0), original, stats), 6),
                        "output_error_sparsegpt": round(error_to_reference(swept, original, stats), 6),
                        "output_error": round(error_to_reference(new, original, stats), 6)}
        weight.copy_(new.to(weight.dtype).reshape(shape))
    return errors
