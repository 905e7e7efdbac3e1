"""int4 weight-only candidates: ONNX Runtime's MatMulNBitsQuantizer (round-to-nearest, HQQ or GPTQ)
for matrix products, and 4-bit block-quantized embedding tables (GatherBlockQuantized).

Two things the quantizer leaves in float are handled here, by hand because no library does them:
- weights reached through a Transpose (GPT-2's output projection is the embedding table transposed)
  or through Gemm(transB) are folded into plain [K, N] MatMul weights first;
- a table used both by a Gather and (transposed) by a MatMul is stored once: the embedding lookup
  reads the MatMulNBits weight and scales through a Reshape (same bytes: rows = vocabulary, 4-bit
  blocks along the hidden size, low nibble first, zero point 8), so tying survives quantization.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from service.core.errors import CompressionFailed
from workers.quantization import blocks as block_codes
from workers.steps import StepData

MIN_WEIGHTS = 1024  # smaller tensors (biases, norms) are not worth a block structure


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest() + str(array.shape)


def drop_unused(model: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nothing reads (a Transpose folded away), then unread initializers."""
    graph = model.graph
    while True:
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in read for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def fold_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Gemm(A, B const) -> MatMul + Add, and MatMul(A, Transpose(W const)) -> MatMul(A, W.T), so
    every constant weight is a [K, N] MatMul input. Returns the model and {matmul weight: embedding
    table} for weights that equal a Gather table transposed (tied)."""
    out = copy.deepcopy(model)
    inits = {i.name: i for i in out.graph.initializer}
    producers = {o: n for n in out.graph.node for o in n.output}
    new_inits: dict[str, onnx.TensorProto] = {}
    nodes = []

    def transposed(name: str) -> str:
        key = f"{name}__kn"
        if key not in new_inits:
            new_inits[key] = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[name]).T), key)
        return key

    for node in out.graph.node:
        attrs = _attrs(node)
        if node.op_type == "Gemm" and node.input[1] in inits and not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0:
            weight = transposed(node.input[1]) if attrs.get("transB", 0) else node.input[1]
            has_bias = len(node.input) > 2 and node.input[2]
            mm_out = f"{node.output[0]}__mm" if has_bias else node.output[0]
            nodes.append(helper.make_node("MatMul", [node.input[0], weight], [mm_out], name=node.name))
            if has_bias:
                nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{node.name}__bias"))
            continue
        if node.op_type == "Gather" and node.input[0] in producers:
            # An embedding lookup on a transposed output projection (ONNX Runtime GenAI's export of a
            # tied lm_head: Gather(Transpose(lm_head weight))): the lookup reads the [V, H] table itself.
            source = producers[node.input[0]]
            if source.op_type == "Transpose" and source.input[0] in inits and len(inits[source.input[0]].dims) == 2 \
                    and list(_attrs(source).get("perm", [1, 0])) == [1, 0] and _attrs(node).get("axis", 0) == 0:
                node = helper.make_node("Gather", [transposed(source.input[0]), node.input[1]], list(node.output), name=node.name, axis=0)
        if node.op_type == "MatMul" and len(node.input) == 2:
            source = producers.get(node.input[1])
            if source is not None and source.op_type == "Transpose" and source.input[0] in inits and len(inits[source.input[0]].dims) == 2 \
                    and list(_attrs(source).get("perm", [1, 0])) == [1, 0]:
                node = helper.make_node("MatMul", [node.input[0], transposed(source.input[0])], list(node.output), name=node.name)
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(new_inits.values())
    drop_unused(out)

    inits = {i.name: i for i in out.graph.initializer}
    tables = {_digest(numpy_helper.to_array(inits[n.input[0]]).T): n.input[0] for n in out.graph.node
              if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2 and _attrs(n).get("axis", 0) == 0}
    tied = {}
    for node in out.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2 and tables:
            table = tables.get(_digest(numpy_helper.to_array(inits[node.input[1]])))
            if table is not None:
                tied[node.input[1]] = table
    return out, tied


class _Reader:
    """GPTQ's calibration data: iterated (ORT's GPTQ deep-copies and iterates it)."""

    def __init__(self, data: StepData, limit: int) -> None:
        self._feeds = list(data.batches(data.batch_size(8), limit=limit))
        self._i = 0

    def __iter__(self) -> Iterator[dict]:
        return iter(self._feeds)

    def get_next(self) -> dict | None:
        self._i += 1
        return self._feeds[self._i - 1] if self._i <= len(self._feeds) else None

    def rewind(self) -> None:
        self._i = 0


def _matmuls(model: onnx.ModelProto, algorithm: str, block_size: int, exclude: list[str], data: StepData | None, samples: int) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig, GPTQWeightOnlyQuantConfig,
                                                                 HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    if algorithm == "hqq":
        config: Any = HQQWeightOnlyQuantConfig(block_size=block_size, bits=4, op_types_to_quantize=("MatMul",))
    elif algorithm == "gptq":
        if data is None or not data.available:
            raise CompressionFailed("GPTQ calibrates on data: submit the job with a dataset_id, or use int4_algorithm rtn or hqq", code="dataset_required")
        config = GPTQWeightOnlyQuantConfig(calibration_data_reader=_Reader(data, samples), block_size=block_size, op_types_to_quantize=("MatMul",))
    else:
        config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, op_types_to_quantize=("MatMul",))
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # one INFO line per node otherwise
    quantizer = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True, nodes_to_exclude=exclude, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def _unpack4(packed: np.ndarray, count: int) -> np.ndarray:
    flat = packed.reshape(packed.shape[0], -1)
    out = np.empty((flat.shape[0], flat.shape[1] * 2), np.uint8)
    out[:, 0::2], out[:, 1::2] = flat & 0x0F, flat >> 4
    return out[:, :count]


def dequantize_matmulnbits(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray:
    """The [K, N] float weight a MatMulNBits node computes with (for the per-layer error)."""
    attrs = _attrs(node)
    k, n, block, bits = attrs["K"], attrs["N"], attrs["block_size"], attrs.get("bits", 4)
    blocks = -(-k // block)
    raw_q = numpy_helper.to_array(inits[node.input[1]])
    q = (raw_q if bits == 8 else _unpack4(raw_q, blocks * block)).astype(np.float32).reshape(n, blocks, block)
    scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(n, blocks, 1)
    zp: np.ndarray | float = float(2 ** (bits - 1))
    if len(node.input) > 3 and node.input[3] and bits == 4:
        raw = numpy_helper.to_array(inits[node.input[3]])
        zp = (raw if raw.dtype != np.uint8 else _unpack4(raw.reshape(n, -1), blocks)).astype(np.float32).reshape(n, blocks, 1)
    return ((q - zp) * scales).reshape(n, blocks * block)[:, :k].T


def _quantize_table(table: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 4-bit blocks along each row, on the grid ONNX Runtime's own quantizer uses (the
    block's largest magnitude exactly on -8 steps): (packed uint8 [V, H/2], scales [V, H/block])."""
    v, h = table.shape
    codes = block_codes.round_to_nearest(table.T, 4, block, True)  # a [K=H, N=V] weight, blocks along H
    q = codes.codes.reshape(v, h)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8), codes.scale.reshape(v, h // block)


def _relative_error(before: np.ndarray, after: np.ndarray) -> float:
    return float(np.linalg.norm(before - after) / max(np.linalg.norm(before), 1e-12))


def quantize(model: onnx.ModelProto, *, algorithm: str, block_size: int, embeddings: bool, exclude: list[str], data: StepData | None = None,
             samples: int = 128) -> tuple[onnx.ModelProto, dict[str, Any]]:
    folded, tied = fold_weights(model)
    float_weights = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer
                     if i.data_type == onnx.TensorProto.FLOAT and numpy_helper.to_array(i).size >= MIN_WEIGHTS}
    result = _matmuls(folded, algorithm, block_size, exclude, data, samples)
    if not any(n.op_type == "MatMulNBits" for n in result.graph.node):
        raise CompressionFailed("int4_weight_only found no MatMul/Gemm with a constant weight to quantize (MatMulNBits does not cover convolutions)",
                                code="nothing_to_quantize")
    inits = {i.name: i for i in result.graph.initializer}
    layers, quantized_weights = [], set()
    by_weight = {}
    for node in result.graph.node:
        if node.op_type == "MatMulNBits":
            weight = next((w for w in float_weights if node.input[1].startswith(f"{w}_Q")), None)
            if weight is None:
                continue
            by_weight[weight] = node
            quantized_weights.add(weight)
            layers.append({"layer": node.name or weight, "weight": weight, "kind": "matmul", "shape": list(float_weights[weight].shape),
                           "algorithm": algorithm, "relative_error": round(_relative_error(float_weights[weight], dequantize_matmulnbits(node, inits)), 5)})
    shared = []
    if embeddings:
        result, gathers, shared = _embeddings(result, float_weights, tied, by_weight, block_size, exclude)
        layers += gathers
        quantized_weights |= {g["weight"] for g in gathers}
    for table, _weight in shared:
        quantized_weights.add(table)
    float_left = {name: arr.size for name, arr in float_weights.items() if name not in quantized_weights and not name.endswith("__kn")}
    # Each stored weight once: a folded transpose stands for its source table.
    total = sum(arr.size for name, arr in float_weights.items() if not (name.endswith("__kn") and name[:-4] in float_weights) and name not in tied)
    users = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, node.op_type)
    stayed = [{"weight": name, "parameters": size, "why": _why_float(name, users.get(name), exclude, embeddings, block_size, float_weights[name])}
              for name, size in sorted(float_left.items(), key=lambda kv: -kv[1])]
    return result, {
        "algorithm": algorithm,
        "block_size": block_size,
        "layers": layers,
        "tied_tables_stored_once": [{"table": t, "matmul_weight": w} for t, w in shared],
        "float_weights": stayed,
        "float_share": round(sum(float_left.values()) / max(1, total), 4),
    }


def _why_float(name: str, op: str | None, exclude: list[str], embeddings: bool, block: int, array: np.ndarray) -> str:
    if op == "Conv":
        return "convolution: ONNX Runtime's 4-bit kernels (MatMulNBits) cover matrix products only"
    if op == "Gather":
        if not embeddings:
            return "embedding table: int4_embeddings is off"
        if array.ndim != 2 or array.shape[1] % block:
            return f"embedding table whose row length is not a multiple of block_size {block}"
        return "embedding table excluded"
    if exclude:
        return "excluded by the step (exclude_nodes) or left in float by the algorithm"
    return f"{op or 'unused'} weight: not a matrix product's constant operand"


def _embeddings(model: onnx.ModelProto, float_weights: dict[str, np.ndarray], tied: dict[str, str], by_weight: dict[str, onnx.NodeProto],
                block: int, exclude: list[str]) -> tuple[onnx.ModelProto, list[dict[str, Any]], list[tuple[str, str]]]:
    out = copy.deepcopy(model)
    inits = {i.name: i for i in out.graph.initializer}
    table_to_matmul = {t: w for w, t in tied.items() if w in by_weight and len(by_weight[w].input) == 3}  # symmetric: no zero points
    nodes, layers, shared, added = [], [], [], []
    for node in out.graph.node:
        table = node.input[0] if node.op_type == "Gather" else None
        if table is None or table not in float_weights or node.name in exclude or _attrs(node).get("axis", 0) != 0:
            nodes.append(node)
            continue
        array = float_weights[table]
        if array.ndim != 2 or array.shape[1] % block:
            nodes.append(node)
            continue
        v, h = array.shape
        prefix = f"{table}__q4"
        bits = 4
        if table in table_to_matmul:
            # The table is the output projection's weight: read its MatMulNBits codes (4 or 8 bits) and
            # scales through a Reshape, the same bytes stored once.
            mm = by_weight[table_to_matmul[table]]
            bits = int(_attrs(mm).get("bits", 4))
            data, scales = f"{prefix}_data", f"{prefix}_scales"
            added += [numpy_helper.from_array(np.array([v, h * bits // 8], np.int64), f"{prefix}_dshape"),
                      numpy_helper.from_array(np.array([v, h // block], np.int64), f"{prefix}_sshape")]
            nodes += [helper.make_node("Reshape", [mm.input[1], f"{prefix}_dshape"], [data], name=f"{prefix}_reshape_data"),
                      helper.make_node("Reshape", [mm.input[2], f"{prefix}_sshape"], [scales], name=f"{prefix}_reshape_scales")]
            shared.append((table, table_to_matmul[table]))
            deq = dequantize_matmulnbits(mm, inits).T
        else:
            packed, scale = _quantize_table(array, block)
            data, scales = f"{prefix}_data", f"{prefix}_scales"
            added += [numpy_helper.from_array(packed, data), numpy_helper.from_array(scale, scales)]
            q = _unpack4(packed, h).astype(np.float32).reshape(v, h // block, block)
            deq = ((q - 8) * scale[..., None]).reshape(v, h)
        nodes.append(helper.make_node("GatherBlockQuantized", [data, node.input[1], scales], list(node.output), name=node.name or prefix,
                                      domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=block, bits=bits))
        layers.append({"layer": node.name or table, "weight": table, "kind": "embedding", "shape": [v, h], "algorithm": "shared" if table in table_to_matmul else "rtn", "bits": bits,
                       "relative_error": round(_relative_error(array, deq), 5), "stored_once_with": table_to_matmul.get(table)})
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(added)
    drop_unused(out)
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out, layers, shared
