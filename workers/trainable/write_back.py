"""Trained weights back into the ONNX graph they came from, instead of re-exporting the module.

For a method that keeps the architecture (unstructured pruning, weight clustering, binary weights),
the original graph is the best possible output: every operator, input/output name, dynamic axis and
opset exactly as the user's exporter wrote them, so nothing is lost to a second export (torch's
exporters cannot re-trace the converter's shape arithmetic on transformer graphs). Only the
initializers behind nn.Linear / nn.Conv / nn.BatchNorm layers change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from workers.constant_folding import fold
from workers.onnx_weights import tied_aliases

from workers.trainable.from_onnx import OnnxGraphModule

FLATTEN_SHAPE = "modelshrink_flatten_shape"
log = logging.getLogger(__name__)


def trained_onnx(original: onnx.ModelProto, module: OnnxGraphModule, example: tuple[torch.Tensor, ...],
                 export_as_new: Callable[[], onnx.ModelProto]) -> onnx.ModelProto:
    """The user's graph with the trained (possibly narrowed) weights when ONNX Runtime then computes
    what the module computes on `example`; otherwise a fresh export (`export_as_new`), e.g. for a
    student whose layers were replaced or a width the graph also encodes elsewhere (attention heads)."""
    try:
        candidate = write_back(original, module)
        if _agrees(candidate, module, example):
            return candidate
    except Exception:  # any failure of the fast path falls back to a full export
        log.warning("writing trained weights back into the graph failed; exporting instead", exc_info=True)
    return _axis_names_of(original, export_as_new())


def _axis_names_of(original: onnx.ModelProto, exported: onnx.ModelProto) -> onnx.ModelProto:
    """A fresh export names its dynamic axes itself ("N"); the user's names ("batch") are kept."""
    old = {v.name: v for v in list(original.graph.input) + list(original.graph.output)}
    for value in list(exported.graph.input) + list(exported.graph.output):
        if value.name not in old:
            continue
        for new_dim, old_dim in zip(value.type.tensor_type.shape.dim, old[value.name].type.tensor_type.shape.dim):
            if new_dim.dim_param and old_dim.dim_param:
                new_dim.dim_param = old_dim.dim_param
    return exported


def _agrees(model: onnx.ModelProto, module: OnnxGraphModule, example: tuple[torch.Tensor, ...]) -> bool:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {name: t.detach().cpu().numpy() for name, t in zip(module.input_names, example)}
    got = session.run(None, feeds)
    with torch.no_grad():
        want = module(*example)
    want = want if isinstance(want, tuple) else (want,)
    # Float32 sums in another order: a few 1e-4 of the output's scale apart is the same function.
    agree = all(g.shape == tuple(w.shape) and np.allclose(g, w.detach().numpy(), rtol=1e-3, atol=2e-3 * max(1.0, float(np.abs(g).max(initial=0.0))))
                for g, w in zip(got, want))
    if not agree:
        log.info("the graph with written-back weights disagrees with the module: %s", [(g.shape, tuple(w.shape), float(np.abs(g - w.detach().numpy()).max()) if g.shape == tuple(w.shape) else None) for g, w in zip(got, want)])
    return agree


def _retie(model: onnx.ModelProto, original: onnx.ModelProto, folded_values: dict[str, np.ndarray]) -> None:
    """Folding turned a tied weight's re-layout (Transpose of the token embedding) into a tensor of its
    own; where training left it as it was, compute it from the table again, as the user's graph did,
    instead of storing the table twice."""
    tied = tied_aliases(original)
    inits = {t.name: t for t in model.graph.initializer}
    producers = {n.output[0]: n for n in original.graph.node if n.output}
    restore = []
    for alias, source in tied.items():
        if alias not in inits or source not in inits or alias not in folded_values:
            continue
        if not np.array_equal(numpy_helper.to_array(inits[alias]), folded_values[alias]):
            continue  # trained on its own: it is a different tensor now
        chain, value = [], alias
        while value != source:
            node = producers[value]
            chain.append(node)
            value = node.input[0]
        restore += reversed(chain)
        model.graph.initializer.remove(inits[alias])
    for offset, node in enumerate(restore):
        model.graph.node.insert(offset, node)


def write_back(original: onnx.ModelProto, module: OnnxGraphModule) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(fold(original))  # the graph the module was converted from
    by_output = {node.output[0]: node for node in model.graph.node if node.output}
    inits = {t.name: t for t in model.graph.initializer}
    folded_values = {name: numpy_helper.to_array(inits[name]) for name in tied_aliases(original) if name in inits}
    users: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.output[0])
    for key, source in module.sources.items():
        mine = set(source["nodes"])
        layer = module.layers[key]
        if isinstance(layer, torch.nn.Sequential):
            _factorise(model, by_output, layer, source, key)
            continue
        if source["kind"] == "conv":
            _set_group(by_output[source["nodes"][0]], layer.groups)
        for name, value in _trained_values(layer, source).items():
            if name not in inits:
                continue
            value = value.astype(onnx.helper.tensor_dtype_to_np_dtype(inits[name].data_type))
            if users.get(name, set()) - mine:
                # Shared with other nodes (an exporter de-duplicates equal tensors, e.g. freshly
                # initialised zero biases or LayerNorm scales): this layer gets its own copy, so
                # training it changes nothing else.
                own = f"{name}__{key}"
                for output in source["nodes"]:
                    node = by_output[output]
                    node.input[:] = [own if i == name else i for i in node.input]
                model.graph.initializer.append(numpy_helper.from_array(value, own))
                continue
            # A Gemm bias stored broadcastable (shape (1,) or ()) takes its trained full width; a
            # narrowed layer (structured pruning) its new shape.
            inits[name].CopyFrom(numpy_helper.from_array(value, name))
    if module.flatten_reshapes:
        # "[0, -1]": keep the batch axis, flatten the rest, whatever width the layers before now have.
        model.graph.initializer.append(numpy_helper.from_array(np.array([0, -1], np.int64), FLATTEN_SHAPE))
        for node in model.graph.node:
            if node.op_type == "Reshape" and node.output[0] in module.flatten_reshapes:
                node.input[1] = FLATTEN_SHAPE
                # 0 must mean "copy this dimension", not a literal zero (the dynamo exporter sets allowzero=1).
                kept = [a for a in node.attribute if a.name != "allowzero"]
                del node.attribute[:]
                node.attribute.extend(kept)
    _retie(model, original, folded_values)
    # Recorded intermediate shapes may name old widths; ONNX Runtime infers them again.
    del model.graph.value_info[:]
    # Weights nothing reads any more (a factorised layer's full matrix, a split shared tensor) go.
    used = {i for node in model.graph.node for i in node.input} | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


def _factorise(model: onnx.ModelProto, by_output: dict, layer: torch.nn.Sequential, source: dict, key: str) -> None:
    """A low-rank layer (Linear in->r without bias, then Linear r->out) as a MatMul by the first factor
    in front of the original MatMul/Gemm, which now holds the second factor."""
    if source["kind"] == "conv":
        _factorise_conv(model, by_output, layer, source, key)
        return
    first, second = layer
    if source["kind"] not in ("matmul", "gemm") or not isinstance(first, torch.nn.Linear) or not isinstance(second, torch.nn.Linear):
        raise ValueError(f"cannot write a factorised {source['kind']} layer back")
    node = by_output[source["nodes"][0]]
    a, b, middle = f"{source['weight']}__{key}_a", f"{source['weight']}__{key}_b", f"{node.output[0]}__{key}_rank"
    w2 = second.weight.detach().cpu().numpy().astype(np.float32)  # out x r
    if source["kind"] == "gemm":
        w2 = (w2 if source["trans_b"] else w2.T) / np.float32(source["alpha"])
    else:
        w2 = w2.T
    model.graph.initializer.append(numpy_helper.from_array(first.weight.detach().cpu().numpy().T.astype(np.float32).copy(), a))
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w2), b))
    position = list(model.graph.node).index(node)
    model.graph.node.insert(position, onnx.helper.make_node("MatMul", [node.input[0], a], [middle]))
    node.input[0], node.input[1] = middle, b
    if second.bias is not None and source.get("bias"):
        bias = second.bias.detach().cpu().numpy().astype(np.float32)
        if source["kind"] == "gemm":
            bias = bias / np.float32(source["beta"])
        bias_node = by_output[source["nodes"][-1]]
        own = f"{source['bias']}__{key}"
        model.graph.initializer.append(numpy_helper.from_array(bias, own))
        bias_node.input[:] = [own if i == source["bias"] else i for i in bias_node.input]


def _factorise_conv(model: onnx.ModelProto, by_output: dict, layer: torch.nn.Sequential, source: dict, key: str) -> None:
    """A convolution replaced by a chain of convolutions (Tucker-2: 1x1, K x K core, 1x1; depthwise
    separable: K x K depthwise, 1x1): the original Conv node becomes the part with the K x K kernel,
    keeping its stride, pads and dilations (and gaining that part's `group`); the 1x1 parts go before
    and after it. Only the last part may have a bias."""
    parts = list(layer)
    cores = [i for i, p in enumerate(parts) if isinstance(p, torch.nn.Conv2d) and tuple(p.kernel_size) != (1, 1)]
    if len(cores) != 1 or not all(isinstance(p, torch.nn.Conv2d) for p in parts) or any(p.bias is not None for p in parts[:-1]):
        raise ValueError("cannot write this convolution chain back")
    node = by_output[source["nodes"][0]]
    original_output, position = node.output[0], list(model.graph.node).index(node)
    prefix, current = f"{source['weight']}__{key}", node.input[0]
    new_nodes = []
    for i, part in enumerate(parts):
        weight = f"{prefix}_w{i}"
        model.graph.initializer.append(numpy_helper.from_array(part.weight.detach().cpu().numpy().astype(np.float32), weight))
        inputs = [current, weight]
        if part.bias is not None:
            model.graph.initializer.append(numpy_helper.from_array(part.bias.detach().cpu().numpy().astype(np.float32), f"{prefix}_b{i}"))
            inputs.append(f"{prefix}_b{i}")
        output = original_output if i == len(parts) - 1 else f"{original_output}__{key}_{i}"
        if i == cores[0]:
            node.input[:] = inputs
            node.output[0] = output
            _set_group(node, part.groups)
            new_nodes.append(node)
        else:
            new_nodes.append(onnx.helper.make_node("Conv", inputs, [output], kernel_shape=[1, 1]))
        current = output
    model.graph.node.remove(node)
    for offset, new in enumerate(new_nodes):
        model.graph.node.insert(position + offset, new)


def _set_group(node: onnx.NodeProto, groups: int) -> None:
    """A depthwise convolution narrowed by structured pruning has as many groups as channels left; a
    factorised convolution's core takes its part's groups."""
    current = next((a.i for a in node.attribute if a.name == "group"), 1)
    if current == groups:
        return
    kept = [a for a in node.attribute if a.name != "group"]
    del node.attribute[:]
    node.attribute.extend(kept + [onnx.helper.make_attribute("group", groups)])


def _trained_values(layer: torch.nn.Module, source: dict) -> dict[str, np.ndarray]:
    """Initializer name -> its trained value, in the layout the graph stores it."""
    weight = layer.weight.detach().cpu().numpy().astype(np.float32)
    bias = layer.bias.detach().cpu().numpy().astype(np.float32) if getattr(layer, "bias", None) is not None else None
    values: dict[str, np.ndarray] = {}
    kind = source["kind"]
    if kind == "conv":
        values[source["weight"]] = weight
    elif kind == "matmul":
        values[source["weight"]] = weight.T
    elif kind == "gemm":
        values[source["weight"]] = (weight if source["trans_b"] else weight.T) / np.float32(source["alpha"])
        if bias is not None:
            bias = bias / np.float32(source["beta"])
    elif kind == "bn":
        values[source["scale"]] = weight
        values[source["mean"]] = layer.running_mean.detach().cpu().numpy().astype(np.float32)
        values[source["var"]] = layer.running_var.detach().cpu().numpy().astype(np.float32)
    if bias is not None and source.get("bias"):
        values[source["bias"]] = bias
    return values
