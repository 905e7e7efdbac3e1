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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 128  # columns per lazy update and mask selection, as in the paper (32 and per-row choice measured the same on MiniLM)
DAMP = 0.01  # share of the Hessian's mean diagonal added to it (the paper's percdamp; 0.1 and 1.0 measured worse on MiniLM)


# A calibration batch: the module's inputs, and the token mask of its positions (None: every position counts).
Batch = tuple[tuple[torch.Tensor, ...], "torch.Tensor | None"]


class _Captured(Exception):
    """Raised by the hook once the layer's input is captured: the rest of the forward pass is not needed."""


def supported(layer: nn.Module) -> bool:
    """Linear layers and ordinary convolutions (their input unfolded into patches); grouped and
    depthwise convolutions fall back to magnitude within each row."""
    if isinstance(layer, nn.Linear):
        return True
    return isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)


def _rows(layer: nn.Module, x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """The layer's input as rows of what each weight row multiplies: [positions, in_features]. With a
    token mask `real` [batch, positions], padded positions are left out: nobody reads their outputs,
    and their activations would pull the reconstruction towards them."""
    if isinstance(layer, nn.Linear):
        if real is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(real.shape):
            return x[real.bool()]
        return x.reshape(-1, x.shape[-1])
    patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)  # [B, C*kh*kw, L]
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


@torch.no_grad()
def hessian(module: nn.Module, layer: nn.Module, batches: Iterable[Batch]) -> torch.Tensor:
    """2 X^T X / positions of the layer's input over the batches (float64), the forward stopped at the layer."""
    total: torch.Tensor | None = None
    positions = 0
    current: list[torch.Tensor | None] = [None]  # the token mask of the batch running

    def record(_module: nn.Module, args: tuple, _output: Any) -> None:
        nonlocal total, positions
        rows = _rows(layer, args[0].detach().double(), current[0])
        total = rows.T @ rows if total is None else total + rows.T @ rows
        positions += rows.shape[0]
        raise _Captured

    handle = layer.register_forward_hook(record)
    try:
        for batch, current[0] in batches:
            try:
                module(*batch)
            except _Captured:
                pass
    finally:
        handle.remove()
    if total is None:
        raise ValueError("the calibration data never reached the layer")
    return 2 * total / max(1, positions)


def _inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of (H + damping)^-1; more damping where the data left H near singular."""
    mean = torch.mean(torch.diag(h))
    for damp in (DAMP, 0.1, 1.0):
        try:
            damped = h + damp * mean * torch.eye(h.shape[0], dtype=h.dtype)
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise ValueError("the layer's input Hessian is not positive definite even with damping")


@torch.no_grad()
def prune_weight(weight: torch.Tensor, h: torch.Tensor, amount: float, pruned: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """`weight` [out, in] with `amount` of each block's weights set to zero and the rest updated to
    make up for them; `pruned` marks weights already zero that must stay so. Returns the new weight
    and the layer's output error on the calibration data, relative, before and after the update."""
    w = weight.double().clone()
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv = _inverse_factor(h)
    columns = w.shape[1]
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, columns, BLOCK):
        i2 = min(i1 + BLOCK, columns)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        score = w1 ** 2 / torch.diag(hinv1).reshape(1, -1) ** 2
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
    original = weight.double()
    magnitude = original.masked_fill(mask, 0)

    def output_error(candidate: torch.Tensor) -> float:
        diff = candidate - original
        return float(torch.sqrt(torch.einsum("ij,jk,ik->", diff, h, diff).clamp(min=0) / torch.einsum("ij,jk,ik->", original, h, original).clamp(min=1e-30)))

    return w.to(weight.dtype), {"output_error_masked": round(output_error(magnitude), 6), "output_error": round(output_error(w), 6)}


@torch.no_grad()
def prune_layers(module: nn.Module, layers: dict[str, nn.Module], amounts: dict[str, float], batches: Callable[[], Iterable[Batch]],
                 progress: Callable[[int, int, str], None]) -> dict[str, dict[str, float]]:
    """Each supported layer pruned in turn (in the order of `layers`, the graph's), its Hessian taken
    on inputs through the layers already pruned; returns each layer's output error before/after the
    update. Already-zero weights stay zero (a later round of an iterative schedule)."""
    module.eval()
    errors = {}
    for index, (name, layer) in enumerate(layers.items()):
        progress(index, len(layers), name)
        weight = layer.weight
        shape = weight.shape
        flat = weight.reshape(shape[0], -1)
        new, errors[name] = prune_weight(flat, hessian(module, layer, batches()), amounts[name], pruned=flat == 0)
        weight.copy_(new.reshape(shape))
    return errors
