"""Clustered weights inside a standard ONNX model: the file holds a small float codebook and integer
indices packed to exactly `bits` bits each, and the graph rebuilds the dense weight with
Gather (plus the sparse-gap scatter of `sparse_pack` for pruned layers). All inputs are constants,
so ONNX Runtime folds the rebuild once at load; the weights it runs are codebook[indices] exactly.

Opset 17 has no BitwiseAnd, so packed indices are unpacked by Gather on small byte tables.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
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


# An index of `bits` bits is stored as planes of 8, 4, 2 and 1 bits (5 = 4 + 1, 3 = 2 + 1), each plane
# packed 8 // width indices to a byte: exactly `bits` bits per weight for any width, and each plane is
# decoded by one Gather on a 256-row table (opset 17 has no BitwiseAnd).
WIDTHS = (8, 4, 2, 1)


def planes(bits: int) -> list[tuple[int, int]]:
    """(width, shift) of each plane, the high bits first."""
    out, left = [], bits
    while left:
        width = next(w for w in WIDTHS if w <= left)
        left -= width
        out.append((width, left))
    return out


def pack(indices: np.ndarray, bits: int) -> list[np.ndarray]:
    """The indices (each < 2**bits) as uint8 planes; within a byte, the first index takes the high bits."""
    flat = indices.astype(np.int64).ravel()
    out = []
    for width, shift in planes(bits):
        per = 8 // width
        values = ((flat >> shift) & (2**width - 1)).astype(np.uint8)
        values = np.pad(values, (0, -len(values) % per)).reshape(-1, per)
        out.append(np.bitwise_or.reduce(values << (8 - width * (np.arange(per, dtype=np.uint8) + 1)), axis=1).astype(np.uint8))
    return out


def _table(width: int) -> np.ndarray:
    """byte -> its 8 // width indices of `width` bits, as `pack` put them."""
    per = 8 // width
    return ((np.arange(256)[:, None] >> (8 - width * (np.arange(per) + 1))) & (2**width - 1)).astype(np.uint8)


def unpack(stored: list[np.ndarray], bits: int, n: int) -> np.ndarray:
    out = np.zeros(n, np.int64)
    for plane, (width, shift) in zip(stored, planes(bits)):
        out += _table(width)[plane].ravel()[:n].astype(np.int64) << shift
    return out


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


# Shared by every packed layer of a model: a table per plane width, and two small shapes.
TABLES = {4: "nib__table", 2: "pk2__table", 1: "pk1__table"}
FLAT = "nib__flat"
ZERO = "nib__zero"
SHARED = {
    FLAT: np.array([-1], np.int64),
    ZERO: np.array([0], np.int64),
}


def _table_nodes(width: int) -> tuple[list, list]:
    """The nodes computing TABLES[width] (what `_table` gives) from 256 bytes' values: stored, the
    three tables would take 3.5 KB, a visible share of a small pruned model; computed, about 200 bytes,
    and ONNX Runtime folds them at load with the rest of the rebuild."""
    per, prefix = 8 // width, f"pk{width}__"
    inits = [_const(f"{prefix}start", np.array(0, np.int32)), _const(f"{prefix}limit", np.array(256, np.int32)),
             _const(f"{prefix}delta", np.array(1, np.int32)), _const(f"{prefix}column", np.array([256, 1], np.int64)),
             _const(f"{prefix}shift", (2 ** (8 - width * (np.arange(per) + 1))).astype(np.int32)), _const(f"{prefix}mod", np.array(2**width, np.int32))]
    nodes = [helper.make_node("Range", [f"{prefix}start", f"{prefix}limit", f"{prefix}delta"], [f"{prefix}bytes"]),
             helper.make_node("Reshape", [f"{prefix}bytes", f"{prefix}column"], [f"{prefix}col"]),
             helper.make_node("Div", [f"{prefix}col", f"{prefix}shift"], [f"{prefix}high"]),
             helper.make_node("Mod", [f"{prefix}high", f"{prefix}mod"], [f"{prefix}low"]),
             helper.make_node("Cast", [f"{prefix}low"], [TABLES[width]], to=TensorProto.UINT8)]
    return nodes, inits


def _indices_nodes(prefix: str, indices: np.ndarray, bits: int) -> tuple[list, list, str]:
    """Nodes turning the packed planes of `indices` back into int32[n] indices."""
    n = indices.size
    nodes, inits, parts = [], [], []
    for p, (stored, (width, shift)) in enumerate(zip(pack(indices, bits), planes(bits))):
        name = f"{prefix}i" if p == 0 else f"{prefix}i{p}"  # the first plane keeps the name single-plane models always had
        inits.append(_const(name, stored))
        last = f"{name}j"
        if width == 8:
            nodes.append(helper.make_node("Cast", [name], [last], to=TensorProto.INT32))
        else:
            nodes += [helper.make_node("Cast", [name], [f"{name}b"], to=TensorProto.INT32),
                      helper.make_node("Gather", [TABLES[width], f"{name}b"], [f"{name}p"], axis=0),
                      helper.make_node("Reshape", [f"{name}p", FLAT], [f"{name}q"])]
            last = f"{name}q"
            if n % (8 // width):  # the last byte carries padding indices
                inits.append(_const(f"{name}n", np.array([n], np.int64)))
                nodes.append(helper.make_node("Slice", [last, ZERO, f"{name}n"], [f"{name}s"]))
                last = f"{name}s"
            nodes.append(helper.make_node("Cast", [last], [f"{name}j"], to=TensorProto.INT32))
            last = f"{name}j"
        if shift:
            inits.append(_const(f"{name}m", np.array(2**shift, np.int32)))
            nodes.append(helper.make_node("Mul", [last, f"{name}m"], [f"{name}x"]))
            last = f"{name}x"
        parts.append(last)
    while len(parts) > 1:
        nodes.append(helper.make_node("Add", parts[:2], [f"{parts[0]}+"]))
        parts = [f"{parts[0]}+", *parts[2:]]
    return nodes, inits, parts[0]


@functools.lru_cache(maxsize=256)
def _unpacking_bytes(residue: int, bits: int) -> int:
    n = 8 + residue  # the nodes depend on n only through the last byte's padding (n mod 8)
    nodes, inits, _ = _indices_nodes("cl00", np.zeros(n, np.int64), bits)
    return sum(x.ByteSize() for x in [*nodes, *inits]) - packed_bytes(n, bits)


def unpacking_bytes(n: int, bits: int) -> int:
    """What the nodes unpacking `n` indices of `bits` bits take in the file beyond the packed planes
    themselves (each plane's Cast/Gather/Reshape and small constants: about 200 bytes, a visible share
    of a small layer's clusters)."""
    return _unpacking_bytes(n % 8, bits)


def table_bytes(bits: Iterable[int]) -> int:
    """What the byte tables unpacking planes of these `bits` take, once per model (replace_initializers
    adds each width's table nodes once, whatever number of layers read it)."""
    widths = {width for b in bits for width, _ in planes(b) if width in TABLES}
    return sum(sum(x.ByteSize() for x in [*nodes, *inits]) for nodes, inits in map(_table_nodes, sorted(widths)))


def packed_bytes(n: int, bits: int) -> int:
    return sum(-(-n // (8 // width)) for width, _ in planes(bits))


def stored_bytes(c: Clustered) -> int:
    if not c.sparse:
        return packed_bytes(c.labels.size, c.bits) + (4 * group_offsets(c).size if c.grouped else 0)
    _, gaps = encode_gaps(c.labels.ravel())
    return len(gaps) + packed_bytes(len(gaps), c.bits)


def encode(name: str, c: Clustered, prefix: str | None = None) -> tuple[list, list]:
    """Nodes and initializers that produce tensor `name` (float32, the weight's shape). Internal
    names use the short `prefix`: in a small model, long names are a visible share of the file."""
    out_name, name = name, prefix or name
    shape = np.array(c.labels.shape, np.int64)
    n = c.labels.size
    inits = [_const(f"{name}c", c.codebook.astype(np.float32)), _const(f"{name}h", shape)]
    if c.grouped:
        # Local indices (bits each, as an ungrouped layer stores them) plus each group's offset into
        # the concatenated codebooks, added per row (or column) by broadcasting.
        offsets = group_offsets(c)
        local = c.labels.reshape(c.labels.shape[0], -1) - offsets
        nodes, more, idx = _indices_nodes(name, local, c.bits)
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
        nodes, more, idx = _indices_nodes(name, c.labels, c.bits)
        nodes += [
            helper.make_node("Gather", [f"{name}c", idx], [f"{name}d"], axis=0),
            helper.make_node("Reshape", [f"{name}d", f"{name}h"], [out_name]),
        ]
        return nodes, inits + more
    # Sparse: positions as uint8 gaps (filler entries use index 0, whose centroid is 0), indices per entry.
    entry_labels, gaps = encode_gaps(c.labels.ravel())
    nodes, more, idx = _indices_nodes(name, entry_labels, c.bits)
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
    for width, table in TABLES.items():
        if table in used:
            table_nodes, table_inits = _table_nodes(width)
            nodes, inits = table_nodes + nodes, inits + table_inits
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
