"""Feed-forward hidden units removed on the ONNX graph itself, for transformers whose MLP the
converted module cannot narrow: GPT-2's Conv1D computes `addmm` on a flattened input and reshapes the
result back with the width spelled out (`[batch, seq, 3072]` in a Concat or a constant), which
torch-pruning's dependency graph cannot see through and which would not run once the layer is narrower.

A block is a projection (MatMul/Gemm with a constant weight) whose output reaches exactly one other
projection through element-wise ops (the activation) and reshapes that keep the hidden width on the last
axis. Removing hidden unit j slices column j of the first weight and bias and row j of the second, and
every shape constant on the way that states the width gets the new one (a copy per block: exporters share
equal constants across blocks). The pruned graph must compute exactly what the original computes with
those units' rows of the second weight zeroed, or the step fails with `structured_pruning_unsupported`.

Importance per unit: `l1`/`l2` the norm of its column of the first weight and its row of the second;
otherwise (`taylor`, `apoz`, `wanda`) measured on the data: mean |activation| x the L2 norm of its row of
the second weight (what removing it takes out of the block's output, as Wanda ranks weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from service.core.errors import CompressionFailed
from service.core.specs import PruneStep
from workers.onnx_weights import layer_name
from workers.pruning.layers import ELEMENTWISE as TORCH_SIDE_ELEMENTWISE
from workers.activations import probe_session, session
from workers.pruning.graph import OnnxGraph, Projection, differs, slice_initializer

# The element-wise ops the converted module's MLP detection follows, plus ONNX Runtime's fused GELUs.
ELEMENTWISE = TORCH_SIDE_ELEMENTWISE | {"FastGelu", "BiasGelu"}


class FfnPruningUnsupported(CompressionFailed):
    code = "structured_pruning_unsupported"


@dataclass
class FeedForward:
    name: str  # the first projection's layer name (torch's, e.g. transformer.h.0.mlp.c_fc)
    up: Projection
    down: Projection
    width: int
    inner: str  # the value the second projection reads (the hidden units, last axis)
    # (reshape index, index of the node holding the constant, its input position): shape constants that
    # state the width as their last entry (the holder is the Reshape itself or a Concat building its target).
    shape_constants: list[tuple[int, int, int]] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)


def _chain(graph: OnnxGraph, start: str, width: int) -> tuple[onnx.NodeProto, str, list[tuple[int, int]]] | None:
    """Follow `start` through element-wise ops and width-keeping reshapes to the one projection that
    reads it: (that node, the value it reads, the width-stating shape constants), or None."""
    chain, frontier, pending, shapes = {start}, [start], [], []
    end: tuple[onnx.NodeProto, str] | None = None
    while frontier:
        value = frontier.pop()
        for node in graph.consumers.get(value, []):
            if node.op_type == "Shape":
                continue  # reads the width at run time: follows it by itself
            if node.op_type in ("MatMul", "Gemm") and node.input[0] == value:
                if end is not None and end[0] is not node:
                    return None
                end = (node, value)
                continue
            if node.op_type == "Reshape" and node.input[0] == value:
                found = _width_constant(graph, node, width)
                if found is False:
                    return None
                if found is not None:
                    shapes.append(found)
            elif node.op_type not in ELEMENTWISE:
                return None
            elif not all(i in chain or graph.const(i) is not None or not i for i in node.input):
                pending.append(node)  # another input may join the chain later
                continue
            for out in node.output:
                if out not in chain:
                    chain.add(out)
                    frontier.append(out)
        if not frontier:
            ready = [n for n in pending if all(i in chain or graph.const(i) is not None or not i for i in n.input)]
            pending = [n for n in pending if all(n is not r for r in ready)]
            for node in ready:
                for out in node.output:
                    if out not in chain:
                        chain.add(out)
                        frontier.append(out)
    if end is None or pending or graph.const(end[0].input[1]) is None:
        return None
    return end[0], end[1], shapes


def _width_constant(graph: OnnxGraph, reshape: onnx.NodeProto, width: int) -> tuple[int, int, int] | None | bool:
    """Where a reshape's target states the width: (reshape index, holder index, input position); None
    when the target is computed from the data's shape (nothing to rewrite); False when it cannot be
    told (the check at the end would fail anyway, so the block is not taken)."""
    target = graph.const(reshape.input[1])
    if target is not None:
        if target.ndim == 1 and target.size >= 1 and int(target[-1]) == width:
            return graph.index[id(reshape)], graph.index[id(reshape)], 1
        return None if target.ndim == 1 and int(target[-1]) in (-1, 0) else False
    concat = graph.producer.get(reshape.input[1])
    if concat is not None and concat.op_type == "Concat" and concat.input:
        last = graph.const(concat.input[-1])
        if last is not None and last.size == 1 and int(last.ravel()[0]) == width:
            return graph.index[id(reshape)], graph.index[id(concat)], len(concat.input) - 1
    return None


def find_blocks(model: onnx.ModelProto) -> list[FeedForward]:
    graph = OnnxGraph(model)
    blocks = []
    for node in graph.nodes:
        up = graph.projection(node)
        if up is None:
            continue
        weight = graph.const(up.weight)
        assert weight is not None
        width = int(weight.shape[up.output_axis])
        start = graph.nodes[up.bias_index].output[0] if up.bias_index is not None else node.output[0]
        found = _chain(graph, start, width)
        if found is None:
            continue
        end, inner, shapes = found
        down = graph.projection(end)
        down_weight = graph.const(end.input[1])
        if down is None or down_weight is None or down_weight.shape[1 - down.output_axis] != width:
            continue
        blocks.append(FeedForward(layer_name(up.weight, up.node), up, down, width, inner, shapes))
    return blocks


def _weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def importance(model: onnx.ModelProto, blocks: list[FeedForward], kind: str, feeds: dict[str, np.ndarray], threads: int) -> list[np.ndarray]:
    """One score per hidden unit per block (higher: keep)."""
    down_rows = [np.moveaxis(_weight(model, b.down.weight), 1 - b.down.output_axis, 0).reshape(b.width, -1) for b in blocks]
    if kind in ("l1", "l2"):
        order = 1 if kind == "l1" else 2
        ups = [np.moveaxis(_weight(model, b.up.weight), b.up.output_axis, 0).reshape(b.width, -1) for b in blocks]
        return [np.linalg.norm(u, ord=order, axis=1) + np.linalg.norm(d, ord=order, axis=1) for u, d in zip(ups, down_rows)]
    outputs = probe_session(model, [b.inner for b in blocks], threads).run([b.inner for b in blocks], feeds)
    return [np.abs(a.reshape(-1, b.width)).mean(0) * np.linalg.norm(d, axis=1) for a, b, d in zip(outputs, blocks, down_rows)]


def _kept(width: int, amount: float, multiple: int) -> int:
    """Units kept: (1 - amount) of the width, rounded to the channel multiple (never 0)."""
    kept = int(round(width * (1 - amount)))
    if multiple > 1:
        kept = max(multiple, int(round(kept / multiple)) * multiple)
    return max(1, min(width, kept))


def remove(model: onnx.ModelProto, blocks: list[FeedForward], removed: dict[int, list[int]]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    original = OnnxGraph(model)
    nodes = list(out.graph.node)
    inits = {i.name: i for i in out.graph.initializer}
    readers: dict[str, int] = {}
    for n in nodes:
        for value in n.input:
            readers[value] = readers.get(value, 0) + 1
    added: dict[int, list[onnx.NodeProto]] = {}
    for b, units in removed.items():
        block = blocks[b]
        keep = np.array([j for j in range(block.width) if j not in set(units)])
        slice_initializer(out, inits, readers, block.up.weight, block.up.output_axis, keep, nodes[block.up.index], f"ffn{b}")
        if block.up.bias:
            where = nodes[block.up.bias_index if block.up.bias_index is not None else block.up.index]
            slice_initializer(out, inits, readers, block.up.bias, 0, keep, where, f"ffn{b}b", block.up.bias_source)
        slice_initializer(out, inits, readers, block.down.weight, 1 - block.down.output_axis, keep, nodes[block.down.index], f"ffn{b}")
        for reshape, holder, position in block.shape_constants:
            shape = original.const(original.nodes[holder].input[position])
            assert shape is not None
            shape = shape.copy()
            shape.reshape(-1)[-1] = len(keep)
            name = f"ffn__shape{b}_{holder}"
            out.graph.initializer.append(numpy_helper.from_array(shape, name))
            if holder == reshape:
                nodes[reshape].input[1] = name
                continue
            # A Concat building the target may be shared by several blocks (the dynamo exporter merges
            # equal subexpressions): this block's reshape gets its own copy.
            concat = onnx.NodeProto()
            concat.CopyFrom(nodes[holder])
            concat.name, concat.output[0] = f"{concat.name}__ffn{b}", f"{concat.output[0]}__ffn{b}"
            concat.input[position] = name
            added.setdefault(holder, []).append(concat)
            nodes[reshape].input[1] = concat.output[0]
        block.removed = sorted(units)
    if added:
        ordered = [n for i, node in enumerate(nodes) for n in [node, *added.get(i, [])]]
        del out.graph.node[:]
        out.graph.node.extend(ordered)
    _drop_unread(out)
    del out.graph.value_info[:]  # recorded shapes name the old widths: ONNX Runtime infers them again
    return out


def _drop_unread(model: onnx.ModelProto) -> None:
    """Initializers and Constant nodes nothing reads any more (the unsliced originals, replaced shapes)."""
    read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    kept_nodes = [n for n in model.graph.node if n.op_type != "Constant" or n.output[0] in read]
    del model.graph.node[:]
    model.graph.node.extend(kept_nodes)
    kept_inits = [i for i in model.graph.initializer if i.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept_inits)


def _zeroed(model: onnx.ModelProto, blocks: list[FeedForward], removed: dict[int, list[int]]) -> onnx.ModelProto:
    """The original with the removed units' rows of each second weight set to zero: what the pruned graph must equal."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = list(out.graph.node)
    for b, units in removed.items():
        block = blocks[b]
        weight = _weight(model, block.down.weight).copy()
        index = [slice(None)] * 2
        index[1 - block.down.output_axis] = units  # type: ignore[call-overload]
        weight[tuple(index)] = 0
        own = f"{block.down.weight}__zeroed{b}"
        out.graph.initializer.append(numpy_helper.from_array(weight, own))
        nodes[block.down.index].input[1] = own
    _drop_unread(out)
    return out


def prune_ffn(model: onnx.ModelProto, spec: PruneStep, feeds: dict[str, np.ndarray], threads: int = 1) -> tuple[onnx.ModelProto, dict[str, Any]]:
    blocks = [b for b in find_blocks(model) if b.name not in set(spec.skip_layers)]
    if not blocks:
        raise FfnPruningUnsupported("structured pruning of this transformer found no feed-forward block whose hidden units can be removed "
                                    "alone; use unstructured pruning, cluster or quantize")
    scores = importance(model, blocks, spec.importance, feeds, threads)
    removed = {}
    for b, block in enumerate(blocks):
        kept = _kept(block.width, spec.layer_amounts.get(block.name, spec.amount), spec.channel_multiple)
        if kept < block.width:
            removed[b] = [int(j) for j in np.argsort(scores[b], kind="stable")[: block.width - kept]]
    pruned = remove(model, blocks, removed)
    expected = session(_zeroed(model, blocks, removed), threads).run(None, feeds)
    problem = differs(pruned, expected, feeds, threads)
    if problem:
        raise FfnPruningUnsupported(f"the graph with feed-forward units removed {problem}; a shape constant probably states the width "
                                    "in a form not recognised")
    rows = [{"layer": b.name, "units_before": b.width, "units_after": b.width - len(b.removed)} for b in blocks]
    return pruned, {"path": "onnx_graph", "why": "the feed-forward blocks reshape around their layers with the width spelled out "
                    "(GPT-2's Conv1D): narrowed in the graph, where those shapes are rewritten, then fine-tuned",
                    "importance": spec.importance if spec.importance in ("l1", "l2") else "mean |activation| x L2 norm of the unit's output weights",
                    "blocks": rows}
