"""Structured pruning with torch-pruning's DepGraph: whole neurons/channels removed, with every
coupled layer (residual adds, concatenations, batch norm, grouped/depthwise convs) narrowed with them."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function

from service.core.specs import PruneStep


class _MeasuredImportance(tp.importance.GroupMagnitudeImportance):
    """A per-channel statistic of the inputs of every layer, accumulated over all the batches run inside
    `measure` (torch-pruning's ActivationImportance keeps only the last batch) and left on each layer as
    `_measured`: `_per_channel` sums a batch, `_finish` turns the sums and the count into the statistic."""

    @staticmethod
    def _per_channel(x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _finish(total: torch.Tensor, seen: int) -> torch.Tensor:
        raise NotImplementedError

    @contextmanager
    def measure(self, model: nn.Module):
        sums: dict[nn.Module, list] = {}

        @torch.no_grad()
        def hook(module: nn.Module, inputs: tuple, _output: torch.Tensor) -> None:
            x = inputs[0]
            values = self._per_channel(x)
            channels = values.reshape(-1, x.shape[-1]).sum(0) if isinstance(module, nn.Linear) else values.transpose(0, 1).reshape(x.shape[1], -1).sum(1)
            total = sums.setdefault(module, [torch.zeros_like(channels), 0])
            total[0] += channels
            total[1] += x.numel() // channels.numel()

        hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            for module, (total, seen) in sums.items():
                module._measured = self._finish(total, max(1, seen))


class APoZImportance(_MeasuredImportance):
    """1 - APoZ (average percentage of zeros) of each channel, measured on the data at the inputs of
    the layers that consume it: a channel that is almost always zero after its activation matters least."""

    @staticmethod
    def _per_channel(x: torch.Tensor) -> torch.Tensor:
        return (x != 0).float()

    @staticmethod
    def _finish(total: torch.Tensor, seen: int) -> torch.Tensor:
        return total / seen

    @torch.no_grad()
    def __call__(self, group):
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer, handler = dep.target.module, dep.handler
            if handler in (function.prune_conv_in_channels, function.prune_linear_in_channels) and hasattr(layer, "_measured"):
                group_imp.append(layer._measured[sorted(idxs)])
                group_idxs.append(group[i].root_idxs)
        if not group_imp:
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)


class OutputContributionImportance(_MeasuredImportance):
    """What a channel carries into the layers that read it, measured on the data: the RMS of its value
    at each consumer's input times the norm of that consumer's weights for it (Wanda's |W| x ||x||
    summed over a channel's weights; the criterion the graph path ranks feed-forward units by). A unit
    that is loud but read through small weights, or read through large weights but rarely on, matters
    little; l1 sees only the weights."""

    @staticmethod
    def _per_channel(x: torch.Tensor) -> torch.Tensor:
        return x.double() * x.double()

    @staticmethod
    def _finish(total: torch.Tensor, seen: int) -> torch.Tensor:
        return torch.sqrt(total / seen).float()

    @torch.no_grad()
    def __call__(self, group):
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer, handler = dep.target.module, dep.handler
            if handler in (function.prune_conv_in_channels, function.prune_linear_in_channels) and hasattr(layer, "_measured") \
                    and getattr(layer, "groups", 1) == 1:
                index = torch.tensor(sorted(idxs))
                weights = layer.weight.detach().transpose(0, 1)[index].reshape(len(index), -1)  # [channels, out x kernel]
                group_imp.append(layer._measured[index] * weights.norm(dim=1).float())
                group_idxs.append(group[i].root_idxs)
        if not group_imp:
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)


def importance_for(name: str) -> tp.importance.Importance:
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "wanda":
        return OutputContributionImportance()
    return APoZImportance()


def make_pruner(module: nn.Module, example: tuple[torch.Tensor, ...], spec: PruneStep, selected: dict[str, nn.Module], all_layers: dict[str, nn.Module]) -> tuple[tp.pruner.MetaPruner, tp.importance.Importance]:
    importance = importance_for(spec.importance)
    ignored = [layer for name, layer in all_layers.items() if name not in selected]
    ratios = {all_layers[name]: amount for name, amount in spec.layer_amounts.items() if name in selected}
    pruner = tp.pruner.MetaPruner(
        module,
        example_inputs=example,
        importance=importance,
        pruning_ratio=spec.amount,
        pruning_ratio_dict=ratios or None,
        iterative_steps=spec.iterations,
        ignored_layers=ignored,
        global_pruning=spec.scope == "global",
        round_to=spec.channel_multiple if spec.channel_multiple > 1 else None,
    )
    return pruner, importance
