"""A layer's input Hessian (X^T X on the calibration data) on a torch module, and the inverse factor
the reconstruction methods walk: SparseGPT's pruning (workers/pruning/sparsegpt.py) and GPTQ-style
codebook assignment (workers/clustering/error_feedback.py). Taken one layer at a time, with the
forward pass stopped at the layer, so memory is one layer's Hessian and each layer sees its inputs
through the layers already changed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DAMP = 0.01  # share of the Hessian's mean diagonal added to it (the papers' percdamp; 0.1 and 1.0 measured worse on MiniLM)


# A calibration batch: the module's inputs, and the token mask of its positions (None: every position counts).
Batch = tuple[tuple[torch.Tensor, ...], "torch.Tensor | None"]


class Captured(Exception):
    """Raised by the hook once the layer's input is captured: the rest of the forward pass is not needed."""


def supported(layer: nn.Module) -> bool:
    """Linear layers and ordinary convolutions (their input unfolded into patches); grouped and
    depthwise convolutions fall back to magnitude within each row."""
    if isinstance(layer, nn.Linear):
        return True
    return isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)


def input_rows(layer: nn.Module, x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """The layer's input as rows of what each weight row multiplies: [positions, in_features]. With a
    token mask `real` [batch, positions], padded positions are left out: nobody reads their outputs,
    and their activations would pull the reconstruction towards them."""
    if isinstance(layer, nn.Linear):
        if real is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(real.shape):
            return x[real.bool()]
        return x.reshape(-1, x.shape[-1])
    patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)  # [B, C*kh*kw, L]
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def at_layer(module: nn.Module, layer: nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """`layer`'s input and output on one batch of `module`'s inputs, the forward stopped there."""
    found: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(_module: nn.Module, args: tuple, output: Any) -> None:
        found.append((args[0].detach(), output.detach()))
        raise Captured

    handle = layer.register_forward_hook(record)
    try:
        module(*batch)
    except Captured:
        pass
    finally:
        handle.remove()
    if not found:
        raise ValueError("the calibration data never reached the layer")
    return found[0]


@torch.no_grad()
def hessian(module: nn.Module, layer: nn.Module, batches: Iterable[Batch]) -> torch.Tensor:
    """2 X^T X / positions of the layer's input over the batches (float64), the forward stopped at the layer."""
    return statistics(module, layer, batches).h


@dataclass
class LayerStatistics:
    """What a layer-wise reconstruction needs of its calibration inputs, each 2 A^T B / positions
    (float64) over rows of what a weight row multiplies: `h` of the changed module's own input X;
    with a reference (the model before the step), `cross` of the reference's input X0 against X and
    `h_reference` of X0 alone, so that errors are measured against the original's output.

    The reconstructions fit each layer to its own dense output on X, not to the original's output
    W X0 (GPTAQ's asymmetric fit, argmin |W* X - W X0|, which the methods used until 2026-12-07): on
    all-MiniLM-L6-v2 with 300 calibration sentences the asymmetric fit made SparseGPT at 50% 0.9947
    cosine on those sentences but 0.9570 on held-out ones (0.9777 and 0.9616 without it), and
    clusters at 3.75 bits a weight 0.9670 held out (0.9756 without). Undoing the earlier layers'
    errors from a few hundred sentences fits those sentences, not the model."""

    h: torch.Tensor
    cross: torch.Tensor | None = None
    h_reference: torch.Tensor | None = None


@torch.no_grad()
def statistics(module: nn.Module, layer: nn.Module, batches: Iterable[Batch], reference: nn.Module | None = None,
               reference_layer: nn.Module | None = None, weights: Sequence[torch.Tensor] | None = None,
               intercept: bool = False) -> LayerStatistics:
    """The layer's input statistics over the batches, the forward stopped at the layer; with a
    `reference` module, its `reference_layer` is read on the same batches (same positions) too.
    `weights` (workers.output_sensitivity: one tensor per batch, in the batches' order, over the
    leading dimensions of the layer's output) weigh each position's row by how much the model's
    output depends on it. With `intercept`, every row gains a last input of 1: the statistics of
    [W | b] acting on [x; 1], so that a fit can solve for the bias with the weights."""
    h = cross = h_ref = None
    positions = 0
    for index, (batch, real) in enumerate(batches):
        scale = _row_scale(weights[index] if weights is not None and index < len(weights) else None, real)
        rows = _scaled(_ones_appended(input_rows(layer, at_layer(module, layer, batch)[0].double(), real), intercept), scale)
        h = _add(h, rows.T @ rows)
        if reference is not None and reference_layer is not None:
            rows_ref = _scaled(_ones_appended(input_rows(reference_layer, at_layer(reference, reference_layer, batch)[0].double(), real), intercept),
                               scale)
            cross, h_ref = _add(cross, rows_ref.T @ rows), _add(h_ref, rows_ref.T @ rows_ref)
        positions += rows.shape[0]
    if h is None:
        raise ValueError("the calibration data never reached the layer")
    scale = 2 / max(1, positions)
    return LayerStatistics(scale * h, None if cross is None else scale * cross, None if h_ref is None else scale * h_ref)


def _ones_appended(rows: torch.Tensor, intercept: bool) -> torch.Tensor:
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1) if intercept else rows


def _row_scale(weights: torch.Tensor | None, real: torch.Tensor | None) -> torch.Tensor | None:
    """The square roots of a batch's position weights, in the order input_rows() gives the rows."""
    if weights is None:
        return None
    if real is not None and weights.dim() == 2 and tuple(weights.shape) == tuple(real.shape):
        return weights[real.bool()].sqrt()
    return weights.reshape(-1).sqrt()


def _scaled(rows: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    # A count that does not match (a layer whose output has other leading dimensions than its input
    # rows) leaves the rows unweighted rather than misaligned.
    return rows * scale.to(rows.dtype)[:, None] if scale is not None and scale.shape[0] == rows.shape[0] else rows


def _add(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    return term if total is None else total + term


def error_to_reference(candidate: torch.Tensor, original: torch.Tensor, stats: LayerStatistics) -> float:
    """|W' X - W X0| / |W X0| on the calibration data: the layer's relative output error against what
    the original model's layer computed on its own inputs (without a reference, X0 is X)."""
    if stats.cross is None or stats.h_reference is None:
        return output_error(candidate, original, stats.h)
    c, w = candidate.double(), original.double()
    squared = (torch.einsum("ij,jk,ik->", c, stats.h, c) - 2 * torch.einsum("ij,kj,ik->", c, stats.cross, w)
               + torch.einsum("ij,jk,ik->", w, stats.h_reference, w))
    return float(torch.sqrt(squared.clamp(min=0) / torch.einsum("ij,jk,ik->", w, stats.h_reference, w).clamp(min=1e-30)))


def inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of (H + damping)^-1; more damping where the data left H near singular."""
    mean = torch.mean(torch.diag(h))
    for damp in (DAMP, 0.1, 1.0):
        try:
            damped = h + damp * mean * torch.eye(h.shape[0], dtype=h.dtype)
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise ValueError("the layer's input Hessian is not positive definite even with damping")




def output_error(candidate: torch.Tensor, original: torch.Tensor, h: torch.Tensor) -> float:
    """|(W' - W) X| / |W X| on the calibration data, from the Hessian: the layer's relative output error."""
    diff = candidate.double() - original.double()
    return float(torch.sqrt(torch.einsum("ij,jk,ik->", diff, h, diff).clamp(min=0)
                            / torch.einsum("ij,jk,ik->", original.double(), h, original.double()).clamp(min=1e-30)))
