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


ROUNDS = 3  # rounds in which a layer's mask is chosen (PruneStep.mask_rounds' default; see prune_and_refit)


@torch.no_grad()
def prune_and_refit(target: torch.Tensor, h: torch.Tensor, columns: int, amount: float, pruned: torch.Tensor,
                    rows: torch.Tensor | None = None, rounds: int = ROUNDS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's weights pruned to `amount` and the kept ones re-solved, in `rounds` rounds: each round
    SparseGPT takes the mask 1/rounds of the way further (from the share `pruned` already holds) on the
    weights the last round re-solved, and the kept weights are then re-solved exactly for it
    (masked_refit). Choosing the whole mask in one pass ranks each weight against weights that have not
    yet made up for the others going; in rounds, later choices see a layer that already did (Boza 2024's
    gradual mask; on all-MiniLM-L6-v2 at 50% one-shot, three rounds with the bias below: held-out cosine
    0.9677 -> 0.9715).

    `target` [rows, columns (+ 1)] is the dense weight, with the bias as a last column when `h` (the
    statistics with `intercept`) has one more input than `columns`: the bias is never pruned and is
    re-solved with the kept weights, as a least-squares fit with an intercept is. Returns the final
    weight (and bias), the last round's SparseGPT sweep before its re-solve, and the mask (of the
    first `columns` columns)."""
    extra = target.shape[1] - columns
    start = float(pruned.double().mean())
    current, mask = target[:, :columns], pruned
    solved = swept = target
    for k in range(1, rounds + 1):
        sweep, mask = _prune(current, h[:columns, :columns], start + (amount - start) * k / rounds, mask, rows)
        mask = mask | pruned  # a weight already zero stays zero, whatever this round's share
        swept = torch.cat([sweep.masked_fill(mask, 0), target[:, columns:]], 1)
        kept = torch.cat([~mask, torch.ones(mask.shape[0], extra, dtype=torch.bool)], 1)
        solved = refit_kept(swept, target, kept, h, DAMP)
        current = solved[:, :columns]
    return solved, swept, mask


@torch.no_grad()
def prune_layers(module: nn.Module, layers: dict[str, nn.Module], amounts: dict[str, float], batches: Callable[[], Iterable[Batch]],
                 progress: Callable[[int, int, str], None], reference: nn.Module | None = None,
                 reference_layers: dict[str, nn.Module] | None = None,
                 sensitivity: dict[str, Sensitivity] | None = None, rounds: int = ROUNDS) -> dict[str, dict[str, float]]:
    """Each supported layer pruned in turn (in the order of `layers`, the graph's), its Hessian taken
    on inputs through the layers already pruned; returns each layer's output error before/after the
    update. Already-zero weights stay zero (a later round of an iterative schedule). With a
    `reference` (the model before pruning, its layers by the same names), the errors are measured
    against the reference layer's output on the reference's own inputs. The mask is chosen in
    `rounds` and the kept weights, with the layer's bias, re-solved exactly after each
    (prune_and_refit); the errors give the mask alone, the last SparseGPT sweep and the final one,
    each on the layer's whole output (bias included).

    Each layer reproduces its own dense output on the inputs it now gets (the paper's sequential
    pass), not the reference's output: that generalises better (hessian.LayerStatistics).

    With `sensitivity` (workers.output_sensitivity, measured on the same batches in the same order),
    each layer's positions and output rows are weighed by how much the model's output depends on
    them, and the errors returned are weighed the same way."""
    module.eval()
    errors = {}
    for index, (name, layer) in enumerate(layers.items()):
        progress(index, len(layers), name)
        weight, bias = layer.weight, getattr(layer, "bias", None)
        shape = weight.shape
        flat = weight.reshape(shape[0], -1)
        weights = (sensitivity or {}).get(name)
        stats = statistics(module, layer, batches(), reference, (reference_layers or {}).get(name), weights.positions if weights else None,
                           intercept=bias is not None)
        original = flat.double() if bias is None else torch.cat([flat.double(), bias.double()[:, None]], 1)
        new, swept, mask = prune_and_refit(original, stats.h, flat.shape[1], amounts[name], flat == 0,
                                           weights.channels if weights else None, rounds)
        masked = torch.cat([original[:, :flat.shape[1]].masked_fill(mask, 0), original[:, flat.shape[1]:]], 1)
        errors[name] = {"output_error_masked": round(error_to_reference(masked, original, stats), 6),
                        "output_error_sparsegpt": round(error_to_reference(swept, original, stats), 6),
                        "output_error": round(error_to_reference(new, original, stats), 6)}
        weight.copy_(new[:, :flat.shape[1]].to(weight.dtype).reshape(shape))
        if bias is not None:
            bias.copy_(new[:, -1].to(bias.dtype))
    return errors
