"""The weights of an ONNX graph, read straight from its initializers, and the names users know them
by. The methods' paths that train nothing (unstructured pruning and clustering without fine-tuning,
binary without straight-through training) change these tensors in place, so they work on any graph
ONNX Runtime runs, keep the user's graph as it was, and cost no conversion to torch. The trainable
converter names its layers with the same `layer_name`, so `skip_layers` and the reports' layer names
mean the same thing on both paths."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

import numpy as np
import onnx

# Operator -> index of its weight input.
WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1}
# Names exporters generate for tensors (TorchScript "onnx::MatMul_406", dynamo "val_67"): no torch name.
_GENERATED = re.compile(r"^(onnx::.*|val_\d+|_v_\d+)$")


@dataclass(frozen=True)
class WeightLayer:
    name: str  # the torch name a user knows, or the initializer's own name
    initializer: str  # the tensor stored in the graph
    op: str
    output_axis: int  # the axis of the stored tensor that indexes the layer's output channels


def layer_name(weight_name: str, node: onnx.NodeProto, aliases: dict[str, str] | None = None) -> str:
    """The torch name a user knows ("encoder.layer.0.intermediate.dense"), from the weight's own name,
    the initializer it is a transposed copy of, or the exporter's node scope ("/encoder/layer.0/.../MatMul")."""
    name = (aliases or {}).get(weight_name, weight_name)
    if name and not _GENERATED.match(name):
        return name.removesuffix(".weight")
    scope = _module_scope(node)
    if scope:
        return scope
    if node.name.startswith("/") and node.name.count("/") > 1:
        return node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
    return node.name or name


def _module_scope(node: onnx.NodeProto) -> str | None:
    # The dynamo exporter records the torch module path of every node it writes.
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            # Cumulative module paths ("m", "m.encoder", ...), then the op's own name: keep the deepest path.
            path = None
            for scope in scopes:
                if scope and (path is None or scope.startswith(path + ".")):
                    path = scope
            return path
    return None


def weight_aliases(model: onnx.ModelProto) -> dict[str, str]:
    """Values that are only a re-layout of an initializer (Transpose/Identity/Cast of it) -> its name:
    folding turns them into initializers with generated names, the source keeps the torch name."""
    inits = {t.name for t in model.graph.initializer}
    aliases: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in ("Transpose", "Identity", "Cast") and node.input and (node.input[0] in inits or node.input[0] in aliases):
            aliases[node.output[0]] = aliases.get(node.input[0], node.input[0])
    return aliases


def tied_aliases(model: onnx.ModelProto) -> dict[str, str]:
    """Re-layouts of an initializer (alias -> source) whose source other nodes also read: a tied weight,
    e.g. GPT-2's output projection reading Transpose(the token embedding). Training such a layer on its
    own would untie it and store the table twice."""
    aliases = weight_aliases(model)
    readers: set[str] = set()
    for node in model.graph.node:
        if node.output and node.output[0] in aliases:
            continue  # the re-layout itself
        readers.update(node.input)
    return {alias: source for alias, source in aliases.items() if source in readers}


def _output_axis(node: onnx.NodeProto, rank: int) -> int:
    if node.op_type == "MatMul":
        return rank - 1  # x @ W: W is [in, out]
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "ConvTranspose":
        return 1  # [in, out / groups, k...]
    return 0  # Conv: [out, in / groups, k...]


def weight_layers(model: onnx.ModelProto) -> dict[str, WeightLayer]:
    """Float initializers of 2+ dimensions that are a MatMul/Gemm/Conv weight, in graph order, by the
    name users know. A tensor used by several nodes is listed once (its first user names it)."""
    inits = {i.name: i for i in model.graph.initializer}
    aliases = weight_aliases(model)
    found: dict[str, WeightLayer] = {}
    seen: set[str] = set()
    for node in model.graph.node:
        index = WEIGHT_INPUT.get(node.op_type)
        if index is None or len(node.input) <= index:
            continue
        tensor = node.input[index]
        init = inits.get(tensor)
        if init is None or init.data_type != onnx.TensorProto.FLOAT or len(init.dims) < 2 or tensor in seen:
            continue
        seen.add(tensor)
        name = base = layer_name(tensor, node, aliases)
        n = 1
        while name in found:
            n += 1
            name = f"{base}_{n}"
        found[name] = WeightLayer(name, tensor, node.op_type, _output_axis(node, len(init.dims)))
    return found


def as_rows(array: np.ndarray, layer: WeightLayer) -> np.ndarray:
    """The weight with its output channels first (torch's layout), whatever the graph stores."""
    return np.ascontiguousarray(np.moveaxis(array, layer.output_axis, 0))


def from_rows(rows: np.ndarray, layer: WeightLayer) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(rows, 0, layer.output_axis))
