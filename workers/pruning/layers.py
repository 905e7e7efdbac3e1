"""Which layers of a converted model pruning may touch, by the names users see in reports."""

from __future__ import annotations

from torch import nn

from service.core.errors import InvalidInput
from service.core.specs import PruneStep
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
    unknown = sorted((set(spec.skip_layers) | set(spec.layer_amounts)) - set(layers))
    if unknown:
        raise InvalidInput(f"unknown layer name(s) {unknown}; the model's prunable layers are {sorted(layers)}", code="unknown_layer")
    skip = set(spec.skip_layers)
    if not spec.prune_output_layer:
        skip.add(output_layer(module))
    return {name: layer for name, layer in layers.items() if name not in skip}
