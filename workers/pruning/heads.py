"""Attention-head pruning on the ONNX graph itself: whole heads removed from a transformer's
self-attention blocks, so the query/key/value projections and the output projection are physically
narrower (fewer MACs, faster at every batch size).

Why on the graph and not through torch-pruning: the converter's module runs the exporter's reshapes
into heads as ONNX ops, which DepGraph cannot see through, while the graph states them plainly. Both
torch exporters write Hugging Face attention as `view(batch, seq, -1, head_dim)` ... `reshape(batch,
seq, -1)`, so the number of heads is inferred at run time and removing a head needs only its slices
of Q, K, V (output columns and biases) and of the output projection (input rows). A graph that spells
the head count out in a constant is detected by the check below, not silently mis-pruned.

Importance is measured, not guessed: each head is switched off alone (its slice of the output
projection's input multiplied by 0, through a mask input added to one ONNX Runtime session) and the
change of the model's outputs on the data is its importance (Michel et al. 2019 rank heads by the
loss change; without labels, the output change stands in). The lowest-ranked heads across the model
are removed, keeping at least one per block. The pruned graph must then compute exactly what the
original computes with those heads masked, or the step fails with `head_pruning_unsupported`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.core.errors import CompressionFailed
from workers.onnx_weights import layer_name
from workers.activations import session
from workers.pruning.graph import OnnxGraph, Projection, differs, slice_initializer
from workers.pruning.refit import refit_projection_inputs

# Ops between the attention scores and the softmax, and from the softmax to its use.
PROBS_THROUGH = {"Where", "IsNaN", "Cast", "Dropout", "Identity", "Mul", "Div"}  # softmax -> probabilities as used
SCORES_THROUGH = {"Add", "Where", "Mul", "Div", "Cast", "Sub"}  # scores -> softmax (mask, scaling)


class HeadPruningUnsupported(CompressionFailed):
    code = "head_pruning_unsupported"


@dataclass
class AttentionBlock:
    name: str
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    head_dim: int
    heads: int
    # Reshapes that spell the head count out (a constant [.., heads, head_dim] target after a projection, or
    # [.., heads * head_dim] before the output projection: exports with a fixed sequence length fold to these).
    split_shapes: list[int] = field(default_factory=list)
    merge_shapes: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)


def find_blocks(model: onnx.ModelProto) -> list[AttentionBlock]:
    """Self-attention blocks with separate Q, K, V projections (BERT, MiniLM, RoBERTa, DistilBERT, ViT).
    GPT-2's fused c_attn (one projection split three ways) is not matched."""
    g = OnnxGraph(model)
    blocks = []
    for node in g.nodes:
        if node.op_type != "MatMul" or len(g.computed(node)) != 2:
            continue
        softmax = g.upstream_op(node.input[0], "Softmax", PROBS_THROUGH)
        if softmax is None:
            continue  # not probabilities x values
        scores = g.upstream_op(softmax.input[0], "MatMul", SCORES_THROUGH)
        if scores is None or len(g.computed(scores)) != 2:
            continue
        q, k = g.upstream_projection(scores.input[0]), g.upstream_projection(scores.input[1])
        v, o = g.upstream_projection(node.input[1]), g.downstream_projection(node.output[0])
        if None in (q, k, v, o):
            continue
        assert q is not None and k is not None and v is not None and o is not None
        head_dim = g.head_dim(v) or g.head_dim(q)
        width = numpy_helper.to_array(g.inits[v.weight]).shape[v.output_axis]
        if not head_dim or width % head_dim or len({q.weight, k.weight, v.weight}) != 3:
            continue
        heads = width // head_dim
        split = [r for r in (g.reshape_after(p) for p in (q, k, v)) if r is not None and _entry(g.const(r.input[1]), -2) == heads]
        merge = [r for r in g.reshapes_between(node.output[0], o.node) if _entry(g.const(r.input[1]), -1) == width]
        # Named after the output projection's module ("...attention.output.dense" -> "...attention.output").
        name = layer_name(o.weight, o.node)
        blocks.append(AttentionBlock(name.rsplit(".", 1)[0] if "." in name else name, q, k, v, o, head_dim, heads,
                                     [g.index[id(r)] for r in split], [g.index[id(r)] for r in merge]))
    return blocks


def _entry(shape: np.ndarray | None, position: int) -> int | None:
    return int(shape[position]) if shape is not None and shape.ndim == 1 and shape.size >= abs(position) else None


def _masked(model: onnx.ModelProto, blocks: list[AttentionBlock]) -> onnx.ModelProto:
    """The model with a head mask input per block, multiplied into the output projection's input."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inserts = []
    for b, block in enumerate(blocks):
        index = block.o.index
        source = out.graph.node[index].input[0]
        mask, masked = f"heads__mask{b}", f"heads__masked{b}"
        out.graph.input.append(helper.make_tensor_value_info(mask, TensorProto.FLOAT, [block.heads * block.head_dim]))
        out.graph.node[index].input[0] = masked
        inserts.append((index, helper.make_node("Mul", [source, mask], [masked], name=f"heads__mul{b}")))
    for index, node in sorted(inserts, key=lambda t: -t[0]):
        out.graph.node.insert(index, node)
    return out


def _masks(blocks: list[AttentionBlock], off: dict[int, list[int]] | None = None) -> dict[str, np.ndarray]:
    feeds = {}
    for b, block in enumerate(blocks):
        mask = np.ones(block.heads * block.head_dim, np.float32)
        for h in (off or {}).get(b, []):
            mask[h * block.head_dim:(h + 1) * block.head_dim] = 0.0
        feeds[f"heads__mask{b}"] = mask
    return feeds


def importance(model: onnx.ModelProto, blocks: list[AttentionBlock], feeds: dict[str, np.ndarray], threads: int = 1) -> np.ndarray:
    """[blocks, heads]: the relative change of the model's first output when that head alone is off."""
    masked = session(_masked(model, blocks), threads)
    reference = masked.run(None, {**feeds, **_masks(blocks)})[0].astype(np.float64)
    scale = float((reference ** 2).mean()) or 1.0
    scores = np.full((len(blocks), max(b.heads for b in blocks)), np.inf)
    for b, block in enumerate(blocks):
        for h in range(block.heads):
            out = masked.run(None, {**feeds, **_masks(blocks, {b: [h]})})[0]
            scores[b, h] = float(((out - reference) ** 2).mean()) / scale
    return scores


def choose(blocks: list[AttentionBlock], scores: np.ndarray, fraction: float) -> dict[int, list[int]]:
    """The lowest-scored heads across blocks, `fraction` of all, at least one head kept per block."""
    total = sum(b.heads for b in blocks)
    budget = int(round(fraction * total))
    order = sorted(((scores[b, h], b, h) for b, block in enumerate(blocks) for h in range(block.heads)))
    removed: dict[int, list[int]] = {}
    for _, b, h in order:
        if budget == 0:
            break
        if len(removed.get(b, [])) < blocks[b].heads - 1:
            removed.setdefault(b, []).append(h)
            budget -= 1
    return {b: sorted(hs) for b, hs in removed.items()}


def remove(model: onnx.ModelProto, blocks: list[AttentionBlock], removed: dict[int, list[int]]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = list(out.graph.node)
    inits = {i.name: i for i in out.graph.initializer}
    original = OnnxGraph(model)  # for the shape constants, read once
    readers: dict[str, int] = {}
    for n in nodes:
        for value in n.input:
            readers[value] = readers.get(value, 0) + 1
    used_before = {i.name for i in out.graph.initializer}
    for b, heads in removed.items():
        block = blocks[b]
        keep = np.concatenate([np.arange(h * block.head_dim, (h + 1) * block.head_dim) for h in range(block.heads) if h not in heads])
        for tag, proj in (("q", block.q), ("k", block.k), ("v", block.v)):
            slice_initializer(out, inits, readers, proj.weight, proj.output_axis, keep, nodes[proj.index], f"h{b}{tag}")
            if proj.bias:
                slice_initializer(out, inits, readers, proj.bias, 0, keep, nodes[proj.bias_index if proj.bias_index is not None else proj.index], f"h{b}{tag}b", proj.bias_source)
        slice_initializer(out, inits, readers, block.o.weight, 1 - block.o.output_axis, keep, nodes[block.o.index], f"h{b}o")
        kept = block.heads - len(heads)
        for indices, position, value in ((block.split_shapes, -2, kept), (block.merge_shapes, -1, kept * block.head_dim)):
            for index in indices:
                shape = original.const(original.nodes[index].input[1])
                assert shape is not None
                shape = shape.copy()
                shape[position] = value
                name = f"heads__shape{b}_{index}"
                out.graph.initializer.append(numpy_helper.from_array(shape, name))
                nodes[index].input[1] = name
        block.removed = heads
    # Drop initializers nothing reads any more (the unsliced originals).
    read = {i for n in out.graph.node for i in n.input} | {o.name for o in out.graph.output}
    kept = [i for i in out.graph.initializer if i.name in read or i.name not in used_before]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    # Shapes recorded for intermediate values may name the old widths: let ONNX Runtime infer them.
    del out.graph.value_info[:]
    return out


def prune_heads(model: onnx.ModelProto, fraction: float, feeds: dict[str, np.ndarray], threads: int = 1,
                refit_on: tuple[dict[str, np.ndarray], np.ndarray | None] | None = None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """`refit_on`: data (feeds and the real-token mask) to refit each narrowed output projection on
    by least squares (workers.pruning.refit), or None."""
    blocks = find_blocks(model)
    if not blocks:
        raise HeadPruningUnsupported(
            "no self-attention block with separate query, key and value projections was found (GPT-2's fused c_attn is not "
            "supported); leave `heads` at 0 to prune feed-forward units only",
        )
    scores = importance(model, blocks, feeds, threads)
    removed = choose(blocks, scores, fraction)
    pruned = remove(model, blocks, removed)
    # The pruned graph must compute what the original computes with those heads masked.
    expected = session(_masked(model, blocks), threads).run(None, {**feeds, **_masks(blocks, removed)})
    problem = differs(pruned, expected, feeds, threads)
    if problem:  # an exporter that spells the head count out in a constant reshape
        raise HeadPruningUnsupported(f"the graph with heads removed {problem}; its reshapes into heads probably state the head count as a constant")
    rows = [{"layer": block.name, "heads_before": block.heads, "heads_after": block.heads - len(block.removed), "head_dim": block.head_dim,
             "removed": block.removed, "importance": [round(float(s), 6) for s in scores[b, :block.heads]]} for b, block in enumerate(blocks)]
    total = sum(b.heads for b in blocks)
    report = {"removed": sum(len(h) for h in removed.values()), "total": total, "fraction_asked": fraction,
              "importance": "relative change of the outputs with the head switched off, on the job's data", "blocks": rows}
    if refit_on is not None and removed:
        report["refit"] = refit_projection_inputs(model, pruned, [blocks[b].o for b in removed], refit_on[0], refit_on[1], threads)
    return pruned, report
