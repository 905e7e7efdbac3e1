"""Exit heads: a fixed average pooling (for feature maps) and a linear classifier, trained on cached
features by distillation from the model's final head (the backbone stays frozen), and the
confidence-threshold policy evaluated on held-out data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Exit:
    layer: str
    tensor: str  # the ONNX tensor the head reads
    feature_shape: tuple[int, ...]  # per sample: (C, H, W) or (F,)
    kernel: tuple[int, int] | None  # AveragePool kernel (= stride) for a feature map
    hidden: int = 0  # width of the head's hidden layer (0: a single linear layer)
    head: nn.Sequential = field(init=False)
    macs_prefix: int = 0  # backbone MACs per sample up to this exit
    train_features: torch.Tensor | None = None
    eval_features: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.head = make_head(self.features, self.hidden, 1)  # rebuilt in `train_heads` once the class count is known

    @property
    def features(self) -> int:
        if self.kernel is None:
            return int(np.prod(self.feature_shape))
        c, h, w = self.feature_shape
        return c * (h // self.kernel[0]) * (w // self.kernel[1])

    @property
    def head_macs(self) -> int:
        pool = int(np.prod(self.feature_shape)) if self.kernel is not None else 0
        return pool + sum(m.in_features * m.out_features for m in self.head if isinstance(m, nn.Linear))

    @property
    def head_parameters(self) -> int:
        return sum(p.numel() for p in self.head.parameters())


def make_head(features: int, hidden: int, classes: int) -> nn.Sequential:
    if hidden:
        return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))
    return nn.Sequential(nn.Linear(features, classes))


def pooling_kernel(shape: tuple[int, ...], grid: int) -> tuple[int, int] | None:
    """Kernel that average-pools an (H, W) map to at most grid x grid exactly (no padding); None for flat features."""
    if len(shape) != 3:
        return None
    _, h, w = shape
    for g in range(min(grid, h, w), 0, -1):
        if h % g == 0 and w % g == 0:
            return (h // g, w // g)
    return (h, w)


def pool(x: torch.Tensor, exit_: Exit) -> torch.Tensor:
    if exit_.kernel is not None:
        x = F.avg_pool2d(x, exit_.kernel, exit_.kernel)
    return x.flatten(1)


def train_heads(exits: list[Exit], teacher: torch.Tensor, labels: np.ndarray | None, epochs: int, temperature: float, alpha: float,
                seed: int = 0, on_epoch: Any = None) -> None:
    """Each head learns the final head's soft targets at `temperature` (and the labels, weighted by alpha)."""
    torch.manual_seed(seed)
    classes = teacher.shape[1]
    y = torch.from_numpy(labels).long() if labels is not None else None
    soft = F.softmax(teacher / temperature, dim=1)
    for exit_ in exits:
        exit_.head = make_head(exit_.features, exit_.hidden, classes)
    params = [p for e in exits for p in e.head.parameters()]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    n = len(teacher)
    for epoch in range(epochs):
        order = torch.randperm(n)
        total = 0.0
        for start in range(0, n, 256):
            idx = order[start:start + 256]
            loss = torch.zeros(())
            for exit_ in exits:
                assert exit_.train_features is not None
                logits = exit_.head(exit_.train_features[idx])
                kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft[idx], reduction="batchmean") * temperature**2
                loss = loss + ((1 - alpha) * kd + alpha * F.cross_entropy(logits, y[idx]) if y is not None else kd)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        if on_epoch is not None:
            on_epoch(epoch, epochs, total / n)


def policy_table(exits: list[Exit], final_logits: torch.Tensor, labels: np.ndarray | None, total_macs: int, thresholds: list[float]) -> list[dict[str, Any]]:
    """Per threshold: accuracy (labels) or agreement with the final head, average MACs, share leaving at each exit."""
    final_pred = final_logits.argmax(1).numpy()
    truth = labels[: len(final_pred)] if labels is not None else final_pred
    with torch.no_grad():
        probs = [F.softmax(e.head(e.eval_features), dim=1) for e in exits]  # type: ignore[arg-type]
    conf = np.stack([p.max(1).values.numpy() for p in probs])  # exits x samples
    preds = np.stack([p.argmax(1).numpy() for p in probs])
    head_costs = np.cumsum([e.head_macs for e in exits])
    costs = [e.macs_prefix + int(head_costs[i]) for i, e in enumerate(exits)] + [total_macs + int(head_costs[-1])]
    rows = []
    for tau in thresholds:
        taken = np.full(len(final_pred), len(exits))
        for i in reversed(range(len(exits))):
            taken = np.where(conf[i] >= tau, i, taken)
        predicted = np.where(taken < len(exits), preds[np.minimum(taken, len(exits) - 1), np.arange(len(final_pred))], final_pred)
        rows.append({
            "threshold": tau,
            "accuracy": float((predicted == truth).mean()),
            "average_macs": float(np.mean([costs[t] for t in taken])),
            "exit_shares": [round(float((taken == i).mean()), 4) for i in range(len(exits) + 1)],
        })
    return rows
