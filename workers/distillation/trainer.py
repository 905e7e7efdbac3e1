"""The distillation training loop: soft targets at temperature T (loss x T^2), mixed with hard
labels by alpha when there are labels, optional hint (feature) losses through learned projections,
a cosine or constant schedule, validation every epoch, early stopping, best epoch kept."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service.core.specs import DistillStep
from workers.trainable.device import training_device
from workers.fixed_batch import exactly, padded_order
from workers.trainable.training import STUDENT_LR, make_optimizer, module_fixed_batch, output_kind, padding_mask, soft_loss, train_config
from workers.trainable.training import Targets
from workers.trainable.training import score as score_of

__all__ = ["Data", "History", "distill", "output_kind"]


@dataclass
class Data:
    inputs: list[torch.Tensor]
    labels: np.ndarray | None
    teacher: Targets  # the teacher's outputs on `inputs` (a language model's as its top tokens)
    kind: str = "classifier"  # see output_kind


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = float("-inf")
    stopped_early: bool = False


class _Hooks:
    """Capture named modules' outputs during a forward pass."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            self.values[name] = output

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _projection(student_dim: int, teacher_dim: int, conv: bool) -> nn.Module:
    if student_dim == teacher_dim:
        return nn.Identity()
    return nn.Conv2d(student_dim, teacher_dim, 1) if conv else nn.Linear(student_dim, teacher_dim)


def _hints(student: nn.Module, train: Data, hint_pairs: list[tuple[nn.Module, nn.Module, torch.Tensor]] | None,
           fixed: int | None) -> tuple[Any, nn.ModuleList, list[torch.Tensor]]:
    """Hooks on the student's hinted layers, a projection from each to its teacher feature's width,
    and the teacher features: (None, empty, []) without hints."""
    projections = nn.ModuleList()
    teacher_feats: list[torch.Tensor] = []
    if not hint_pairs:
        return None, projections, teacher_feats
    hooks = _Hooks({str(i): s for i, (_, s, _) in enumerate(hint_pairs)})
    with torch.no_grad():
        student(*(exactly(x, fixed) if fixed else x[:2] for x in train.inputs))
    for i, (_, _, feats) in enumerate(hint_pairs):
        s_out = hooks.values[str(i)]
        projections.append(_projection(s_out.shape[1], feats.shape[1], s_out.dim() == 4))
        teacher_feats.append(feats)
    return hooks, projections, teacher_feats


def _soft_loss(out: torch.Tensor, idx: torch.Tensor, train: Data, labels: torch.Tensor | None, mask: torch.Tensor | None,
               spec: DistillStep, hint: Any, device: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batch's distillation loss and its parts: the teacher's soft targets, the labels' share
    (alpha, classifiers with labels), the hint loss weighted by hint_weight."""
    soft = soft_loss(out, train.teacher[idx].to(device), spec.temperature, train.kind, None if mask is None else mask[idx].to(device))
    parts = {"soft": soft}
    loss = soft
    if labels is not None and spec.alpha > 0 and train.kind == "classifier":
        parts["hard"] = F.cross_entropy(out, labels[idx].to(device))
        loss = spec.alpha * parts["hard"] + (1 - spec.alpha) * soft
    if hint is not None:
        parts["hint"] = hint
        loss = loss + spec.hint_weight * hint
    return loss, parts


def distill(
    student: nn.Module,
    train: Data,
    validation: Data,
    spec: DistillStep,
    on_epoch: Callable[[int, dict], None],
    hint_pairs: list[tuple[nn.Module, nn.Module, torch.Tensor]] | None = None,
    hard_labels_only: bool = False,
) -> History:
    """Train `student` in place; it ends holding the best epoch's weights."""
    config = train_config(spec.training, spec.epochs, STUDENT_LR)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    labels = torch.from_numpy(train.labels).long() if train.labels is not None else None
    fixed = module_fixed_batch(student)
    mask = padding_mask(student, train.inputs)  # padded positions count in no loss

    student_hooks, projections, teacher_feats = _hints(student, train, hint_pairs if not hard_labels_only else None, fixed)

    device = training_device()
    student.to(device)
    projections.to(device)
    params = list(student.parameters()) + list(projections.parameters())
    optimizer = make_optimizer(params, config)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=spec.epochs) if spec.schedule == "cosine" else None
    history = History()
    best_state = copy.deepcopy(student.state_dict())
    n = len(train.inputs[0])
    batch = fixed or config.batch_for(n)
    for epoch in range(spec.epochs):
        student.to(device).train()
        order = torch.randperm(n, generator=generator)
        if fixed:
            order = padded_order(order, batch)
        totals = {"loss": 0.0, "soft": 0.0, "hard": 0.0, "hint": 0.0}
        seen = 0
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            if len(idx) < 2 and not fixed:
                continue
            out = student(*(x[idx].to(device) for x in train.inputs))
            out = out[0] if isinstance(out, tuple) else out
            if hard_labels_only:
                parts = {"hard": F.cross_entropy(out, labels[idx].to(device))}
                loss = parts["hard"]
            else:
                hint = None
                if student_hooks is not None:
                    hint = sum(F.mse_loss(p(student_hooks.values[str(i)]), teacher_feats[i][idx].to(device)) for i, p in enumerate(projections))
                loss, parts = _soft_loss(out, idx, train, labels, mask, spec, hint, device)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(idx)
            totals["loss"] += loss.item() * len(idx)
            for k, v in parts.items():
                totals[k] += v.item() * len(idx)
        if scheduler:
            scheduler.step()
        student.to("cpu")
        score = score_of(student, validation.inputs, validation.labels, validation.teacher, validation.kind)
        # "loss" always (a student that already matches its teacher scores 0); the parts that were used.
        record = {"epoch": epoch + 1, **{k: v / max(1, seen) for k, v in totals.items() if v or k == "loss"}, "validation": score}
        history.epochs.append(record)
        if score > history.best_score:
            history.best_score, history.best_epoch = score, epoch + 1
            best_state = copy.deepcopy(student.state_dict())
        on_epoch(epoch, record)
        if spec.patience is not None and epoch + 1 - history.best_epoch >= spec.patience:
            history.stopped_early = True
            break
    if student_hooks is not None:
        student_hooks.remove()
    student.to("cpu")
    student.load_state_dict(best_state)
    student.eval()
    return history
