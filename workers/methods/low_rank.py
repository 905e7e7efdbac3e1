"""low_rank: factorise linear layers (truncated SVD) and K x K convolutions (Tucker-2), then fine-tune
on the job's data (labels, or the original's outputs) keeping the best epoch. The factors are written
back into the user's own graph (an extra MatMul / two 1x1 Convs per layer), so names and dynamic axes
stay. Reports per layer: rank, parameters and MACs before/after, and each layer's time before/after
(torch, on the input that layer sees)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from service.core.errors import CompressionFailed
from service.core.methods.low_rank import LowRankStep
from workers.factorization.layers import factorise_conv, factorise_linear, macs, parameters
from workers.steps import StepContext, StepData, StepResult
from workers.pruning.layers import weighted_layers
from workers.trainable.run import TrainableRun

name = "low_rank"
SPEC = LowRankStep
TIMING_RUNS = 20


def _time_ms(layer: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        layer(x)
        times = []
        for _ in range(TIMING_RUNS):
            start = time.perf_counter()
            layer(x)
            times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def apply(model: onnx.ModelProto, spec: LowRankStep, data: StepData, ctx: StepContext) -> StepResult:
    ctx.progress(0.0, "converting the model to a trainable form")
    run = TrainableRun(model, data)
    layers = weighted_layers(run.module)
    run.check_named(layers, spec.layers)
    baseline = run.quality()
    seen = run.inputs_seen(layers)
    rows: list[dict[str, Any]] = []
    last = list(layers)[-1] if layers else None
    for i, (layer_name, layer) in enumerate(layers.items()):
        ctx.progress(0.05 + 0.15 * i / max(1, len(layers)), f"factorising {layer_name}")
        if spec.layers is not None and layer_name not in spec.layers:
            continue
        if parameters(layer) < spec.min_layer_parameters or layer_name not in seen:
            continue
        if layer_name == last and not spec.output_layer and spec.layers is None:
            continue
        if isinstance(layer, nn.Linear):
            found = factorise_linear(layer, spec.rank_ratio, spec.energy)
        elif isinstance(layer, nn.Conv2d) and spec.convolutions:
            found = factorise_conv(layer, spec.rank_ratio, spec.energy)
        else:
            found = None
        if found is None:
            continue
        replacement, ranks = found
        x = seen[layer_name]
        rows.append({"layer": layer_name, "kind": "linear (SVD)" if isinstance(layer, nn.Linear) else "conv (Tucker-2)", **ranks,
                     "parameters_before": parameters(layer), "parameters_after": parameters(replacement),
                     "macs_before": macs(layer, x), "macs_after": macs(replacement, x),
                     "layer_ms_before": round(_time_ms(layer, x), 4), "layer_ms_after": round(_time_ms(replacement, x), 4)})
        run.replace(layer_name, replacement)
    if not rows:
        raise CompressionFailed("no layer stores fewer numbers when factorised at this rank/energy: lower `energy` or `rank_ratio`, "
                                "or `min_layer_parameters`", code="nothing_to_factorise")
    after_factorising = run.quality()

    def on_epoch(epoch: int, epochs: int, loss: float) -> None:
        ctx.progress(0.2 + 0.7 * (epoch + 1) / epochs, f"fine-tuning the factorised model: epoch {epoch + 1}/{epochs}, loss {loss:.4f}", milestone=True)

    outcome = run.finetune(spec.finetune_epochs, spec.training, on_epoch)
    final = run.quality()
    ctx.progress(0.95, "writing the factors into the model", milestone=True)
    result = run.to_onnx()
    before = sum(r["parameters_before"] for r in rows)
    after = sum(r["parameters_after"] for r in rows)
    report = {
        "layers": rows,
        "factorised_parameters": {"before": before, "after": after, "ratio": round(before / max(1, after), 3)},
        "macs_in_factorised_layers": {"before": sum(r["macs_before"] for r in rows), "after": sum(r["macs_after"] for r in rows)},
        "quality_metric": run.metric,
        "quality": {"original": baseline, "factorised": after_factorising, "after_finetune": final},
        "finetune": outcome,
        "evaluated_on": run.evaluated_on,
    }
    return StepResult(model=result, report=report)
