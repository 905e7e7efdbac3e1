"""Which layers of a converted model pruning may touch, by the names users see in reports."""

from __future__ import annotations

from torch import nn

from service.core.specs import PruneStep
from workers.layer_names import require_known
from workers.trainable.from_onnx import OnnxGraphModule

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def weighted_layers(module: OnnxGraphModule) -> dict[str, nn.Module]:
    """User-facing name -> Linear/Conv module, in graph order."""
    return {module.layer_names[key]: layer for key, layer in module.layers.items() if isinstance(layer, PRUNABLE)}


def output_layer(module: OnnxGraphModule) -> str | None:
    names = list(weighted_layers(module))
    return names[-1] if names else None


def selected_layers(module: OnnxGraphModule, spec: PruneStep) -> dict[str, nn.Module]:
    layers = weighted_layers(module)
    require_known([*spec.skip_layers, *spec.layer_amounts], layers, "prunable layers")
    skip = set(spec.skip_layers)
    if not spec.prune_output_layer:
        skip.add(output_layer(module))
    return {name: layer for name, layer in layers.items() if name not in skip}


# Ops that act element by element (their other inputs being constants or the same channels): a
# neuron's value passes through them unmixed, so pruning it needs only its two linear layers.
ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Pow", "Sigmoid", "Relu", "Gelu", "Sqrt", "Identity", "Cast",
    "HardSigmoid", "HardSwish", "LeakyRelu", "Softplus", "Clip", "Neg", "Exp", "Mish", "Elu", "Selu", "Dropout",
}


def is_transformer(module: OnnxGraphModule) -> bool:
    """Attention: a matrix product of two computed tensors, or a softmax over scores."""
    layer_inputs = {ins[0] for kind, _, ins, _, _ in module.plan if kind == "layer"}
    return any(kind == "op" and target in ("Softmax",) for kind, target, _, _, _ in module.plan) or any(
        kind == "op" and target == "MatMul" and not (set(ins) & set(module._const_keys)) and ins[0] not in layer_inputs
        for kind, target, ins, _, _ in module.plan
    )


def mlp_hidden_layers(module: OnnxGraphModule) -> set[str]:
    """Layer keys whose outputs reach exactly one other layer through element-wise ops only: the first
    linear of a transformer's feed-forward block (its hidden units can be removed by narrowing it and
    the next layer's inputs, nothing else: no residual, reshape or attention touches them)."""
    consumers: dict[str, list[tuple]] = {}
    for step in module.plan:
        for name in step[2]:
            consumers.setdefault(name, []).append(step)
    constants = set(module._const_keys) | {""}
    found = set()
    for kind, key, _, outs, _ in module.plan:
        if kind == "layer" and _feeds_one_layer_elementwise(outs[0], consumers, constants, set(module.output_names)):
            found.add(key)
    return found


def _feeds_one_layer_elementwise(start: str, consumers: dict[str, list[tuple]], constants: set[str], outputs: set[str]) -> bool:
    chain, ends, pending = {start}, set(), []
    frontier = [start]
    while frontier:
        value = frontier.pop()
        if value in outputs or not consumers.get(value):
            return False
        for step in consumers[value]:
            if step[0] == "layer":
                ends.add(step[1])
            elif step[1] not in ELEMENTWISE:
                return False
            elif all(i in chain or i in constants for i in step[2]):
                for out in step[3]:
                    if out not in chain:
                        chain.add(out)
                        frontier.append(out)
            else:
                pending.append(step)  # another input may join the chain later (x * erf(x))
        if not frontier:
            ready = [s for s in pending if all(i in chain or i in constants for i in s[2])]
            pending = [s for s in pending if s not in ready]
            for step in ready:
                for out in step[3]:
                    if out not in chain:
                        chain.add(out)
                        frontier.append(out)
    return not pending and len(ends) == 1
