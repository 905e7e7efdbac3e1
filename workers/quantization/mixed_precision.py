"""Mixed precision: rank a candidate's layers by how much quantizing each one alone costs, then
leave the most sensitive in float until the quality target holds.

The ranking quantizes one layer at a time (ORT's `nodes_to_quantize`), so it measures each layer's
own damage rather than its share of a joint error; doubling the float set (1, 2, 4, ...) then finds
a small set that meets the target with a handful of measurements.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import onnx

from service.core.specs import QualityTarget
from workers.quantization.candidates import Candidate
from workers.quantization.measure import Measured

MAX_RANKED = 48  # the largest layers; each costs one quantization and one pass over the samples


def quantizable_layers(model: onnx.ModelProto, op_types: list[str]) -> list[str]:
    """Named nodes of the quantized operator types that hold a constant weight, largest first."""
    sizes = {i.name: math.prod(i.dims) for i in model.graph.initializer}
    layers = [(max((sizes.get(x, 0) for x in n.input), default=0), n.name) for n in model.graph.node
              if n.op_type in op_types and n.name and any(x in sizes for x in n.input)]
    return [name for size, name in sorted(layers, key=lambda t: -t[0]) if size > 0][:MAX_RANKED]


def rank(layers: list[str], measure_only: Callable[[str], Measured], progress: Callable[[float, str], None]) -> list[dict[str, Any]]:
    """[{layer, cosine, accuracy_drop, damage}] most damaging first."""
    rows = []
    for i, layer in enumerate(layers):
        progress(i / max(1, len(layers)), f"sensitivity: layer {i + 1}/{len(layers)} quantized alone")
        result = measure_only(layer)
        if result.error is not None:
            continue
        damage = result.accuracy_drop if result.accuracy_drop is not None else 1.0 - (result.cosine or 0.0)
        rows.append({"layer": layer, "cosine": result.cosine, "accuracy_drop": result.accuracy_drop, "damage": round(float(damage), 6)})
    return sorted(rows, key=lambda r: -r["damage"])


def repair(candidate: Candidate, ranked: list[dict[str, Any]], target: QualityTarget, measure_with_float: Callable[[Candidate], Measured]) -> tuple[Measured | None, list[Measured]]:
    """The smallest float set (doubling) that meets the target: (that candidate or None, every attempt)."""
    attempts = []
    count = 1
    while count <= len(ranked):
        trial = measure_with_float(candidate.keeping_float([r["layer"] for r in ranked[:count]]))
        attempts.append(trial)
        if trial.meets(target):
            return trial, attempts
        if count == len(ranked):
            break
        count = min(len(ranked), count * 2)
    return None, attempts
