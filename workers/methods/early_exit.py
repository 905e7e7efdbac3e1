"""early_exit: classifier heads at chosen depths, trained by distillation from the model's own final
head on cached (pooled) features with the backbone frozen; a confidence threshold chosen on held-out
data; and a deployable ONNX model in which computation stops at the exit taken (workers.dynamic)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import onnx
import torch

from workers.fixed_batch import chunks

from service.core.errors import CompressionFailed, InvalidInput
from service.core.methods.early_exit import EarlyExitStep
from workers.constant_folding import fold
from workers.factorization.layers import macs
from workers.dynamic.heads import Exit, policy_table, pool, pooling_kernel, train_heads
from workers.dynamic.onnx_exits import deployable
from workers.steps import StepContext, StepData, StepResult
from workers.pruning.layers import weighted_layers
from workers.trainable.device import training_device
from workers.trainable.run import TrainableRun

name = "early_exit"
SPEC = EarlyExitStep
DEFAULT_THRESHOLDS = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999]
MAX_DEFAULT_EXITS = 3
TIMED_SAMPLES = 300


def _choose_exits(names: list[str], cumulative: list[int], total: int, asked: list[str] | None) -> list[str]:
    if asked is not None:
        unknown = [n for n in asked if n not in names[:-1]]
        if unknown:
            raise InvalidInput(f"exits must name layers before the last one; unknown or last: {unknown}; candidates: {names[:-1]}", code="unknown_layer")
        return sorted(asked, key=names.index)
    # Exits only pay where little of the model has run: candidates within the first half of its MACs.
    early = [n for n, c in zip(names[:-1], cumulative[:-1]) if c <= total / 2]
    if len(early) <= MAX_DEFAULT_EXITS:
        return early
    picks = np.linspace(0, len(early) - 1, MAX_DEFAULT_EXITS).round().astype(int)
    return [early[i] for i in sorted(set(picks))]


def _features(run: TrainableRun, layer: torch.nn.Module, exit_: Exit, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The exit's pooled input features for every sample (the backbone run once, in batches)."""
    captured: list[torch.Tensor] = []

    def hook(_m: torch.nn.Module, _args: tuple, output: torch.Tensor) -> None:
        captured.append(pool(output.detach().float().cpu(), exit_))

    handle = layer.register_forward_hook(hook)
    device = training_device()
    run.module.to(device).eval()
    fixed = run.data.fixed_batch
    real_rows = []
    with torch.no_grad():
        for idx, real in chunks(len(inputs[0]), fixed or 256, fixed is not None):
            run.module(*(t[torch.from_numpy(idx)].to(device) for t in inputs))
            real_rows.append(real)
    handle.remove()
    run.module.cpu()
    return torch.cat([features[:real] for features, real in zip(captured, real_rows)])


def _ort_time(original: onnx.ModelProto, exited: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> tuple[float, float, list[int]]:
    """Mean ms per sample at batch 1 for both models, timed interleaved; and the exit each sample took."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    a = ort.InferenceSession(original.SerializeToString(), options, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(exited.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for feed in feeds[:5]:
        a.run(None, feed)
        b.run(None, feed)
    times_a, times_b, taken = [], [], []
    for feed in feeds:
        start = time.perf_counter()
        a.run(None, feed)
        times_a.append(time.perf_counter() - start)
        start = time.perf_counter()
        out = b.run(None, feed)
        times_b.append(time.perf_counter() - start)
        taken.append(int(out[1]))
    return 1000 * float(np.mean(times_a)), 1000 * float(np.mean(times_b)), taken


def apply(model: onnx.ModelProto, spec: EarlyExitStep, data: StepData, ctx: StepContext) -> StepResult:
    if not data.available:
        raise CompressionFailed("early_exit trains its heads on data: submit the job with a dataset_id", code="dataset_required")
    ctx.progress(0.0, "converting the model to a trainable form")
    run = TrainableRun(model, data)
    if run.eval_teacher.dim() != 2 or run.eval_teacher.shape[1] < 2:
        raise CompressionFailed("early_exit needs a classifier: the model's first output must be [batch, classes] logits", code="not_a_classifier")
    for p in run.module.parameters():
        p.requires_grad_(False)  # the backbone is frozen: the final exit keeps the original's answers exactly
    layers = weighted_layers(run.module)
    names = list(layers)
    seen = run.inputs_seen(layers)
    layer_macs = [macs(layers[n], seen[n]) if n in seen else 0 for n in names]
    cumulative = list(np.cumsum(layer_macs))
    total = int(cumulative[-1]) if cumulative else 0
    chosen = _choose_exits(names, cumulative, total, spec.exits)
    if not chosen:
        raise CompressionFailed("no layer early enough for an exit (within the first half of the model's MACs); name `exits` explicitly",
                                code="nothing_to_exit")
    keys = {run.module.layer_names[k]: k for k in run.module.layers}
    exits = []
    for i, layer_name in enumerate(chosen):
        ctx.progress(0.05 + 0.25 * i / len(chosen), f"caching features at {layer_name}")
        with torch.no_grad():
            shape = tuple(layers[layer_name](seen[layer_name]).shape[1:])
        exit_ = Exit(layer_name, run.module.sources[keys[layer_name]]["nodes"][-1], shape, pooling_kernel(shape, spec.head_grid),
                     hidden=spec.head_hidden, macs_prefix=int(cumulative[names.index(layer_name)]))
        exit_.train_features = _features(run, layers[layer_name], exit_, run.inputs)
        exit_.eval_features = _features(run, layers[layer_name], exit_, run.eval_inputs)
        exits.append(exit_)

    def on_epoch(epoch: int, epochs: int, loss: float) -> None:
        ctx.progress(0.3 + 0.5 * (epoch + 1) / epochs, f"training exit heads: epoch {epoch + 1}/{epochs}, loss {loss:.4f}", milestone=True)

    train_heads(exits, run.teacher, run.labels, spec.epochs, spec.temperature, spec.alpha, on_epoch=on_epoch)
    table = policy_table(exits, run.eval_teacher, run.eval_labels, total, spec.thresholds or DEFAULT_THRESHOLDS)
    baseline = run.quality()
    within = [row for row in table if baseline - row["accuracy"] <= spec.max_accuracy_drop + 1e-12 and row["exit_shares"][-1] < 1.0]
    if not within:
        raise CompressionFailed(
            f"no threshold keeps the accuracy within {spec.max_accuracy_drop} of {baseline:.4f} while any sample exits early "
            f"(best: {max(table, key=lambda r: r['accuracy'])}); raise max_accuracy_drop, train longer (epochs) or choose later exits",
            code="early_exit_target_missed")
    best = min(within, key=lambda row: row["average_macs"])
    ctx.progress(0.85, f"building the deployable model (threshold {best['threshold']})", milestone=True)
    result = deployable(fold(model), exits, best["threshold"])
    onnx.checker.check_model(result)
    eval_data = run.data.evaluation or run.data
    feeds = [{k: v[i:i + 1] for k, v in eval_data.inputs.items()} for i in range(min(TIMED_SAMPLES, eval_data.samples))]
    ctx.progress(0.9, f"timing both models at batch 1 on {len(feeds)} samples")
    original_ms, exited_ms, taken = _ort_time(model, result, feeds)
    report: dict[str, Any] = {
        "exits": [{"layer": e.layer, "tensor": e.tensor, "feature_shape": list(e.feature_shape), "pooling_kernel": e.kernel,
                   "head_parameters": e.head_parameters, "head_macs": e.head_macs,
                   "macs_to_here": e.macs_prefix, "share_of_model_macs": round(e.macs_prefix / max(1, total), 4)} for e in exits],
        "model_macs": total,
        "quality_metric": run.metric,
        "original_score": baseline,
        "thresholds": table,
        "chosen": {**best, "mac_reduction": round(1 - best["average_macs"] / max(1, total), 4), "accuracy_drop": round(baseline - best["accuracy"], 5)},
        "deployable": {
            "form": "nested ONNX If: computation stops at the exit taken; outputs: the original's first output and exit_index",
            "threshold_initializer": "early_exit_threshold",
            "ms_per_sample_batch1": {"original": round(original_ms, 4), "early_exit": round(exited_ms, 4)},
            "time_reduction": round(1 - exited_ms / original_ms, 4) if original_ms else None,
            "exit_shares_measured": [round(taken.count(i) / max(1, len(taken)), 4) for i in range(len(exits) + 1)],
            "note": "a batch leaves at an exit only when every sample in it is confident: the saving is per sample at batch 1",
        },
        "evaluated_on": run.evaluated_on,
    }
    return StepResult(model=result, report=report)
