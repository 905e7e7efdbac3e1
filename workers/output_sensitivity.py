"""How much an error in a layer's output moves the model's output, per position (token, pixel) and
per output channel, so that a layer-wise reconstruction spends its accuracy where the output needs
it (output-aware layer objectives, as OAC and the Optimal Brain Surgeon's output Hessian do).

A layer-wise method minimises |W' X - W X|^2 summed over every calibration position and output
channel alike. The model's output does not weigh them alike: in a post-LN transformer a token whose
residual stream is large (the [CLS] and [SEP] tokens carry outliers) absorbs an error that moves a
plain token a lot; a sentence embedding averages a short sentence's few tokens; some output channels
pass through LayerNorm gains or attention scores that others do not. The Gauss-Newton second-order
model of the output's change is diag(J^T J) at the layer's output o, J = d phi(y) / d o; it is
estimated here with random sign probes (Hutchinson): for v of phi(y)'s shape, g = d(v . phi(y))/do
and E[g^2] = diag(J^T J). Summed over channels it weighs each position's row of X; summed over
positions it weighs each output channel (SparseGPT's choice of which weights go).

phi is the space the step's quality is measured in: an embedding's direction (cosine), and for class
or token logits the square roots of the probabilities, whose squared distance is the KL the methods
distil with, to second order (the Fisher metric). Padded positions get no probe.

The weights are tempered (raised to POWER) before use: the full Gauss-Newton weights spread 40x
between a layer's positions, and fitting a few hundred sentences that unevenly fits them rather than
the model. Measured on all-MiniLM-L6-v2, 50% unstructured SparseGPT, no fine-tuning, 100 held-out
sentences (2026-12-07, bench/prune_calibration_gap.py): 0.9602 unweighted, 0.9677 with positions and
channels at power 0.5 (scripts, per-layer sparsity: power 1 on positions alone 0.9451, 0.5 0.9468).

Written here because no maintained library measures this on an arbitrary torch module: OAC's and
llm-compressor's code hook a transformer's own blocks and its language-model loss."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workers.hessian import Batch
from workers.output_kind import SCORED

PROBES = 32  # 16 measured 0.9680 and 32 0.9684 on the MiniLM case above; 8 gave 0.9676
POWER = 0.5
FLOOR = 1e-3  # of the mean weight: no position or channel is dropped from a fit altogether
OUTPUT_SPACE = {"classifier": "the square roots of the class probabilities", "token_logits": "the square roots of each position's token probabilities",
                "features": "the output's direction, as cosine measures it"}


@dataclass
class Sensitivity:
    """One layer's weights, each mean 1: `positions`, one tensor per calibration batch over the
    leading dimensions of the layer's output ([batch, positions] for a token sequence, [batch, pixels]
    for a convolution, [batch] for a vector); `channels`, one per output channel."""

    positions: list[torch.Tensor]
    channels: torch.Tensor

    def spread(self) -> float:
        """How unevenly the positions weigh: the 90th over the 10th percentile (1: evenly)."""
        return _spread(torch.cat([p.flatten() for p in self.positions]))

    def channel_spread(self) -> float:
        return _spread(self.channels)


def _spread(weights: torch.Tensor) -> float:
    # Padded positions sit at the floor (their rows are never used): left out of the figure.
    w = weights[weights > FLOOR ** POWER * (1 + 1e-6)].double().numpy()
    if not w.size:
        return 1.0
    high, low = np.percentile(w, [90, 10])  # numpy: torch.quantile refuses more than 2^24 values (a large image's pixels)
    return round(float(high / max(low, 1e-30)), 3)


def output_space(y: torch.Tensor, kind: str) -> torch.Tensor:
    """The model's first output mapped to where its quality is measured (see the module's docstring)."""
    if kind in SCORED:
        # sqrt(p) as exp(log p / 2): its gradient stays finite where a probability underflows to 0.
        return torch.exp(torch.log_softmax(y.float(), -1) / 2)
    return F.normalize(y.float(), dim=-1) if y.dim() >= 2 else y.float()


def _per_position(g: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """g^2 summed over the output channels: [batch, positions] (a convolution's channels are dim 1)."""
    squared = g.double() ** 2
    if isinstance(layer, nn.Conv2d):
        return squared.sum(1).reshape(g.shape[0], -1)
    return squared.sum(-1) if squared.dim() > 1 else squared


def _per_channel(g: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    squared = g.double() ** 2
    if isinstance(layer, nn.Conv2d):
        return squared.sum((0, 2, 3))
    return squared.reshape(-1, squared.shape[-1]).sum(0)


def _real(real: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor | None:
    return real.bool() if real is not None and y.dim() >= 3 and tuple(real.shape) == tuple(y.shape[:2]) else None


def measure(module: nn.Module, layers: dict[str, nn.Module], batches: Sequence[Batch], kind: str, probes: int = PROBES,
            seed: int = 0) -> dict[str, Sensitivity]:
    """Each layer's weights on `batches` (in their order: statistics() pairs them by index), from the
    unchanged `module`. A layer the first output does not depend on is left out (unweighted)."""
    module.eval()
    generator = torch.Generator().manual_seed(seed)
    positions: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    channels: dict[str, torch.Tensor] = {}
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:  # the outputs must carry a graph back to each layer; no parameter's .grad is touched
        p.requires_grad_(True)
    outputs: dict[str, torch.Tensor] = {}
    try:
        for batch, real in batches:
            outputs.clear()
            handles = [layer.register_forward_hook(lambda _m, _a, out, n=n: outputs.__setitem__(n, out)) for n, layer in layers.items()]
            try:
                with torch.enable_grad():
                    y = module(*batch)
                    y = y[0] if isinstance(y, (tuple, list)) else y
                    phi = output_space(y, kind)
                    mask = _real(real, phi)
                    names = [n for n in layers if n in outputs and outputs[n].requires_grad]
                    by_position: dict[str, torch.Tensor] = {}
                    by_channel: dict[str, torch.Tensor] = {}
                    for p in range(probes if names and phi.requires_grad else 0):
                        v = torch.randint(0, 2, phi.shape, generator=generator).to(phi.dtype) * 2 - 1
                        if mask is not None:
                            v = v * mask.reshape(*mask.shape, *([1] * (phi.dim() - 2))).to(phi.dtype)
                        grads = torch.autograd.grad((v * phi).sum(), [outputs[n] for n in names], retain_graph=p < probes - 1, allow_unused=True)
                        for n, g in zip(names, grads):
                            if g is not None:
                                by_position[n] = by_position.get(n, 0) + _per_position(g, layers[n]) / probes
                                by_channel[n] = by_channel.get(n, 0) + _per_channel(g, layers[n]) / probes
            finally:
                for handle in handles:
                    handle.remove()
            for n in by_position:
                positions[n].append(by_position[n])
                channels[n] = channels.get(n, 0) + by_channel[n]
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    # A layer some batch did not reach, or whose gradients were not finite, is fitted unweighted.
    return {n: _tempered(positions[n], channels[n]) for n in channels
            if len(positions[n]) == len(batches) and all(bool(torch.isfinite(p).all()) for p in [*positions[n], channels[n]])}


def _tempered(positions: list[torch.Tensor], channels: torch.Tensor) -> Sensitivity:
    """Mean 1, floored, raised to POWER (the module's docstring says why)."""
    def temper(t: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        return ((t / mean.clamp(min=1e-30)).clamp(min=FLOOR) ** POWER).float()  # float32: a large image has many positions per layer

    flat = torch.cat([p.flatten() for p in positions])
    mean = flat[flat > 0].mean() if bool((flat > 0).any()) else torch.tensor(1.0, dtype=flat.dtype)
    return Sensitivity([temper(p, mean) for p in positions], temper(channels, channels.mean()))
