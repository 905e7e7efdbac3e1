"""GPTQ error feedback for int8 weights (Frantar et al. 2022), on the grid ONNX Runtime's quantizer chose.

ONNX Runtime's int8 quantizers (dynamic and static QDQ) round every weight to the nearest step. GPTQ
rounds the input channels one at a time and spreads each rounding error over the channels not yet
rounded, weighted by the layer's input statistics H = X^T X on the job's calibration data, so the
layer's *output* on that data moves as little as it can. The quantizer's own scales and zero points
are kept and only the int8 codes are replaced, so the model's operators, size and speed are exactly
those of the candidate ONNX Runtime built.

Written here because no maintained library does it on an ONNX graph for int8: ORT's bundled GPTQ
(neural_compressor) builds 4-bit MatMulNBits only, and re-runs the whole model once per layer.
`workers.quantization.blocks.gptq` is the 4-bit block variant; this one works per output channel on a
grid given from outside (ORT's [-127, 127] or its 7-bit [-64, 64]).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from workers.activations import probe_session
from workers.evaluation import mask_input
from workers.steps import StepData

# Products whose second input is the [K, N] weight multiplied by their first input.
WEIGHT_PRODUCTS = ("MatMul", "Attention")
MAX_INPUT_CHANNELS = 8192  # one float64 H of 8192^2 is 512 MB: wider inputs keep round-to-nearest
HESSIAN_BATCH = 8
PERCDAMP = 0.01  # GPTQ's dampening, a share of H's mean diagonal


@dataclass
class Statistics:
    """H = X^T X / positions for each weight-product input, and how much data made them."""

    hessians: dict[str, np.ndarray]
    samples: int
    positions: int


def product_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """{weight initializer: the activation it multiplies}, for weights used by exactly one product
    (a table shared with a Gather lookup or a second product keeps round-to-nearest)."""
    inits = {i.name: i for i in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in inits:
                uses[name] = uses.get(name, 0) + 1
    found = {}
    for node in model.graph.node:
        if node.op_type in WEIGHT_PRODUCTS and len(node.input) > 1 and node.input[1] in inits and node.input[0] not in inits:
            weight = inits[node.input[1]]
            if len(weight.dims) == 2 and weight.data_type == onnx.TensorProto.FLOAT and uses[node.input[1]] == 1 and weight.dims[0] <= MAX_INPUT_CHANNELS:
                found[node.input[1]] = node.input[0]
    return found


def statistics(model_path: Path, data: StepData, max_samples: int, threads: int, progress: Callable[[float, str], None]) -> Statistics:
    """One pass over the calibration data with every product's input as an extra output. Padded
    positions (the attention mask's zeros) are left out: the user never reads their outputs."""

    model = onnx.load_model(str(model_path))
    activations = sorted(set(product_inputs(model).values()))
    if not activations:
        return Statistics({}, 0, 0)
    session = probe_session(model, activations, threads)
    del model
    mask_name = mask_input(data)
    total = min(max_samples, data.samples)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    seen = 0
    for feed, real in data.counted_batches(data.batch_size(HESSIAN_BATCH), limit=total):
        keep = feed[mask_name][:real].astype(bool) if mask_name is not None else None
        for name, value in zip(activations, session.run(activations, feed)):
            value = value[:real]
            if keep is not None and value.ndim == 3 and value.shape[:2] == keep.shape:
                x = value[keep]
            else:
                x = value.reshape(-1, value.shape[-1])
            x = x.astype(np.float64)
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + len(x)
        seen += real
        progress(seen / max(1, total), f"input statistics for error feedback {seen}/{total} samples")
    hessians = {name: sums[name] / max(1, counts[name]) for name in sums}
    return Statistics(hessians, seen, max(counts.values(), default=0))


def gptq_codes(weight: np.ndarray, h: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int,
               columns: int = 128) -> np.ndarray:
    """Integer codes [K, N] for `weight` [K, N] on the fixed grid (scale, zero point per output column,
    or one for all), input channels solved in order of decreasing H diagonal (act_order)."""
    k, n = weight.shape
    w = weight.T.astype(np.float64).copy()  # [N, K]: rows are output channels
    s = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (n,)).copy()
    z = np.broadcast_to(np.asarray(zero_point, np.float64).reshape(-1), (n,)).copy()
    hp = h.astype(np.float64).copy()
    dead = np.diag(hp) == 0  # inputs never non-zero on the data: nothing to feed back, rounded plainly
    hp[dead, dead] = 1.0
    hp[np.diag_indices(k)] += PERCDAMP * np.mean(np.diag(hp))
    order = np.argsort(-np.diag(hp), kind="stable")
    w, hp = w[:, order], hp[np.ix_(order, order)]
    hinv = np.linalg.cholesky(np.linalg.inv(hp)).T  # upper triangular
    codes = np.zeros((n, k), np.int64)
    for start in range(0, k, columns):
        end = min(start + columns, k)
        block, err, hinv1 = w[:, start:end].copy(), np.zeros((n, end - start)), hinv[start:end, start:end]
        for i in range(end - start):
            code = np.clip(np.round(block[:, i] / s) + z, qmin, qmax)
            codes[:, start + i] = code
            e = (block[:, i] - (code - z) * s) / hinv1[i, i]
            block[:, i:] -= np.outer(e, hinv1[i, i:])
            err[:, i] = e
        w[:, end:] -= err @ hinv[start:end, end:]
    out = np.empty_like(codes)
    out[:, order] = codes
    return out.T


def output_error(weight: np.ndarray, dequantized: np.ndarray, h: np.ndarray) -> float:
    """||X (W - Q)||^2 / ||X W||^2 on the calibration data: the share of the layer's output rounding moves."""
    delta = (weight - dequantized).astype(np.float64)
    w = weight.astype(np.float64)
    return float(((h @ delta) * delta).sum()) / max(float(((h @ w) * w).sum()), 1e-30)


def _grid(codes: onnx.TensorProto, reduce_range: bool) -> tuple[int, int]:
    """The code range ONNX Runtime's quantizer used for these weights."""
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    qmin, qmax = get_qmin_qmax_for_qType(codes.data_type, reduce_range=reduce_range, symmetric=codes.data_type == onnx.TensorProto.INT8)
    return int(qmin), int(qmax)


def refine(quantized_path: Path, source_path: Path, stats: Statistics, reduce_range: bool) -> dict[str, Any]:
    """Replace the int8 codes of every weight ONNX Runtime quantized (`<weight>_quantized`, with its
    `_scale` and `_zero_point`) by GPTQ's, in place; returns what it did, layer by layer."""
    source = onnx.load_model(str(source_path))
    inputs = product_inputs(source)
    floats = {i.name: i for i in source.graph.initializer if i.name in inputs}
    model = onnx.load_model(str(quantized_path))
    inits = {i.name: i for i in model.graph.initializer}
    layers = []
    for name, activation in inputs.items():
        codes_init, scale_init, zp_init = (inits.get(f"{name}{suffix}") for suffix in ("_quantized", "_scale", "_zero_point"))
        h = stats.hessians.get(activation)
        if codes_init is None or scale_init is None or h is None:
            continue
        weight = numpy_helper.to_array(floats[name]).astype(np.float32)
        plain = numpy_helper.to_array(codes_init)
        scale = numpy_helper.to_array(scale_init).astype(np.float64)
        # An all-zero zero point is dropped after quantizing (int8.drop_zero_weight_zero_points): it is 0.
        zero_point = numpy_helper.to_array(zp_init).astype(np.float64) if zp_init is not None else np.zeros_like(scale)
        if plain.shape != weight.shape or scale.size not in (1, weight.shape[1]) or zero_point.size != scale.size:
            continue  # a layout this module does not know (a transposed or per-row weight): left as ORT made it
        per_column = scale.reshape(1, -1), zero_point.reshape(1, -1)
        if np.abs((plain - per_column[1]) * per_column[0] - weight).max(initial=0.0) > 0.51 * scale.max():
            continue  # the codes are not per output column of this weight (another axis): left as ORT made it
        qmin, qmax = _grid(codes_init, reduce_range)
        fed = gptq_codes(weight, h, scale, zero_point, qmin, qmax)
        before = output_error(weight, (plain.astype(np.float64) - per_column[1]) * per_column[0], h)
        after = output_error(weight, (fed - per_column[1]) * per_column[0], h)
        if after >= before:
            continue  # never worse on the data than rounding to nearest
        codes_init.CopyFrom(numpy_helper.from_array(fed.astype(plain.dtype), codes_init.name))
        layers.append({"weight": name, "output_error_nearest": round(before, 6), "output_error_gptq": round(after, 6)})
    if layers:
        from workers import model_files

        model_files.save_to(model, quantized_path)
    return {
        "method": "GPTQ error feedback on ONNX Runtime's own int8 grid (scales and zero points kept)",
        "samples": stats.samples, "positions": stats.positions, "layers": len(layers),
        "mean_output_error_nearest": round(float(np.mean([r["output_error_nearest"] for r in layers])), 6) if layers else None,
        "mean_output_error_gptq": round(float(np.mean([r["output_error_gptq"] for r in layers])), 6) if layers else None,
        "per_layer": layers,
    }
