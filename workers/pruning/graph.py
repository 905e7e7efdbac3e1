"""The ONNX graph as graph-level pruning sees it (attention heads in workers.pruning.heads, feed-forward
units in workers.pruning.ffn): producers and consumers of each value, constants behind Identity
nodes, slicing an initializer for one reader, and the check that a narrowed graph still computes what
the original computes with the removed units switched off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from workers.activations import session

# Ops a projection's output passes through on its way into the attention products (reshape into
# heads, transposes, the scaling), and from the attention output to the output projection.
PASS_THROUGH = {"Reshape", "Transpose", "Mul", "Div", "Add", "Cast", "Identity", "Squeeze", "Unsqueeze"}
DATA_FIRST = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Cast", "Identity", "Dropout"}  # input 0 is the data


@dataclass
class Projection:
    node: onnx.NodeProto  # MatMul or Gemm with a constant weight
    index: int  # of that node in the graph
    weight: str
    output_axis: int  # of the stored weight
    bias: str | None = None  # the value the node reads
    bias_source: str | None = None  # the initializer behind it (TorchScript shares equal tensors through Identity)
    bias_index: int | None = None  # the Add holding the bias (MatMul + Add)


class OnnxGraph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.inits = {i.name: i for i in model.graph.initializer}
        # One list of node objects (protobuf may hand out fresh wrappers on each iteration): indices by identity.
        self.nodes = list(model.graph.node)
        self.index = {id(n): i for i, n in enumerate(self.nodes)}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def source(self, name: str) -> str | None:
        """The initializer `name` is, directly or through Identity nodes."""
        for _ in range(8):
            if name in self.inits:
                return name
            node = self.producer.get(name)
            if node is None or node.op_type != "Identity":
                return None
            name = node.input[0]
        return None

    def const(self, name: str) -> np.ndarray | None:
        source = self.source(name)
        if source is not None:
            return numpy_helper.to_array(self.inits[source])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def computed(self, node: onnx.NodeProto) -> list[str]:
        return [i for i in node.input if i and self.const(i) is None]

    def projection(self, node: onnx.NodeProto | None) -> Projection | None:
        if node is None or node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            return None
        weight = self.const(node.input[1])
        if weight is None or weight.ndim != 2 or node.input[1] not in self.inits:
            return None  # (a weight reached through Identity is shared with another layer: not sliced)
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        proj = Projection(node, self.index[id(node)], node.input[1], 0 if (node.op_type == "Gemm" and trans_b) else 1)
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] and self.source(node.input[2]):
            proj.bias, proj.bias_source = node.input[2], self.source(node.input[2])
        users = self.consumers.get(node.output[0], [])
        if node.op_type == "MatMul" and len(users) == 1 and users[0].op_type == "Add":
            other = [i for i in users[0].input if i != node.output[0]]
            bias = self.const(other[0]) if other else None
            if bias is not None and bias.shape == (weight.shape[1],) and self.source(other[0]):
                proj.bias, proj.bias_source, proj.bias_index = other[0], self.source(other[0]), self.index[id(users[0])]
        return proj

    def upstream_projection(self, value: str, through: set[str] = PASS_THROUGH, limit: int = 12) -> Projection | None:
        """The constant-weight projection `value` is computed from, through reshapes/transposes/scaling."""
        for _ in range(limit):
            node = self.producer.get(value)
            if node is None:
                return None
            found = self.projection(node)
            if found is not None:
                return found
            if node.op_type not in through:
                return None
            if node.op_type in DATA_FIRST:
                value = node.input[0]
                continue
            computed = self.computed(node)
            if len(computed) != 1:
                return None
            value = computed[0]
        return None

    def upstream_op(self, value: str, op: str, through: set[str], limit: int = 8) -> onnx.NodeProto | None:
        """The nearest `op` node `value` derives from through `through` ops (every computed input tried)."""
        node = self.producer.get(value)
        if node is None or limit == 0:
            return None
        if node.op_type == op:
            return node
        if node.op_type not in through:
            return None
        for name in self.computed(node):
            found = self.upstream_op(name, op, through, limit - 1)
            if found is not None:
                return found
        return None

    def downstream_projection(self, value: str, limit: int = 6) -> Projection | None:
        for _ in range(limit):
            users = [u for u in self.consumers.get(value, []) if u.op_type != "Shape"]  # shape reads follow the width by themselves
            if len(users) != 1:
                return None
            node = users[0]
            if node.op_type in ("MatMul", "Gemm") and node.input[0] == value:
                return self.projection(node)
            if node.op_type not in ("Reshape", "Transpose", "Identity", "Cast"):
                return None
            value = node.output[0]
        return None

    def reshape_after(self, projection: Projection) -> onnx.NodeProto | None:
        """The reshape into heads just after this projection."""
        value = self.nodes[projection.bias_index if projection.bias_index is not None else projection.index].output[0]
        for _ in range(4):
            users = self.consumers.get(value, [])
            reshape = next((u for u in users if u.op_type == "Reshape"), None)
            if reshape is not None:
                return reshape
            if len(users) != 1 or users[0].op_type not in ("Mul", "Div", "Identity", "Cast"):
                return None
            value = users[0].output[0]
        return None

    def head_dim(self, projection: Projection) -> int | None:
        """The last entry of the reshape into heads just after this projection: head_dim."""
        reshape = self.reshape_after(projection)
        return self._last_dim(reshape.input[1]) if reshape is not None else None

    def reshapes_between(self, value: str, end: onnx.NodeProto, limit: int = 6) -> list[onnx.NodeProto]:
        found = []
        for _ in range(limit):
            users = [u for u in self.consumers.get(value, []) if u.op_type != "Shape"]
            if len(users) != 1 or users[0] is end:
                break
            if users[0].op_type == "Reshape":
                found.append(users[0])
            value = users[0].output[0]
        return found

    def _last_dim(self, shape: str) -> int | None:
        const = self.const(shape)
        if const is not None and const.ndim == 1 and const.size >= 3:
            return int(const[-1]) if const[-1] > 0 else None
        node = self.producer.get(shape)
        if node is not None and node.op_type == "Concat" and node.input:
            last = self.const(node.input[-1])
            if last is not None and last.size == 1 and int(last.ravel()[0]) > 0:
                return int(last.ravel()[0])
        return None


def differs(pruned: onnx.ModelProto, expected: list[np.ndarray], feeds: dict[str, np.ndarray], threads: int) -> str | None:
    """None when `pruned` computes `expected` on `feeds` (float32 sums in another order: 1e-4 of the
    output's scale apart is the same function); else what went wrong, for the error message."""
    try:
        got = session(pruned, threads).run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - a graph ONNX Runtime cannot run is the answer here
        return f"does not run ({str(exc).splitlines()[0][:200]})"
    for e, o in zip(expected, got):
        if e.shape != o.shape or not np.allclose(e, o, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(e).max()))):
            return "does not compute what the original computes with them switched off"
    return None


def slice_initializer(model: onnx.ModelProto, inits: dict[str, onnx.TensorProto], readers: dict[str, int], name: str, axis: int, keep: np.ndarray,
           node: onnx.NodeProto, tag: str, source: str | None = None) -> None:
    """`source` (default `name`) sliced along `axis`, for `node` where it reads `name`: in place when
    nothing else reads the tensor (so the layer keeps its name), else as a new tensor (shared ones stay
    intact for their other users)."""
    source = source or name
    array = np.ascontiguousarray(np.take(numpy_helper.to_array(inits[source]), keep, axis=axis))
    if source == name and readers.get(name, 0) == 1:
        inits[name].CopyFrom(numpy_helper.from_array(array, name))
        return
    new_name = f"{source}__{tag}"
    model.graph.initializer.append(numpy_helper.from_array(array, new_name))
    for i, value in enumerate(node.input):
        if value == name:
            node.input[i] = new_name
