"""Students derived from the teacher: narrower (its most important neurons/channels), shallower
(shape-preserving layers removed) or low-rank (linear layers factorised by SVD)."""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

from service.core.errors import InvalidInput
from service.core.specs import StudentSpec
from workers.pruning.layers import is_transformer, mlp_hidden_layers, output_layer, weighted_layers
from workers.distillation.residual_depth import drop_residual_blocks, residual_blocks
from workers.distillation.transformer_depth import drop_blocks
from workers.factorization.layers import factorise_linear
from workers.trainable.from_onnx import OnnxGraphModule


def by_width(teacher: OnnxGraphModule, width: float, example: tuple[torch.Tensor, ...]) -> OnnxGraphModule:
    """Keep `width` of every hidden layer's channels, chosen by L2 norm; coupled layers shrink together.
    In a transformer, the feed-forward blocks' hidden units (what nothing but their two linears sees)."""
    student = copy.deepcopy(teacher)
    layers = weighted_layers(student)
    ignored = [layers[output_layer(student)]]
    if is_transformer(student):
        hidden = {student.layer_names[k] for k in mlp_hidden_layers(student)}
        if not hidden:
            raise InvalidInput("no feed-forward block of this transformer can be narrowed alone (e.g. GPT-2's Conv1D); "
                               "use a low_rank student", code="invalid_student")
        ignored = [layer for name, layer in layers.items() if name not in hidden]
    pruner = tp.pruner.MetaPruner(
        student, example_inputs=example, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=1.0 - width, ignored_layers=ignored, global_pruning=False,
    )
    pruner.step()
    return student


def _shape_preserving(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear):
        return layer.in_features == layer.out_features
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        same_padding = all(p == (k - 1) // 2 * d for p, k, d in zip(layer.padding, layer.kernel_size, layer.dilation)) if not isinstance(layer.padding, str) else False
        return layer.in_channels == layer.out_channels and all(s == 1 for s in layer.stride) and same_padding and all(k % 2 == 1 for k in layer.kernel_size)
    return False


def by_depth(teacher: OnnxGraphModule, spec: StudentSpec, probe: tuple[torch.Tensor, ...] | None = None) -> tuple[OnnxGraphModule, list[str]]:
    """Drop whole blocks: a transformer's (from its LayerNorms), a residual CNN's identity-shortcut blocks;
    otherwise (or with `drop_layers`) replace shape-preserving layers by identities."""
    if is_transformer(teacher):
        # A square linear in a transformer is an attention projection, not a block: whole blocks go instead.
        if spec.drop_layers:
            raise InvalidInput("a transformer's depth student drops whole blocks: give drop_count (every other block goes first), not drop_layers",
                               code="invalid_student")
        student = copy.deepcopy(teacher)
        dropped, student.block_aliases = drop_blocks(student, spec.drop_count)
        return student, dropped
    if not spec.drop_layers and residual_blocks(teacher):
        # Whole residual blocks, not single layers, when the network has them (see residual_depth).
        student = copy.deepcopy(teacher)
        dropped, student.block_aliases = drop_residual_blocks(student, spec.drop_count, probe)
        return student, dropped
    student = copy.deepcopy(teacher)
    names = {student.layer_names[k]: k for k in student.layers}
    droppable = [n for n, k in names.items() if _shape_preserving(student.layers[k]) and n != output_layer(student)]
    chosen = spec.drop_layers or droppable[-spec.drop_count:]
    bad = [n for n in chosen if n not in droppable]
    if bad or not chosen:
        raise InvalidInput(
            f"cannot drop {bad or 'any layer'}: only layers that map their input shape to itself can be removed; this model has {droppable or 'none'}",
            code="invalid_student",
        )
    for name in chosen:
        key = names[name]
        student.layers[key] = nn.Identity()
        # A batch norm right after a dropped layer would normalise statistics that no longer exist.
        outputs = next(step[3] for step in student.plan if step[0] == "layer" and step[1] == key)
        for kind, target, ins, _outs, _extra in student.plan:
            if kind == "layer" and ins == outputs and isinstance(student.layers[target], nn.modules.batchnorm._BatchNorm):
                student.layers[target] = nn.Identity()
    return student, chosen


def by_low_rank(teacher: OnnxGraphModule, spec: StudentSpec) -> tuple[OnnxGraphModule, dict[str, int]]:
    """Factorise each linear layer W (out x in) as (U_r S_r)(V_r^T) when that stores fewer numbers."""
    student = copy.deepcopy(teacher)
    ranks = {}
    for key, layer in list(student.layers.items()):
        if not isinstance(layer, nn.Linear):
            continue
        found = factorise_linear(layer, None, spec.energy, spec.rank)
        if found is None:
            continue
        student.layers[key], facts = found
        ranks[student.layer_names[key]] = facts["rank"]
    if not ranks:
        raise InvalidInput("no linear layer gets smaller at that rank/energy; lower `rank` or `energy`", code="invalid_student")
    return student, ranks


def reinitialise(module: nn.Module, seed: int) -> None:
    """Fresh random weights, for the from-scratch baseline."""
    torch.manual_seed(seed)
    for m in module.modules():
        if hasattr(m, "reset_parameters") and m is not module:
            m.reset_parameters()


def architecture(module: OnnxGraphModule) -> list[dict]:
    rows = []
    for key, layer in module.layers.items():
        shapes = [list(p.shape) for name, p in layer.named_parameters() if name.endswith("weight")]
        rows.append({"layer": module.layer_names[key], "type": type(layer).__name__, "weights": shapes,
                     "parameters": sum(p.numel() for p in layer.parameters())})
    return rows
