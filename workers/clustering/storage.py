"""Clustered weights inside a standard ONNX model: the file holds a small float codebook and integer
indices (two 4-bit indices per byte when bits <= 4), and the graph rebuilds the dense weight with
Gather (plus the sparse-gap scatter of `sparse_pack` for pruned layers). All inputs are constants,
so ONNX Runtime folds the rebuild once at load; the weights it runs are codebook[indices] exactly.

Opset 17 has no BitwiseAnd, so 4-bit indices are unpacked with integer Div and Mod.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from workers.sparse_pack import encode_gaps, scatter_nodes


@dataclass
class Clustered:
    # float32[k], or [groups * k] when groups of rows have codebooks of their own (labels then index the
    # whole array: group g's centroids are codebook[g*k:(g+1)*k]); for a sparse layer codebook[0] == 0
    # stands for pruned weights.
    codebook: np.ndarray
    labels: np.ndarray  # int, same shape as the weight
    bits: int
    sparse: bool

    @property
    def grouped(self) -> bool:
        return not self.sparse and len(self.codebook) > 2**self.bits


def group_offsets(c: Clustered) -> np.ndarray:
    """Per row ([R, 1]) or per column ([1, C]) of the 2-D labels: the first label of its group's codebook
    (columns when the exporter stored the weight transposed)."""
    k = 2**c.bits
    labels = c.labels.reshape(c.labels.shape[0], -1)
    offsets = labels // k * k
    if (offsets == offsets[:, :1]).all():
        return offsets[:, :1].astype(np.int32)
    if (offsets == offsets[:1, :]).all():
        return offsets[:1, :].astype(np.int32)
    raise ValueError("a grouped codebook's groups must follow rows or columns")


def pack_nibbles(indices: np.ndarray) -> np.ndarray:
    flat = indices.astype(np.uint8).ravel()
    if len(flat) % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] << 4) | flat[1::2]


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    return np.stack([packed >> 4, packed & 15], axis=1).ravel()[:n]


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


# Shared by every packed layer of a model: byte -> its two 4-bit indices, and two small shapes.
NIBBLES = "nib__table"
FLAT = "nib__flat"
ZERO = "nib__zero"
SHARED = {
    NIBBLES: np.stack([np.arange(256) >> 4, np.arange(256) & 15], axis=1).astype(np.uint8),
    FLAT: np.array([-1], np.int64),
    ZERO: np.array([0], np.int64),
}


def _indices_nodes(prefix: str, stored: np.ndarray, n: int, packed: bool) -> tuple[list, list, str]:
    """Nodes turning the stored index tensor into int32[n] indices."""
    inits = [_const(f"{prefix}i", stored)]
    if not packed:
        return [helper.make_node("Cast", [f"{prefix}i"], [f"{prefix}j"], to=TensorProto.INT32)], inits, f"{prefix}j"
    nodes = [
        helper.make_node("Cast", [f"{prefix}i"], [f"{prefix}b"], to=TensorProto.INT32),
        helper.make_node("Gather", [NIBBLES, f"{prefix}b"], [f"{prefix}p"], axis=0),
        helper.make_node("Reshape", [f"{prefix}p", FLAT], [f"{prefix}q"]),
    ]
    last = f"{prefix}q"
    if n % 2:  # an odd count carries one padding index at the end
        inits.append(_const(f"{prefix}n", np.array([n], np.int64)))
        nodes.append(helper.make_node("Slice", [last, ZERO, f"{prefix}n"], [f"{prefix}s"]))
        last = f"{prefix}s"
    nodes.append(helper.make_node("Cast", [last], [f"{prefix}j"], to=TensorProto.INT32))
    return nodes, inits, f"{prefix}j"


def stored_bytes(c: Clustered) -> int:
    n = c.labels.size
    if not c.sparse:
        return ((n + 1) // 2 if c.bits <= 4 else n) + (4 * group_offsets(c).size if c.grouped else 0)
    _, gaps = encode_gaps(c.labels.ravel())
    m = len(gaps)
    return m + ((m + 1) // 2 if c.bits <= 4 else m)


def encode(name: str, c: Clustered, prefix: str | None = None) -> tuple[list, list]:
    """Nodes and initializers that produce tensor `name` (float32, the weight's shape). Internal
    names use the short `prefix`: in a small model, long names are a visible share of the file."""
    out_name, name = name, prefix or name
    shape = np.array(c.labels.shape, np.int64)
    n = c.labels.size
    packed = c.bits <= 4
    inits = [_const(f"{name}c", c.codebook.astype(np.float32)), _const(f"{name}h", shape)]
    if c.grouped:
        # Local indices (bits each, as an ungrouped layer stores them) plus each group's offset into
        # the concatenated codebooks, added per row (or column) by broadcasting.
        offsets = group_offsets(c)
        local = c.labels.reshape(c.labels.shape[0], -1) - offsets
        stored = pack_nibbles(local) if packed else local.astype(np.uint8).ravel()
        nodes, more, idx = _indices_nodes(name, stored, n, packed)
        inits += [_const(f"{name}o", offsets), _const(f"{name}r", np.array(local.shape, np.int64))]
        nodes += [
            helper.make_node("Reshape", [idx, f"{name}r"], [f"{name}l"]),
            helper.make_node("Add", [f"{name}l", f"{name}o"], [f"{name}a"]),
            helper.make_node("Reshape", [f"{name}a", FLAT], [f"{name}f"]),
            helper.make_node("Gather", [f"{name}c", f"{name}f"], [f"{name}d"], axis=0),
            helper.make_node("Reshape", [f"{name}d", f"{name}h"], [out_name]),
        ]
        return nodes, inits + more
    if not c.sparse:
        stored = pack_nibbles(c.labels) if packed else c.labels.astype(np.uint8).ravel()
        nodes, more, idx = _indices_nodes(name, stored, n, packed)
        nodes += [
            helper.make_node("Gather", [f"{name}c", idx], [f"{name}d"], axis=0),
            helper.make_node("Reshape", [f"{name}d", f"{name}h"], [out_name]),
        ]
        return nodes, inits + more
    # Sparse: positions as uint8 gaps (filler entries use index 0, whose centroid is 0), indices per entry.
    entry_labels, gaps = encode_gaps(c.labels.ravel())
    stored = pack_nibbles(entry_labels) if packed else entry_labels.astype(np.uint8)
    nodes, more, idx = _indices_nodes(name, stored, len(gaps), packed)
    scatter, consts = scatter_nodes(name, f"{name}v", f"{name}g", n, f"{name}h", out_name, np.dtype(np.float32))
    inits += more + [_const(f"{name}g", gaps), *consts]
    nodes += [helper.make_node("Gather", [f"{name}c", idx], [f"{name}v"], axis=0), *scatter]
    return nodes, inits


def replace_initializers(model: onnx.ModelProto, replacements: dict[str, tuple[list, list]]) -> onnx.ModelProto:
    """Swap initializers for the given (nodes, initializers) that compute them."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [i for i in model.graph.initializer if i.name not in replacements]
    nodes, inits = [], []
    for new_nodes, new_inits in replacements.values():
        nodes += new_nodes
        inits += new_inits
    used = {i for n in nodes for i in n.input}
    inits += [_const(name, value) for name, value in SHARED.items() if name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept + inits)
    graph_nodes = nodes + list(model.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(graph_nodes)
    return out


def find_initializer(model: onnx.ModelProto, dense: np.ndarray) -> tuple[str, bool] | None:
    """The initializer holding exactly `dense` (or its transpose, as exporters sometimes store it)."""
    for init in model.graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        dims = tuple(init.dims)
        if dims == dense.shape and np.array_equal(numpy_helper.to_array(init), dense):
            return init.name, False
        if dense.ndim == 2 and dims == dense.shape[::-1] and np.array_equal(numpy_helper.to_array(init), dense.T):
            return init.name, True
    return None
