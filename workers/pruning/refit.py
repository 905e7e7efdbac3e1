"""Least-squares re-fitting after structured pruning: a layer whose inputs lost channels (a
feed-forward block's output projection after hidden units went, the next convolution after filters
went) gets the weights and bias that best reproduce, on the calibration data, what it output before
the pruning step from what it receives now: min ||[X' 1] [W' b']^T - Y||^2 + ridge, with Y the layer's
output in the model before the step and X' its input in the pruned model. It is ThiNet's (Luo et al.
2017) and Kwon et al. 2022's ("A Fast Post-Training Pruning Framework for Transformers", mask
tuning) reconstruction, so fine-tuning starts from a model that is already close, or no fine-tuning
is needed.

Layers are refitted in graph order, each on inputs through the layers already refitted, so a later
layer also absorbs what an earlier one could not reproduce. Statistics are accumulated batch by batch
(X'^T X', X'^T Y), so memory is one layer's k x k and k x n, whatever the number of positions. Padded
token positions are left out as for the Hessians (workers.hessian)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from workers.activations import probe_session
from workers.hessian import Batch, at_layer, input_rows, supported
from workers.onnx_weights import layer_name
from workers.pruning.graph import OnnxGraph, Projection

RIDGE = 1e-3  # share of the mean diagonal of X'^T X' added to it: a kept channel that never fired stays determined


def narrowed(before: dict[str, int], layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The layers (of those the refit supports) whose input width shrank since `before` was taken."""
    return {name: layer for name, layer in layers.items() if name in before and supported(layer) and _in_width(layer) < before[name]}


def input_widths(layers: dict[str, nn.Module]) -> dict[str, int]:
    return {name: _in_width(layer) for name, layer in layers.items() if supported(layer)}


def _in_width(layer: nn.Module) -> int:
    return int(layer.weight.shape[1])


def _output_rows(layer: nn.Module, y: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        if real is not None and y.dim() == 3 and tuple(y.shape[:2]) == tuple(real.shape):
            return y[real.bool()]
        return y.reshape(-1, y.shape[-1])
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])  # [B, C, H, W] -> positions x channels, as the patches


def _at(module: nn.Module, layer: nn.Module, batch: tuple, want_input: bool, real: torch.Tensor | None) -> torch.Tensor:
    """The layer's input rows (want_input) or output rows on one batch, the forward stopped there."""
    x, y = at_layer(module, layer, batch)
    return input_rows(layer, x.double(), real) if want_input else _output_rows(layer, y.double(), real)


@torch.no_grad()
def refit_layer(before: nn.Module, before_layer: nn.Module, after: nn.Module, layer: nn.Module, batches: Iterable[Batch],
                removed_outputs: list[int] | None = None) -> dict[str, Any]:
    """Sets `layer`'s weight (and bias) in the pruned module `after` to the least-squares fit of
    `before_layer`'s outputs in `before` (those it still has: `removed_outputs` were pruned too);
    returns the relative output error before and after the refit."""
    kept = None
    if removed_outputs:
        gone = set(removed_outputs)
        kept = torch.tensor([j for j in range(int(before_layer.weight.shape[0])) if j not in gone])
    xtx = xty = None
    yty = 0.0
    for batch, real in batches:
        x = _at(after, layer, batch, True, real)
        y = _at(before, before_layer, batch, False, real)
        if kept is not None:
            y = y[:, kept]
        if layer.bias is not None:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        xtx = x.T @ x if xtx is None else xtx + x.T @ x
        xty = x.T @ y if xty is None else xty + x.T @ y
        yty += float((y * y).sum())
    assert xtx is not None and xty is not None
    current = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
    if layer.bias is not None:
        current = torch.cat([current, layer.bias.detach().double().unsqueeze(1)], dim=1)
    fitted, before_error, after_error = solve(xtx.numpy(), xty.numpy(), yty, current.numpy(), layer.bias is not None)
    if after_error >= before_error:  # never worse on the data it was fitted on (a degenerate fit keeps the pruned weights)
        return {"output_error_pruned": round(before_error, 6), "output_error_refit": round(before_error, 6), "kept": "pruned weights"}
    features = current.shape[1] - (1 if layer.bias is not None else 0)
    layer.weight.copy_(torch.from_numpy(fitted[:, :features]).reshape(layer.weight.shape).to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.copy_(torch.from_numpy(fitted[:, features]).to(layer.bias.dtype))
    return {"output_error_pruned": round(before_error, 6), "output_error_refit": round(after_error, 6), "kept": "refitted"}


@torch.no_grad()
def refit(before: nn.Module, before_layers: dict[str, nn.Module], after: nn.Module, layers: dict[str, nn.Module],
          batches: Callable[[], list[Batch]], removed_outputs: dict[str, list[int]] | None = None,
          progress: Callable[[int, int, str], None] | None = None) -> list[dict[str, Any]]:
    """Every layer of `layers` (graph order) refitted to its counterpart of the same name in `before`
    (`removed_outputs`: the output channels pruned from each, left out of its target)."""
    before.eval()
    after.eval()
    rows = []
    for index, (name, layer) in enumerate(layers.items()):
        if progress is not None:
            progress(index, len(layers), name)
        rows.append({"layer": name, **refit_layer(before, before_layers[name], after, layer, batches(), (removed_outputs or {}).get(name))})
    return rows


def solve(xtx: np.ndarray, xty: np.ndarray, yty: float, current: np.ndarray, bias: bool) -> tuple[np.ndarray, float, float]:
    """The ridge least-squares fit [out, in (+1)] from accumulated X^T X, X^T Y, Y.Y (the last input
    column the constant 1 when `bias`; it is not damped), and the relative output error
    ||X w^T - Y||^2 / ||Y||^2 of `current` and of the fit."""
    def error(w: np.ndarray) -> float:
        return max(0.0, float(np.einsum("ij,jk,ik->", w, xtx, w) - 2 * np.einsum("ij,ji->", w, xty) + yty)) / max(yty, 1e-30)

    damped = xtx.copy()
    features = damped.shape[0] - (1 if bias else 0)
    index = np.arange(features)
    damped[index, index] += RIDGE * float(np.diag(xtx)[:features].mean()) + 1e-12
    try:
        fitted = np.linalg.solve(damped, xty).T
    except np.linalg.LinAlgError:  # non-finite activations on the client's data: the pruned weights stay, the step goes on
        return current, error(current), error(current)
    if not np.isfinite(fitted).all():
        return current, error(current), error(current)
    return fitted, error(current), error(fitted)


def refit_projection_inputs(original: onnx.ModelProto, pruned: onnx.ModelProto, projections: list[Projection], feeds: dict[str, np.ndarray],
                            real: np.ndarray | None, threads: int) -> list[dict[str, Any]]:
    """The graph side, for projections narrowed on the graph (an attention block's output projection after
    heads went): each refitted in graph order (in place on `pruned`, whose node list matches the
    original's) to the output, bias included, the original computes there. `real`: [samples, positions]
    of the token positions that count (padding left out), or None."""
    projections = sorted(projections, key=lambda p: p.index)
    source = OnnxGraph(original)
    targets = [p.node.output[0] if p.bias_index is None else source.nodes[p.bias_index].output[0] for p in projections]
    wanted = probe_session(original, targets, threads).run(targets, feeds)
    rows = []
    for proj, y in zip(projections, wanted):
        graph = OnnxGraph(pruned)
        node = graph.nodes[proj.index]
        weight_name = node.input[1]
        if weight_name not in graph.inits:
            continue
        x = probe_session(pruned, [node.input[0]], threads).run([node.input[0]], feeds)[0]
        x, y = _token_rows(x, real), _token_rows(y, real)
        stored = numpy_helper.to_array(graph.inits[weight_name]).astype(np.float64)
        w = stored.T if proj.output_axis == 1 else stored  # [out, in]
        bias_node = graph.nodes[proj.bias_index] if proj.bias_index is not None else node
        bias_input = next((i for i, name in enumerate(bias_node.input) if name == proj.bias), None) if proj.bias else None
        current = w
        if bias_input is not None:
            bias = graph.const(bias_node.input[bias_input])
            assert bias is not None
            current = np.concatenate([w, bias.astype(np.float64)[:, None]], axis=1)
            x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
        fitted, before, after = solve(x.T @ x, x.T @ y, float((y * y).sum()), current, bias_input is not None)
        row = {"layer": layer_name(proj.weight, proj.node), "output_error_pruned": round(before, 6), "output_error_refit": round(min(before, after), 6),
               "kept": "refitted" if after < before else "pruned weights"}
        rows.append(row)
        if after >= before:
            continue
        new_w = fitted[:, : w.shape[1]]
        graph.inits[weight_name].CopyFrom(numpy_helper.from_array((new_w.T if proj.output_axis == 1 else new_w).astype(np.float32), weight_name))
        if bias_input is not None:
            name = f"{weight_name}__refit_bias"  # its own tensor: exporters share equal biases between layers
            pruned.graph.initializer.append(numpy_helper.from_array(fitted[:, -1].astype(np.float32), name))
            bias_node.input[bias_input] = name
    return rows


def _token_rows(value: np.ndarray, real: np.ndarray | None) -> np.ndarray:
    value = value.astype(np.float64)
    if real is not None and value.ndim == 3 and value.shape[:2] == real.shape:
        return value[real.astype(bool)]
    return value.reshape(-1, value.shape[-1])
