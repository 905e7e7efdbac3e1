"""The deployable early-exit model: the user's graph cut at each exit into nested ONNX `If` nodes, so
computation really stops at the exit taken. Exit i computes its head; when every sample in the batch
reaches the threshold (at batch 1: that sample) the `If` answers with the head's logits, otherwise its
else-branch runs the next part of the original graph. Outputs: the original's first output, and
`exit_index` (0-based; the number of exits means the final head). ONNX Runtime runs subgraphs that read
outer-scope tensors, so no tensor is copied."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from workers.dynamic.heads import Exit

EXIT_INDEX = "exit_index"
THRESHOLD = "early_exit_threshold"


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def _ancestors(tensor: str, nodes: list[onnx.NodeProto]) -> set[int]:
    """Indices (into `nodes`) of the nodes needed to compute `tensor` from what is already available."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    needed, stack = set(), [tensor]
    while stack:
        name = stack.pop()
        i = producer.get(name)
        if i is None or i in needed:
            continue
        needed.add(i)
        stack.extend(x for x in nodes[i].input if x)
    return needed


def _head_nodes(exit_: Exit, index: int, opset: int, inits: list[onnx.TensorProto]) -> tuple[list[onnx.NodeProto], str, str]:
    prefix = f"early_exit{index}"
    nodes, current = [], exit_.tensor
    if exit_.kernel is not None:
        nodes.append(helper.make_node("AveragePool", [current], [f"{prefix}_pooled"], kernel_shape=list(exit_.kernel), strides=list(exit_.kernel), name=f"{prefix}_pool"))
        current = f"{prefix}_pooled"
    nodes.append(helper.make_node("Flatten", [current], [f"{prefix}_flat"], axis=1, name=f"{prefix}_flatten"))
    current = f"{prefix}_flat"
    linears = [m for m in exit_.head if isinstance(m, torch.nn.Linear)]
    for j, linear in enumerate(linears):
        inits += [numpy_helper.from_array(linear.weight.detach().numpy().astype(np.float32), f"{prefix}_weight{j}"),
                  numpy_helper.from_array(linear.bias.detach().numpy().astype(np.float32), f"{prefix}_bias{j}")]
        output = f"{prefix}_logits" if j == len(linears) - 1 else f"{prefix}_hidden{j}"
        nodes.append(helper.make_node("Gemm", [current, f"{prefix}_weight{j}", f"{prefix}_bias{j}"], [output], transB=1, name=f"{prefix}_linear{j}"))
        if j < len(linears) - 1:
            nodes.append(helper.make_node("Relu", [output], [f"{output}_relu"], name=f"{prefix}_relu{j}"))
            output = f"{output}_relu"
        current = output
    logits = current
    nodes.append(helper.make_node("Softmax", [logits], [f"{prefix}_probs"], axis=1, name=f"{prefix}_softmax"))
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array([1], np.int64), f"{prefix}_axis"))
        nodes.append(helper.make_node("ReduceMax", [f"{prefix}_probs", f"{prefix}_axis"], [f"{prefix}_confidence"], keepdims=0, name=f"{prefix}_confidence"))
    else:
        nodes.append(helper.make_node("ReduceMax", [f"{prefix}_probs"], [f"{prefix}_confidence"], axes=[1], keepdims=0, name=f"{prefix}_confidence"))
    nodes.append(helper.make_node("ReduceMin", [f"{prefix}_confidence"], [f"{prefix}_least"], keepdims=0, name=f"{prefix}_batch_least"))
    nodes.append(helper.make_node("GreaterOrEqual", [f"{prefix}_least", THRESHOLD], [f"{prefix}_leave"], name=f"{prefix}_decide"))
    return nodes, logits, f"{prefix}_leave"


def deployable(model: onnx.ModelProto, exits: list[Exit], threshold: float) -> onnx.ModelProto:
    out = copy.deepcopy(model)
    graph = out.graph
    final = graph.output[0].name
    opset = _opset(out)
    inits: list[onnx.TensorProto] = [numpy_helper.from_array(np.array(threshold, np.float32), THRESHOLD)]

    def scope_outputs(level: int) -> tuple[str, str]:
        return (final, EXIT_INDEX) if level == 0 else (f"{final}__after_exit{level - 1}", f"{EXIT_INDEX}__after_exit{level - 1}")

    def build(level: int, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
        value, index = scope_outputs(level)
        if level == len(exits):  # the rest of the original graph, its final output renamed for this scope
            renamed = []
            for node in nodes:
                node = copy.deepcopy(node)
                node.output[:] = [value if o == final else o for o in node.output]
                node.input[:] = [value if i == final else i for i in node.input]
                renamed.append(node)
            return renamed + [helper.make_node("Constant", [], [index], value=numpy_helper.from_array(np.array(level, np.int64)), name=f"early_exit_final_index{level}")]
        stage_ids = _ancestors(exits[level].tensor, nodes)
        stage = [n for i, n in enumerate(nodes) if i in stage_ids]
        rest = [n for i, n in enumerate(nodes) if i not in stage_ids]
        head, logits, leave = _head_nodes(exits[level], level, opset, inits)
        then_value, then_index = f"{value}__exit{level}", f"{index}__exit{level}"
        then_branch = helper.make_graph(
            [helper.make_node("Identity", [logits], [then_value], name=f"early_exit{level}_answer"),
             helper.make_node("Constant", [], [then_index], value=numpy_helper.from_array(np.array(level, np.int64)), name=f"early_exit{level}_index")],
            f"exit{level}", [], [helper.make_tensor_value_info(then_value, TensorProto.FLOAT, None), helper.make_tensor_value_info(then_index, TensorProto.INT64, [])])
        inner_value, inner_index = scope_outputs(level + 1)
        else_branch = helper.make_graph(build(level + 1, rest), f"continue{level}", [],
                                        [helper.make_tensor_value_info(inner_value, TensorProto.FLOAT, None), helper.make_tensor_value_info(inner_index, TensorProto.INT64, [])])
        branch = helper.make_node("If", [leave], [value, index], then_branch=then_branch, else_branch=else_branch, name=f"early_exit{level}_if")
        return stage + head + [branch]

    nodes = build(0, list(graph.node))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    graph.output.append(helper.make_tensor_value_info(EXIT_INDEX, TensorProto.INT64, []))
    del graph.value_info[:]
    return out
