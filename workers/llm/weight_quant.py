"""Weight-only quantization of a GenAI decoder graph, layer by layer: each matrix product's weight to
int4 or int8 blocks (MatMulNBits) or left in float, by round-to-nearest, GPTQ or HQQ; the embedding
table to 4-bit blocks (GatherBlockQuantized), stored once with a tied lm_head.

The node layout is ONNX Runtime's own (neural_compressor's make_matmul_weight_only_node; HQQ through
its MatMulNBitsQuantizer); the block codes and GPTQ are in workers.quantization.blocks (why there: its
docstring); written here is the per-layer plan (bits chosen per layer, which ORT's quantizers take
for one bit width at a time)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from workers.llm import awq
from workers.llm.calibration import output_error, weight_matmuls
from workers.quantization import blocks, int4


@dataclass
class Plan:
    algorithm: str = "gptq"  # rtn, gptq, hqq, awq (4-bit layers; 8-bit layers are always round-to-nearest, AWQ-scaled under awq)
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    bits: dict[str, int] = field(default_factory=dict)  # MatMul node name -> 4, 8 or 32 (float); absent: 4
    embeddings: bool = True
    tied_embeddings_only: bool = False  # quantize only tables tied to a quantized output projection (stored once, at its bits)
    act_order: bool = True  # GPTQ: columns by decreasing Hessian diagonal, static block scales

    def bits_of(self, node: str) -> int:
        return self.bits.get(node, 4)


def _qdq(weight: np.ndarray, bits: int, plan: Plan) -> np.ndarray:
    """The float weight a block-quantized weight computes with ([K, N], blocks along K)."""
    return blocks.round_to_nearest(weight, bits, plan.block_size, plan.symmetric).dequantized(bits)


def _node(node: onnx.NodeProto, weight_shape: tuple[int, int], codes: blocks.Codes, bits: int, plan: Plan) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    from onnxruntime.quantization.neural_compressor.weight_only import make_matmul_weight_only_node

    return make_matmul_weight_only_node(node=node, weight_shape=weight_shape, num_bits=bits, group_size=plan.block_size,
                                        k_blocks=-(-weight_shape[0] // plan.block_size), q_weight=codes.codes, scale=codes.scale,
                                        zero_point=codes.zero_point, accuracy_level=plan.accuracy_level)


def sensitivity(model: onnx.ModelProto, hessians: dict[str, np.ndarray], plan: Plan) -> list[dict[str, Any]]:
    """Each layer's output error at 4 and at 8 bits on the calibration text (largest first)."""
    inits = {i.name: i for i in model.graph.initializer}
    rows = []
    for node in weight_matmuls(model):
        h = hessians.get(node.input[0])
        if h is None:
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        rows.append({"layer": node.name, "shape": list(weight.shape), "parameters": int(weight.size),
                     "error_int4": output_error(weight, _qdq(weight, 4, plan), h), "error_int8": output_error(weight, _qdq(weight, 8, plan), h)})
    return sorted(rows, key=lambda r: -r["error_int4"])


def _hqq(model: onnx.ModelProto, nodes: list[str], plan: Plan) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    config = HQQWeightOnlyQuantConfig(block_size=plan.block_size, bits=4, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(model, block_size=plan.block_size, nodes_to_include=nodes, accuracy_level=plan.accuracy_level, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def quantize(model: onnx.ModelProto, plan: Plan, hessians: dict[str, np.ndarray] | None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The quantized graph and what happened to each weight."""
    folded, tied = int4.fold_weights(model)
    awq_rows: list[dict[str, Any]] = []
    if plan.algorithm == "awq" and hessians:
        # Scales first (in place on the folded copy), then round-to-nearest on the scaled weights.
        hessians, awq_rows = awq.apply(folded, hessians, plan.bits_of, plan.block_size, plan.symmetric, keep=set(tied))
    inits = {i.name: i for i in folded.graph.initializer}
    float_weights = {name: numpy_helper.to_array(t) for name, t in inits.items()
                     if t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims)) >= int4.MIN_WEIGHTS}
    targets = {n.name: n for n in weight_matmuls(folded)}
    replaced: dict[str, tuple[onnx.NodeProto, list[onnx.TensorProto]]] = {}
    layers, by_weight, hqq_nodes = [], {}, []
    for name, node in targets.items():
        bits, weight = plan.bits_of(name), float_weights.get(node.input[1])
        if bits == 32 or weight is None:
            layers.append({"layer": name, "bits": 32, "algorithm": None, "parameters": int(inits[node.input[1]].dims[0] * inits[node.input[1]].dims[1])})
            continue
        if bits == 4 and plan.algorithm == "hqq":
            hqq_nodes.append(name)
            continue
        algorithm = "gptq" if bits == 4 and plan.algorithm == "gptq" and hessians and node.input[0] in hessians else "rtn"
        if algorithm == "gptq":
            codes = blocks.gptq(weight, hessians[node.input[0]].astype(np.float64), bits, plan.block_size, plan.symmetric,
                                act_order=plan.act_order)
        else:
            codes = blocks.round_to_nearest(weight, bits, plan.block_size, plan.symmetric)
        replaced[name] = _node(node, weight.shape, codes, bits, plan)
        computed = codes.dequantized(bits)
        if bits == 4 and plan.algorithm == "awq":
            algorithm = "awq"
        row = {"layer": name, "bits": bits, "algorithm": algorithm, "parameters": int(weight.size),
               "relative_error": round(float(np.linalg.norm(weight - computed) / max(np.linalg.norm(weight), 1e-12)), 5)}
        if hessians and node.input[0] in hessians:
            row["output_error"] = round(output_error(weight, computed, hessians[node.input[0]]), 6)
        layers.append(row)
    nodes = []
    for node in folded.graph.node:
        if node.name in replaced:
            new, new_inits = replaced[node.name]
            nodes.append(new)
            folded.graph.initializer.extend(new_inits)
            if plan.bits_of(node.name) in (4, 8) and plan.symmetric:  # a tied table can read these codes (GatherBlockQuantized bits 4 or 8)
                by_weight[node.input[1]] = new
        else:
            nodes.append(node)
    del folded.graph.node[:]
    folded.graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in folded.opset_import):
        folded.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    int4.drop_unused(folded)
    if hqq_nodes:
        folded = _hqq(folded, hqq_nodes, plan)
        layers += [{"layer": name, "bits": 4, "algorithm": "hqq", "parameters": int(float_weights[targets[name].input[1]].size)} for name in hqq_nodes]
    shared: list[tuple[str, str]] = []
    embedding_rows: list[dict[str, Any]] = []
    if plan.embeddings:
        tables = {table for weight, table in tied.items() if weight in by_weight}
        untied = [n.name for n in folded.graph.node if n.op_type == "Gather" and n.input[0] not in tables] if plan.tied_embeddings_only else []
        folded, embedding_rows, shared = int4._embeddings(folded, float_weights, tied, by_weight, plan.block_size, untied)
    quantized = sum(r["parameters"] for r in layers if r["bits"] != 32) + sum(int(np.prod(r["shape"])) for r in embedding_rows)
    total = sum(a.size for n, a in float_weights.items() if not (n.endswith("__kn") and n[:-4] in float_weights) and n not in tied)
    return folded, {
        "algorithm": plan.algorithm, "act_order": plan.act_order if plan.algorithm == "gptq" else None, "block_size": plan.block_size, "symmetric": plan.symmetric, "accuracy_level": plan.accuracy_level,
        "layers": layers, "embeddings": embedding_rows,
        "tied_tables_stored_once": [{"table": t, "matmul_weight": w} for t, w in shared],
        **({"awq": awq_rows} if plan.algorithm == "awq" else {}),
        "bits_count": {str(b): sum(1 for r in layers if r["bits"] == b) for b in (4, 8, 32)},
        "float_share": round(1 - quantized / max(1, total), 4),
    }

