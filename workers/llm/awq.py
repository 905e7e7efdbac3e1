"""AWQ (Lin et al. 2024, activation-aware weight quantization) on a GenAI decoder graph: before a
weight is rounded, each of its input channels is multiplied by s_j = a_j^alpha (a_j: that channel's
activation magnitude on the calibration text) and the layer's input divided by s_j, so the channels
that carry the loud activations lose less to rounding. alpha is searched per input tensor on a grid,
scored by the output error the rounding then causes on the calibration text, ||X (W - Q)||^2 =
trace(dW^T H dW) with H = X^T X (workers.llm.calibration), so no extra pass of the model is needed;
alpha 0 is plain round-to-nearest, so the chosen scales never do worse than it on that text.

Written here because no maintained library applies AWQ to an ONNX graph: AutoAWQ and llm-compressor
work on the torch module before export, and ONNX Runtime's quantizers offer RTN, HQQ, GPTQ and
k-quant. Differences from the paper, and why: the activation magnitude is the channel's RMS
(sqrt of H's diagonal, which the Hessian pass already holds) rather than its mean |x|; the 1/s is a
norm's scale (gamma, and beta) when a norm produces the input and nothing else reads it (the q/k/v
and gate/up inputs of a GenAI graph: no new op), else a Mul node on the input (o_proj after
attention, down_proj after the gated product), which keeps the rewrite valid on any graph for one
elementwise op. Tensors read by a tied table (a tied lm_head) keep s = 1: their codes are the
embedding's too."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from workers.quantization import blocks

GRID = 20  # alphas 0, 0.05, ..., 1, as the paper's search
# Norms whose output is scale (and shift) times a normalised input: dividing those by s divides the
# output. op type -> the inputs that scale it (gamma, beta).
NORM_SCALES = {"SimplifiedLayerNormalization": (1,), "SkipSimplifiedLayerNormalization": (2,),
               "LayerNormalization": (1, 2), "SkipLayerNormalization": (2, 3)}


def _qdq(weight: np.ndarray, bits: int, block: int, symmetric: bool) -> np.ndarray:
    return blocks.round_to_nearest(weight, bits, block, symmetric).dequantized(bits)


def _error(weights: list[tuple[np.ndarray, int]], h: np.ndarray, s: np.ndarray, block: int, symmetric: bool) -> float:
    """The group's output error with its weights rounded after scaling by s (input rows of [K, N]),
    relative to its output: sum ||X dW||^2 / sum ||X W||^2 on the calibration text."""
    error = signal = 0.0
    for weight, bits in weights:
        computed = _qdq(weight * s[:, None], bits, block, symmetric) / s[:, None]
        delta = (weight - computed).astype(np.float32)
        error += float(((h @ delta) * delta).sum(dtype=np.float64))
        signal += float(((h @ weight) * weight).sum(dtype=np.float64))
    return error / max(signal, 1e-30)


def search_scale(weights: list[tuple[np.ndarray, int]], h: np.ndarray, block: int, symmetric: bool) -> tuple[np.ndarray, float, float, float]:
    """The per-input-channel scale with the least output error over the grid: (s, alpha, error at
    alpha 0, error at the chosen alpha)."""
    magnitude = np.sqrt(np.maximum(np.diag(h).astype(np.float64), 0.0)) + 1e-8
    best = (np.ones_like(magnitude), 0.0, np.inf)
    baseline = np.inf
    for step in range(GRID + 1):
        alpha = step / GRID
        s = magnitude ** alpha
        s = s / np.sqrt(s.max() * s.min())  # centred on 1, as the paper's code: the weights' range stays put
        error = _error(weights, h, s, block, symmetric)
        if step == 0:
            baseline = error
        if error < best[2]:
            best = (s, alpha, error)
    return best[0].astype(np.float32), best[1], baseline, best[2]


def apply(model: onnx.ModelProto, hessians: dict[str, np.ndarray], bits_of, block: int, symmetric: bool,
          keep: set[str]) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Scales the weights of every group of matrix products that share an input (in place on `model`,
    whose weights are [K, N] MatMul inputs) and inserts the input's 1/s. Returns the Hessians of the
    new inputs added to `hessians`' (H / s s^T) and a row per group. `keep`: weight names left unscaled
    (tied tables' codes)."""
    inits = {i.name: i for i in model.graph.initializer}
    uses: dict[str, int] = defaultdict(int)
    readers: dict[str, list[str]] = defaultdict(list)
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        for name in node.input:
            uses[name] += 1
            readers[name].append(node.name)
    groups: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2 and node.input[0] in hessians:
            groups[node.input[0]].append(node)
    hessians = dict(hessians)
    rows, new_nodes = [], []
    for tensor, nodes in groups.items():
        if any(n.input[1] in keep or uses[n.input[1]] > 1 for n in nodes):
            continue  # a weight read elsewhere (a tied table) cannot change alone
        quantized = [(numpy_helper.to_array(inits[n.input[1]]), bits_of(n.name)) for n in nodes if bits_of(n.name) in (4, 8)]
        if not any(bits == 4 for _, bits in quantized):
            continue
        h = hessians[tensor]
        s, alpha, before, after = search_scale(quantized, h, block, symmetric)
        rows.append({"input": tensor, "layers": [n.name for n in nodes], "alpha": alpha,
                     "output_error_rtn": round(before, 6), "output_error_awq": round(after, 6)})
        if alpha == 0.0 or not nodes[0].name:
            continue
        producer = producers.get(tensor)
        if _foldable(producer, tensor, readers[tensor], nodes, inits, uses):
            scaled_input = tensor  # the norm now writes x / s itself
            for index in NORM_SCALES[producer.op_type]:
                if index < len(producer.input) and producer.input[index]:
                    _scale_initializer(inits[producer.input[index]], 1.0 / s)
            rows[-1]["inverse_scale"] = f"folded into {producer.op_type} {producer.name}"
        else:
            scaled_input, inverse = f"{tensor}__awq", f"{tensor}__awq_inv"
            model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inverse))
            new_nodes.append((nodes[0], helper.make_node("Mul", [tensor, inverse], [scaled_input], name=f"{nodes[0].name}__awq")))
            rows[-1]["inverse_scale"] = "a Mul node on the input"
        for node in nodes:
            _scale_initializer(inits[node.input[1]], s[:, None])
            node.input[0] = scaled_input
        hessians[scaled_input] = (h / s[:, None] / s[None, :]).astype(np.float32)
    _insert_before(model, new_nodes)
    return hessians, rows


def _foldable(producer: onnx.NodeProto | None, tensor: str, readers: list[str], nodes: list[onnx.NodeProto],
              inits: dict[str, onnx.TensorProto], uses: dict[str, int]) -> bool:
    """Whether 1/s can go into the norm that writes `tensor`: its first output, read only by the group,
    its scale tensors constants of its own (the same gamma read elsewhere would change there too)."""
    if producer is None or producer.op_type not in NORM_SCALES or producer.output[0] != tensor:
        return False
    if sorted(readers) != sorted(n.name for n in nodes):
        return False
    scales = [producer.input[i] for i in NORM_SCALES[producer.op_type] if i < len(producer.input) and producer.input[i]]
    return bool(scales) and all(name in inits and uses[name] == 1 and inits[name].data_type == onnx.TensorProto.FLOAT for name in scales)


def _scale_initializer(tensor: onnx.TensorProto, factor: np.ndarray) -> None:
    tensor.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(tensor) * factor).astype(np.float32), tensor.name))


def _insert_before(model: onnx.ModelProto, pairs: list[tuple[onnx.NodeProto, onnx.NodeProto]]) -> None:
    """Each new node placed just before the first node that reads its output (the graph stays sorted)."""
    before = {first.name: new for first, new in pairs}
    nodes = []
    for node in model.graph.node:
        if node.name in before:
            nodes.append(before.pop(node.name))
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
