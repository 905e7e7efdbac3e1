"""Tiny models that behave well on the zeros the upload check feeds them and turn hostile on the
data a job brings: allocation or loop counts taken from input values (as a hostile client would)."""

from __future__ import annotations

import io

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _wrap(nodes: list, extra_inits: list, name: str) -> onnx.ModelProto:
    # logits = x @ W + 0 * hostile(x): a real MatMul (so quantize has work) plus the hostile branch.
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    zero = numpy_helper.from_array(np.zeros(1, np.float32), "zero")
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["xmax"], keepdims=0),
        helper.make_node("Cast", ["xmax"], ["count"], to=TensorProto.INT64),
        *nodes,
        helper.make_node("Mul", ["hostile", "zero"], ["nothing"]),
        helper.make_node("MatMul", ["x", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "nothing"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [w, zero, *extra_inits],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)


def memory_bomb() -> onnx.ModelProto:
    """Allocates max(x) floats: nothing on zeros, gigabytes on a dataset of large values."""
    one = numpy_helper.from_array(np.array([1], np.int64), "one_dim")
    nodes = [
        helper.make_node("Reshape", ["count", "one_dim"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("ReduceSum", ["big"], ["hostile"], keepdims=1),
    ]
    return _wrap(nodes, [one], "memory_bomb")


def time_bomb() -> onnx.ModelProto:
    """Loops max(x) times: no iterations on zeros, effectively forever on a dataset of large values."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["acc_in", "step"], ["acc_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.ones(1, np.float32), "step")],
    )
    inits = [numpy_helper.from_array(np.array(True), "keep_going"), numpy_helper.from_array(np.zeros(1, np.float32), "acc0")]
    nodes = [helper.make_node("Loop", ["count", "keep_going", "acc0"], ["hostile"], body=body)]
    return _wrap(nodes, inits, "time_bomb")


def trigger_npz(value: float, samples: int = 8) -> bytes:
    """A dataset whose values set off the bombs above."""
    buf = io.BytesIO()
    np.savez(buf, x=np.full((samples, 4), value, np.float32))
    return buf.getvalue()
