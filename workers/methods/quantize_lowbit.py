"""The binary quantize mode: weights = sign x per-channel scale, trained with a straight-through
estimator, stored at 1 bit (int4 is in workers.quantization.int4)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.nn.utils import parametrize

from service.core.errors import CompressionFailed
from service.core.specs import QuantizeStep
from workers.clustering.storage import find_initializer, replace_initializers
from workers.steps import StepContext, StepData
from workers.onnx_weights import as_rows, from_rows, weight_layers
from workers.pruning.layers import weighted_layers
from workers.trainable.to_onnx import example_input, export, has_dynamic_batch
from workers.trainable.run import TrainableRun
from workers.trainable.write_back import trained_onnx
from workers.trainable.training import STUDENT_LR


class Binarize(nn.Module):
    """weight -> alpha * sign(weight) with alpha the per-output-channel mean |weight|; the backward
    pass treats it as identity (straight-through), so the latent float weights keep learning."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        alpha = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
        binary = torch.where(w >= 0, alpha, -alpha)
        return w + (binary - w).detach()


BITS = "bin__table"


def _encode_binary(name: str, weight: np.ndarray, prefix: str, output_axis: int = 0) -> tuple[list, list]:
    """Nodes computing `name` from packed sign bits and per-output-channel scales (channels along
    `output_axis` of the stored tensor; a binarised weight's |w| is its channel's scale)."""
    alpha = np.abs(np.moveaxis(weight, output_axis, 0)).reshape(weight.shape[output_axis], -1).max(axis=1).astype(np.float32)
    bits = np.packbits(weight.ravel() > 0)
    n = weight.size
    scale_shape = [1] * weight.ndim
    scale_shape[output_axis] = weight.shape[output_axis]
    inits = [
        numpy_helper.from_array(bits, f"{prefix}b"),
        numpy_helper.from_array(alpha.reshape(scale_shape), f"{prefix}s"),
        numpy_helper.from_array(np.array([-1], np.int64), f"{prefix}f"),
        numpy_helper.from_array(np.array([0], np.int64), f"{prefix}0"),
        numpy_helper.from_array(np.array([n], np.int64), f"{prefix}n"),
        numpy_helper.from_array(np.array(weight.shape, np.int64), f"{prefix}h"),
        numpy_helper.from_array(np.array(2.0, np.float32), f"{prefix}2"),
        numpy_helper.from_array(np.array(1.0, np.float32), f"{prefix}1"),
    ]
    nodes = [
        helper.make_node("Cast", [f"{prefix}b"], [f"{prefix}B"], to=TensorProto.INT32),
        helper.make_node("Gather", [BITS, f"{prefix}B"], [f"{prefix}G"], axis=0),  # byte -> its 8 bits
        helper.make_node("Reshape", [f"{prefix}G", f"{prefix}f"], [f"{prefix}R"]),
        helper.make_node("Slice", [f"{prefix}R", f"{prefix}0", f"{prefix}n"], [f"{prefix}S"]),
        helper.make_node("Cast", [f"{prefix}S"], [f"{prefix}F"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{prefix}F", f"{prefix}2"], [f"{prefix}M"]),
        helper.make_node("Sub", [f"{prefix}M", f"{prefix}1"], [f"{prefix}P"]),  # {0,1} -> {-1,+1}
        helper.make_node("Reshape", [f"{prefix}P", f"{prefix}h"], [f"{prefix}W"]),
        helper.make_node("Mul", [f"{prefix}W", f"{prefix}s"], [name]),
    ]
    return nodes, inits


def _binary_initializers(model: onnx.ModelProto, spec: QuantizeStep) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Nothing to train: binarise the ONNX weights where they are stored (sign x the per-output-channel
    mean |w|, as the straight-through path starts from), on any graph ONNX Runtime runs."""
    layers = weight_layers(model)
    names = list(layers)
    chosen = names[1:-1] if spec.binary_keep_first_last and len(names) > 2 else names
    if not chosen:
        raise CompressionFailed("no layer left to binarize (the first and last are kept in float)", code="nothing_to_quantize")
    inits = {i.name: i for i in model.graph.initializer}
    replacements = {}
    for index, layer_name in enumerate(chosen):
        layer = layers[layer_name]
        rows = as_rows(numpy_helper.to_array(inits[layer.initializer]), layer)
        alpha = np.abs(rows).reshape(rows.shape[0], -1).mean(axis=1).reshape([-1] + [1] * (rows.ndim - 1))
        binarised = from_rows(np.where(rows >= 0, alpha, -alpha).astype(np.float32), layer)
        replacements[layer.initializer] = _encode_binary(layer.initializer, binarised, f"bn{index}", layer.output_axis)
    result = replace_initializers(model, replacements)
    table = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1)
    result.graph.initializer.append(numpy_helper.from_array(table, BITS))
    float_layers = [{"layer": n, "why": "first or last layer, kept float (binary_keep_first_last)"} for n in names if n not in chosen]
    return result, {"binarized_layers": chosen, "float_layers": float_layers, "quality": {}, "path": "onnx_initializers",
                    "why_no_conversion": "nothing is trained, so the ONNX weights were binarised where they are stored (no conversion to torch)"}


def binary(model: onnx.ModelProto, spec: QuantizeStep, data: StepData, ctx: StepContext) -> tuple[onnx.ModelProto, dict[str, Any]]:
    if spec.finetune_epochs and not data.available:
        raise CompressionFailed("binary fine-tuning trains on data: submit the job with a dataset_id", code="dataset_required")
    if not spec.finetune_epochs:
        return _binary_initializers(model, spec)
    run = TrainableRun(model, data)  # the original's outputs are taken before any weight is binarised
    module = run.module
    layers = weighted_layers(module)
    names = list(layers)
    chosen = names[1:-1] if spec.binary_keep_first_last and len(names) > 2 else names
    if not chosen:
        raise CompressionFailed("no layer left to binarize (the first and last are kept in float)", code="nothing_to_quantize")
    for layer_name in chosen:
        parametrize.register_parametrization(layers[layer_name], "weight", Binarize())
    scores: dict[str, Any] = {}
    if data.available:
        scores["before_finetune"] = run.quality()
        if spec.finetune_epochs:
            def on_epoch(epoch: int, total: int, loss: float) -> None:
                ctx.progress(0.1 + 0.8 * (epoch + 1) / total, f"straight-through fine-tuning: epoch {epoch + 1}/{total}, loss {loss:.4f}", milestone=True)

            # Binarizing is a big change: straight-through training needs the larger student step. The
            # best epoch on held-out data is kept (the binarised state counts as epoch 0).
            outcome = run.finetune(spec.finetune_epochs, spec.training, on_epoch, default_lr=STUDENT_LR)
            scores["finetune"] = {k: v for k, v in outcome.items() if k != "losses"}
        scores["after"] = run.quality()
    for layer_name in chosen:
        parametrize.remove_parametrizations(layers[layer_name], "weight", leave_parametrized=True)
    example = tuple(torch.from_numpy(example_input(model, n)) for n in module.input_names)
    exported = trained_onnx(model, module, example, lambda: export(module, example, module.input_names, module.output_names, has_dynamic_batch(model), fold_constants=False))
    replacements = {}
    for index, layer_name in enumerate(chosen):
        weight = layers[layer_name].weight.detach().numpy()
        found = find_initializer(exported, weight)
        if found is None:
            raise CompressionFailed(f"could not locate layer {layer_name}'s weight in the exported model", code="export_failed")
        init_name, transposed = found
        replacements[init_name] = _encode_binary(init_name, weight.T.copy() if transposed else weight, f"bn{index}")
    result = replace_initializers(exported, replacements)
    table = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1)
    result.graph.initializer.append(numpy_helper.from_array(table, BITS))
    float_layers = [{"layer": n, "why": "first or last layer, kept float (binary_keep_first_last)"} for n in names if n not in chosen]
    return result, {"binarized_layers": chosen, "float_layers": float_layers, "quality": scores}

