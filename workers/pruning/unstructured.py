"""Unstructured (weight-level) pruning: masks from magnitude or Taylor scores, global or per layer."""

from __future__ import annotations

import torch
from torch import nn

from service.core.specs import PruneStep


def scores(layers: dict[str, nn.Module], importance: str, grads: dict[str, torch.Tensor] | None,
           input_norms: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per-weight importance: |w| (l1 and l2 rank single weights identically), |w * dL/dw| (taylor), or
    |w| times the norm of the input feature it multiplies (wanda: a small weight on a loud feature matters)."""
    out = {}
    for name, layer in layers.items():
        w = layer.weight.detach()
        if importance == "taylor" and grads is not None:
            out[name] = (w * grads[name]).abs()
        elif importance == "wanda" and input_norms is not None and name in input_norms:
            norm = input_norms[name].to(w.device)
            # Linear [out, in] x norm[in]; Conv [out, in/groups, kh, kw]: the channel norm over each group's inputs.
            shape = (1, -1) + (1,) * (w.dim() - 2)
            out[name] = w.abs() * (norm.reshape(shape) if norm.numel() == w.shape[1] else norm.reshape(-1, w.shape[1]).mean(0).reshape(shape))
        else:
            out[name] = w.abs()
    return out


def _kth(values: torch.Tensor, fraction: float) -> float:
    k = int(round(fraction * values.numel()))
    if k <= 0:
        return float("-inf")
    return float(torch.kthvalue(values.flatten().float(), min(k, values.numel())).values)


def round_target(amount: float, fraction_of_target: float) -> float:
    """The share pruned after a round that is `fraction_of_target` of the way: geometric, each round
    removes a share of what is left."""
    return 1.0 - (1.0 - amount) ** fraction_of_target


def masks_for(
    layers: dict[str, nn.Module], layer_scores: dict[str, torch.Tensor], spec: PruneStep, fraction_of_target: float, current: dict[str, torch.Tensor] | None,
    per_row: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Masks that prune `fraction_of_target` of each layer's target amount (global threshold over the
    layers without an override; with `per_row`, the same fraction of every output row, Wanda's comparison
    group). Already-pruned weights stay pruned (scored below everything)."""

    def target(amount: float) -> float:
        return round_target(amount, fraction_of_target)

    masked_scores = {}
    for name, s in layer_scores.items():
        s = s.clone()
        if current is not None:
            s[current[name] == 0] = -1.0
        masked_scores[name] = s
    masks, thresholds = {}, {}
    if per_row:
        for n, s in masked_scores.items():
            rows = s.reshape(s.shape[0], -1)
            k = int(round(target(spec.layer_amounts.get(n, spec.amount)) * rows.shape[1]))
            mask = torch.ones_like(rows)
            if k > 0:
                mask.scatter_(1, rows.argsort(dim=1)[:, :k], 0.0)
            masks[n] = mask.reshape(s.shape)  # no one threshold per layer: each row has its own
        return masks, thresholds
    pooled = [n for n in layers if n not in spec.layer_amounts]
    if spec.scope == "global" and pooled:
        flat = torch.cat([masked_scores[n].flatten() for n in pooled])
        threshold = _kth(flat, target(spec.amount))
        for n in pooled:
            masks[n], thresholds[n] = (masked_scores[n] > threshold).float(), threshold
    for n in layers:
        if n in masks:
            continue
        amount = spec.layer_amounts.get(n, spec.amount)
        threshold = _kth(masked_scores[n], target(amount))
        masks[n], thresholds[n] = (masked_scores[n] > threshold).float(), threshold
    return masks, thresholds


@torch.no_grad()
def apply_masks(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        weight = layers[name].weight
        weight.mul_(mask.to(weight.device))


def sparsity(layers: dict[str, nn.Module]) -> float:
    total = sum(layer.weight.numel() for layer in layers.values())
    zeros = sum(int((layer.weight == 0).sum()) for layer in layers.values())
    return zeros / max(1, total)
