"""SmoothQuant (Xiao et al., 2023) for static int8: per input channel k of a matrix product, divide
the activation by s_k and multiply the weight's row k by s_k, with s_k = max|X_k|^alpha / max|W_k|^(1-alpha).
The product is unchanged; the activation's outlier channels shrink, so its int8 range wastes less.

Written here because ONNX Runtime's own `SmoothQuant` option imports Intel Neural Compressor 2.x's
ONNX adaptor (`neural_compressor.adaptor.ox_utils`), which INC 3.x no longer ships.

The 1/s scaling is folded into a LayerNormalization that feeds only smoothed products (transformer
Q/K/V and FFN inputs), and otherwise inserted as a Mul that the static quantizer then quantizes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

EPS = 1e-5
SUFFIX = "__smooth"


def _groups(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Activation tensor -> the MatMuls that multiply it by a constant [K, N] weight."""
    inits = {i.name: i for i in model.graph.initializer}
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2 and node.input[0] not in inits:
            groups.setdefault(node.input[0], []).append(node)
    return groups


def activation_maxima(model: onnx.ModelProto, feeds: Iterator[dict[str, np.ndarray]], threads: int = 1) -> dict[str, np.ndarray]:
    """Per last-axis channel max |x| of each smoothable activation over the calibration feeds."""
    import onnxruntime as ort

    names = list(_groups(model))
    probe = copy.deepcopy(model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names if n not in existing)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    maxima: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            channel_max = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            maxima[name] = channel_max if name not in maxima else np.maximum(maxima[name], channel_max)
    return maxima


def smooth(model: onnx.ModelProto, maxima: dict[str, np.ndarray], alpha: float) -> tuple[onnx.ModelProto, int]:
    """The smoothed model and how many activations were smoothed."""
    out = copy.deepcopy(model)
    inits = {i.name: i for i in out.graph.initializer}
    producers = {o: n for n in out.graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for node in out.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    graph_outputs = {o.name for o in out.graph.output}
    inserted, done, scaled = [], 0, set()
    for activation, matmuls in _groups(out).items():
        x_max = maxima.get(activation)
        # A weight shared with another activation's products would be scaled twice: leave that group alone.
        if x_max is None or x_max.size != inits[matmuls[0].input[1]].dims[0] or any(mm.input[1] in scaled for mm in matmuls):
            continue
        scaled |= {mm.input[1] for mm in matmuls}
        weights = {mm.input[1]: numpy_helper.to_array(inits[mm.input[1]]) for mm in matmuls}
        w_max = np.max([np.abs(w).max(axis=1) for w in weights.values()], axis=0)
        scale = np.where((x_max > 0) & (w_max > 0), np.power(np.maximum(x_max, EPS), alpha) / np.power(np.maximum(w_max, EPS), 1 - alpha), 1.0)
        scale = np.clip(scale, EPS, None).astype(np.float32)
        for name, weight in weights.items():
            inits[name].CopyFrom(numpy_helper.from_array((weight * scale[:, None]).astype(np.float32), name))
        producer = producers.get(activation)
        foldable = (producer is not None and producer.op_type == "LayerNormalization" and consumers.get(activation) == len(matmuls)
                    and activation not in graph_outputs and all(x in inits for x in producer.input[1:3]) and len(producer.input) >= 3)
        if foldable:
            for name in producer.input[1:3]:
                value = numpy_helper.to_array(inits[name])
                inits[name].CopyFrom(numpy_helper.from_array((value / scale).astype(np.float32), name))
        else:
            smoothed, factor = f"{activation}{SUFFIX}", f"{activation}{SUFFIX}_inverse"  # not "_scale": ORT names its own scales <tensor>_scale
            out.graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), factor))
            inserted.append((activation, helper.make_node("Mul", [activation, factor], [smoothed], name=f"{activation}{SUFFIX}")))
            for mm in matmuls:
                mm.input[0] = smoothed
        done += 1
    # Each Mul goes right after its activation's producer (or first, for a graph input): topological order.
    for activation, mul in inserted:
        producer = producers.get(activation)
        nodes = list(out.graph.node)
        index = nodes.index(producer) + 1 if producer is not None else 0
        out.graph.node.insert(index, mul)
    return out, done
