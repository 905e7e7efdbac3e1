"""Unstructured magnitude pruning on the ONNX initializers themselves (no conversion, no training):
the path of every prune step that trains nothing, so it works on any graph ONNX Runtime runs."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from service.core.specs import PruneStep
from workers.layer_names import require_known
from workers.onnx_weights import weight_layers


def prune(model: onnx.ModelProto, spec: PruneStep) -> tuple[onnx.ModelProto, list[dict[str, Any]], float]:
    """Zero the smallest |w| (L1 and L2 rank the same single weights) per the step's amount and scope;
    returns the model, a per-layer table and the share of the chosen weights removed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    layers = weight_layers(out)
    require_known([*spec.skip_layers, *spec.layer_amounts], layers, "prunable layers")
    names = list(layers)
    if names and not spec.prune_output_layer:
        names = names[:-1]  # the output layer, as in the trainable path
    names = [n for n in names if n not in spec.skip_layers]
    inits = {i.name: i for i in out.graph.initializer}
    arrays = {n: numpy_helper.to_array(inits[layers[n].initializer]).copy() for n in names}
    if not arrays:
        return out, [], 0.0
    thresholds: dict[str, float] = {}
    if spec.scope == "global" and not spec.layer_amounts:
        everything = np.concatenate([np.abs(a).ravel() for a in arrays.values()])
        cut = float(np.quantile(everything, spec.amount)) if everything.size else 0.0
        thresholds = dict.fromkeys(arrays, cut)
    else:
        for n, a in arrays.items():
            thresholds[n] = float(np.quantile(np.abs(a), spec.layer_amounts.get(n, spec.amount)))
    rows, removed, total = [], 0, 0
    for n, a in arrays.items():
        mask = np.abs(a) <= thresholds[n]
        a[mask] = 0.0
        tensor = layers[n].initializer
        inits[tensor].CopyFrom(numpy_helper.from_array(a.astype(np.float32), tensor))
        removed += int(mask.sum())
        total += a.size
        rows.append({"layer": n, "initializer": tensor, "shape_before": list(a.shape), "shape_after": list(a.shape),
                     "sparsity": float(mask.mean()), "removed_fraction": 0.0, "importance_threshold": thresholds[n]})
    return out, rows, removed / max(1, total)
