"""depthwise_separable: standard K x K convolutions replaced by depthwise K x K + pointwise 1x1,
initialised to the best rank-1 fit per input channel, then distilled from the original model. The
pair is written into the user's own graph (the Conv node becomes the depthwise one, with `group`, and
a 1x1 Conv follows), so input/output names and dynamic axes stay."""

from __future__ import annotations

from typing import Any

import onnx
from torch import nn

from service.core.errors import CompressionFailed
from service.core.methods.depthwise_separable import DepthwiseSeparableStep
from workers.factorization.layers import depthwise_separable, macs, parameters
from workers.steps import StepContext, StepData, StepResult
from workers.trainable.run import TrainableRun

name = "depthwise_separable"
SPEC = DepthwiseSeparableStep
DEFAULT_EPOCHS = 3  # a bigger change than pruning: distillation needs a few passes


def apply(model: onnx.ModelProto, spec: DepthwiseSeparableStep, data: StepData, ctx: StepContext) -> StepResult:
    ctx.progress(0.0, "converting the model to a trainable form")
    run = TrainableRun(model, data)
    layers = {run.module.layer_names[k]: m for k, m in run.module.layers.items() if isinstance(m, nn.Conv2d)}
    run.check_named(layers, spec.layers, "convolutions")
    baseline = run.quality()
    seen = run.inputs_seen(layers)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for layer_name, layer in layers.items():
        if spec.layers is not None and layer_name not in spec.layers:
            continue
        if spec.layers is None and layer.in_channels < spec.min_in_channels:
            skipped.append({"layer": layer_name, "why": f"{layer.in_channels} input channel(s) (min_in_channels {spec.min_in_channels})"})
            continue
        found = depthwise_separable(layer)
        if found is None:
            skipped.append({"layer": layer_name, "why": "1x1 or already grouped"})
            continue
        replacement, facts = found
        # Weights only (the bias is unchanged), to compare with 1/O + 1/K^2.
        ratio = (replacement[0].weight.numel() + replacement[1].weight.numel()) / layer.weight.numel()
        x = seen.get(layer_name)
        rows.append({"layer": layer_name, "kernel": list(layer.kernel_size), "in_channels": layer.in_channels, "out_channels": layer.out_channels,
                     "parameters_before": parameters(layer), "parameters_after": parameters(replacement),
                     "weight_ratio": round(ratio, 5), **facts, "ratio_vs_expected": round(ratio / facts["expected_ratio"], 4),
                     "macs_before": macs(layer, x) if x is not None else None, "macs_after": macs(replacement, x) if x is not None else None})
        run.replace(layer_name, replacement)
    if not rows:
        raise CompressionFailed("no convolution to replace: depthwise-separable replaces K x K convolutions with groups 1 "
                                f"({_skipped_summary(skipped) or 'this model has none'})", code="nothing_to_replace")
    after_replacing = run.quality()

    def on_epoch(epoch: int, epochs: int, loss: float) -> None:
        ctx.progress(0.1 + 0.8 * (epoch + 1) / epochs, f"distilling into the separable model: epoch {epoch + 1}/{epochs}, loss {loss:.4f}", milestone=True)

    epochs = spec.finetune_epochs if spec.finetune_epochs is not None else (DEFAULT_EPOCHS if data.available else 0)
    outcome = run.finetune(epochs, spec.training, on_epoch, distil=True)
    final = run.quality()
    ctx.progress(0.95, "writing the separable convolutions into the model", milestone=True)
    result = run.to_onnx()
    return StepResult(model=result, report={
        "layers": rows,
        "left_alone": skipped,
        "quality_metric": run.metric,
        "quality": {"original": baseline, "replaced": after_replacing, "after_distillation": final},
        "distillation": outcome,
        "evaluated_on": run.evaluated_on,
    })


def _skipped_summary(skipped: list[dict], shown: int = 3) -> str:
    """Why layers were passed over, grouped by reason (a MobileNet has dozens of 1x1 and depthwise
    convolutions: one line each would bury the message)."""
    by_reason: dict[str, list[str]] = {}
    for row in skipped:
        by_reason.setdefault(row["why"], []).append(row["layer"])
    parts = []
    for why, layers in by_reason.items():
        more = f" and {len(layers) - shown} more" if len(layers) > shown else ""
        parts.append(f"{why}: {', '.join(layers[:shown])}{more}")
    return "; ".join(parts)
