"""Depth students of residual CNNs (ResNet's basic and bottleneck blocks, MobileNetV2's inverted
residuals): whole residual blocks removed, found from the graph (an Add of a tensor and a branch
computed from that tensor alone), so no layer names or model classes are needed.

The blocks whose absence changes the outputs least on the job's data go (each skipped alone and
measured). Dropping a block y = x + f(x) leaves y = x: the network stays well-formed (the block preserved the
shape), and what the teacher computed before the block is still there for the student to build on.
Replacing single layers by identities instead (what a CNN without residuals gets) cuts a branch in
half and leaves its batch norms normalising statistics that no longer exist. Blocks whose shortcut is
a projection (a stride or a width change) are not residual in this sense and stay.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from service.core.errors import InvalidInput
from workers.distillation.transformer_depth import apply_aliases, chosen_blocks
from workers.trainable.from_onnx import OnnxGraphModule


def residual_blocks(module: OnnxGraphModule) -> list[tuple[str, str, list[str]]]:
    """(Add output, skip input, the branch's layer keys) for every identity-shortcut block, in order."""
    producer = {out: i for i, step in enumerate(module.plan) for out in step[3]}
    constants = set(module._const_keys) | {""}
    blocks = []
    for kind, target, ins, outs, _ in module.plan:
        if kind != "op" or target != "Add" or len(ins) != 2 or set(ins) & constants or ins[0] == ins[1]:
            continue
        for skip, branch in (ins, ins[::-1]):
            layers = _branch_layers(module, producer, constants, branch, skip)
            if layers:
                blocks.append((outs[0], skip, layers))
                break
    return blocks


def _branch_layers(module: OnnxGraphModule, producer: dict[str, int], constants: set[str], start: str, skip: str) -> list[str]:
    """The layer keys that compute `start` from `skip` and constants alone; [] when anything else
    (a graph input, a tensor from before the block) feeds it, or no layer does."""
    seen, frontier, layers, reached = set(), [start], [], False
    while frontier:
        value = frontier.pop()
        if value == skip:
            reached = True
            continue
        if value in constants or value in seen:
            continue
        seen.add(value)
        if value not in producer:
            return []
        kind, target, ins, _, _ = module.plan[producer[value]]
        if kind == "layer":
            layers.append(target)
        frontier.extend(ins)
    return sorted(layers, key=lambda key: list(module.layers).index(key)) if reached else []


def drop_residual_blocks(student: OnnxGraphModule, count: int, probe: tuple[torch.Tensor, ...] | None = None) -> tuple[list[str], dict[str, str]]:
    """Remove `count` identity-shortcut blocks from `student` in place: those whose absence changes
    the outputs least on `probe` (the job's data), else every other one. Returns their descriptions
    and the aliases made ({block output: block input}) for `drop_in_graph`."""
    blocks = residual_blocks(student)
    if count > len(blocks):
        raise InvalidInput(f"this network has {len(blocks)} residual block(s) with an identity shortcut; cannot drop {count} "
                           "(blocks whose shortcut changes the width or stride stay)", code="invalid_student")
    damage = _damage(student, blocks, probe) if probe is not None else None
    if damage is not None:
        dropped = sorted(sorted(range(len(blocks)), key=lambda b: damage[b])[:count])
    else:
        dropped = chosen_blocks(len(blocks), count, keep_first=False)
    names = []
    for b in dropped:
        layers = ", ".join(student.layer_names[k] for k in blocks[b][2])
        measured = f"; output cosine {1 - damage[b]:.4f} without it" if damage is not None else ""
        names.append(f"residual block {b} ({layers}{measured})")
    aliases = {blocks[b][0]: blocks[b][1] for b in dropped}
    apply_aliases(student, aliases)
    return names, aliases


@torch.no_grad()
def _damage(module: OnnxGraphModule, blocks: list[tuple[str, str, list[str]]], probe: tuple[torch.Tensor, ...]) -> list[float]:
    """Per block, 1 - mean cosine between the outputs with that block alone skipped and the outputs of
    the whole network: how much the student loses before any training (Veit et al. 2016: residual
    networks tolerate dropping single blocks unevenly, so which ones is measured, not assumed)."""
    def outputs(m: nn.Module) -> torch.Tensor:
        m.eval()
        out = m(*probe)
        return (out[0] if isinstance(out, tuple) else out).flatten(1).double()

    reference = outputs(module)
    damage = []
    for add_output, skip, _ in blocks:
        trial = copy.deepcopy(module)
        apply_aliases(trial, {add_output: skip})
        damage.append(float(1 - F.cosine_similarity(outputs(trial), reference, dim=1).mean()))
    return damage
