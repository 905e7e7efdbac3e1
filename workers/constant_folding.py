"""Fold constant subgraphs into plain initializers with ONNX's reference evaluator (exact numpy).

Our compact encodings (sparse gaps, clustered indices, bit-packed signs) rebuild dense weights inside
the graph from constants. ONNX Runtime folds those at session start; this does the same offline, so
training (the torch converter) and parameter counting see the dense weights, bit for bit.
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

# Ops whose output depends only on their inputs; anything else is left in place.
# Quantization nodes stay: they are the quantized model's storage format, as ONNX Runtime keeps them.
_NEVER_FOLD = {
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
}


def fold(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = model.graph
    nodes = list(graph.node)
    constant = {i.name for i in graph.initializer}
    folded_idx: set[int] = set()
    for index, node in enumerate(nodes):
        if node.domain in ("", "ai.onnx") and node.op_type not in _NEVER_FOLD and all(i == "" or i in constant for i in node.input) and node.op_type != "Constant":
            folded_idx.add(index)
            constant.update(node.output)
    if not folded_idx:
        return model
    foldable = [nodes[i] for i in sorted(folded_idx)]
    rest = [n for i, n in enumerate(nodes) if i not in folded_idx]
    folded_outputs = {o for n in foldable for o in n.output}
    consumed_later = {i for n in rest for i in n.input} | {o.name for o in graph.output}
    wanted = sorted(folded_outputs & consumed_later)
    if not wanted:
        return model
    needed_inits = {i for n in foldable for i in n.input}
    sub = helper.make_graph(
        foldable, "constants", [],
        [helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None) for name in wanted],
        [i for i in graph.initializer if i.name in needed_inits],
    )
    sub_model = helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
    try:
        values = ReferenceEvaluator(sub_model).run(None, {})
    except Exception:  # noqa: BLE001 - an operator the reference evaluator lacks: leave the graph as it is
        return model

    out = onnx.ModelProto()
    out.CopyFrom(model)
    still_used = consumed_later
    keep_inits = [i for i in graph.initializer if i.name in still_used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep_inits + [numpy_helper.from_array(v, name) for name, v in zip(wanted, values)])
    del out.graph.node[:]
    out.graph.node.extend(rest)
    return out
