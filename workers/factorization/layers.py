"""Factorised replacements for trained layers, initialised to approximate them as closely as their
rank allows: truncated SVD for linear layers, Tucker-2 (HOSVD) for K x K convolutions (Kim et al.,
"Compression of Deep Convolutional Neural Networks for Fast and Low Power Mobile Applications", 2016).
Written here because torch has the decompositions (torch.linalg.svd) but no layer surgery for them,
and tensorly's Tucker would be a dependency for two SVDs."""

from __future__ import annotations

import torch
from torch import nn


def rank_for(singular_values: torch.Tensor, ratio: float | None, energy: float, rank: int | None = None) -> int:
    if rank is not None:
        return min(rank, len(singular_values))
    if ratio is not None:
        return max(1, int(round(ratio * len(singular_values))))
    cumulative = torch.cumsum(singular_values**2, 0) / torch.sum(singular_values**2).clamp(min=1e-30)
    return min(len(singular_values), int(torch.searchsorted(cumulative, torch.tensor(energy)).item()) + 1)


def factorise_linear(layer: nn.Linear, ratio: float | None, energy: float, rank: int | None = None) -> tuple[nn.Sequential, dict] | None:
    """(in -> r, r -> out) initialised from the truncated SVD; None when it would not store fewer numbers."""
    u, s, vh = torch.linalg.svd(layer.weight.detach().float(), full_matrices=False)
    r = rank_for(s, ratio, energy, rank)
    if r * (layer.in_features + layer.out_features) >= layer.in_features * layer.out_features:
        return None
    first = nn.Linear(layer.in_features, r, bias=False)
    second = nn.Linear(r, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_(vh[:r])
        second.weight.copy_(u[:, :r] * s[:r])
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    return nn.Sequential(first, second), {"rank": r, "full_rank": len(s)}


def _mode_basis(weight: torch.Tensor, mode: int, ratio: float | None, energy: float) -> torch.Tensor:
    unfolded = weight.movedim(mode, 0).reshape(weight.shape[mode], -1)
    u, s, _ = torch.linalg.svd(unfolded, full_matrices=False)
    return u[:, : rank_for(s, ratio, energy)]


def factorise_conv(layer: nn.Conv2d, ratio: float | None, energy: float) -> tuple[nn.Sequential, dict] | None:
    """Tucker-2 of a K x K convolution: 1x1 (C -> r_in), K x K core (r_in -> r_out, same stride/padding/
    dilation), 1x1 (r_out -> O, the bias). None for 1x1, grouped, or when it would not store fewer numbers."""
    if layer.groups != 1 or layer.kernel_size == (1, 1) or not isinstance(layer.padding, tuple):
        return None
    w = layer.weight.detach().float()  # O x C x kh x kw
    out_basis = _mode_basis(w, 0, ratio, energy)  # O x r_out
    in_basis = _mode_basis(w, 1, ratio, energy)  # C x r_in
    r_out, r_in = out_basis.shape[1], in_basis.shape[1]
    o, c, kh, kw = w.shape
    if r_in * c + r_out * r_in * kh * kw + o * r_out >= o * c * kh * kw:
        return None
    core = torch.einsum("ocij,or,cs->rsij", w, out_basis, in_basis)  # r_out x r_in x kh x kw
    first = nn.Conv2d(c, r_in, 1, bias=False)
    middle = nn.Conv2d(r_in, r_out, layer.kernel_size, stride=layer.stride, padding=layer.padding, dilation=layer.dilation, bias=False)
    last = nn.Conv2d(r_out, o, 1, bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_(in_basis.T.reshape(r_in, c, 1, 1))
        middle.weight.copy_(core)
        last.weight.copy_(out_basis.reshape(o, r_out, 1, 1))
        if layer.bias is not None:
            last.bias.copy_(layer.bias)
    return nn.Sequential(first, middle, last), {"rank": [r_in, r_out], "full_rank": [c, o]}


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def depthwise_separable(layer: nn.Conv2d) -> tuple[nn.Sequential, dict] | None:
    """Depthwise K x K (same stride/padding/dilation) then pointwise 1x1, initialised so that
    pointwise[o, c] * depthwise[c] is the best rank-1 fit of the original W[:, c] (O x K*K) for each
    input channel c. None for 1x1 or grouped convolutions."""
    if layer.groups != 1 or layer.kernel_size == (1, 1) or not isinstance(layer.padding, tuple):
        return None
    w = layer.weight.detach().float()  # O x C x kh x kw
    o, c, kh, kw = w.shape
    per_channel = w.permute(1, 0, 2, 3).reshape(c, o, kh * kw)  # C x O x K*K
    u, s, vh = torch.linalg.svd(per_channel, full_matrices=False)
    depthwise = nn.Conv2d(c, c, layer.kernel_size, stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=c, bias=False)
    pointwise = nn.Conv2d(c, o, 1, bias=layer.bias is not None)
    with torch.no_grad():
        depthwise.weight.copy_(vh[:, 0, :].reshape(c, 1, kh, kw))
        pointwise.weight.copy_((u[:, :, 0] * s[:, :1]).T.reshape(o, c, 1, 1))
        if layer.bias is not None:
            pointwise.bias.copy_(layer.bias)
    approx = torch.einsum("oc,cij->ocij", pointwise.weight.detach()[:, :, 0, 0], depthwise.weight.detach()[:, 0])
    error = float(torch.linalg.norm(approx - w) / torch.linalg.norm(w).clamp(min=1e-12))
    return nn.Sequential(depthwise, pointwise), {"approximation_error": round(error, 5), "expected_ratio": round(1 / o + 1 / (kh * kw), 5)}


def macs(layer: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates per sample for a Linear/Conv2d or a Sequential of them, on input x."""
    total, batch = 0, len(x)
    with torch.no_grad():
        for part in (layer if isinstance(layer, nn.Sequential) else [layer]):
            y = part(x)
            if isinstance(part, nn.Linear):
                total += part.in_features * part.out_features * (y.numel() // y.shape[-1] // batch)
            elif isinstance(part, nn.Conv2d):
                total += part.weight[0].numel() * y.numel() // batch
            x = y
    return int(total)
