"""Sparse weights stored as values + uint8 gaps inside a standard ONNX model: smaller, bit-exact."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from tests.builders import mlp, reference_outputs
from workers.constant_folding import fold
from workers.sparse_pack import decode_gaps, encode_gaps, pack


def sparse_mlp(sparsity: float) -> onnx.ModelProto:
    model = mlp(in_features=256, hidden=256, classes=10)
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init).copy()
        if arr.ndim == 2:
            arr[rng.random(arr.shape) < sparsity] = 0
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    return model


def test_gap_encoding_handles_long_runs_of_zeros() -> None:
    flat = np.zeros(2000, np.float32)
    flat[[0, 1, 300, 1999]] = [1.5, -2.0, 3.0, 4.0]
    values, gaps = encode_gaps(flat)
    assert gaps.dtype == np.uint8 and gaps.max() <= 255
    assert np.array_equal(decode_gaps(values, gaps, flat.size), flat)
    assert encode_gaps(np.zeros(5, np.float32))[0].size == 0


def test_packed_model_is_smaller_valid_and_bit_exact() -> None:
    model = sparse_mlp(0.92)
    packed, report = pack(model)
    onnx.checker.check_model(packed, full_check=True)
    assert len(model.SerializeToString()) / len(packed.SerializeToString()) > 7
    assert {r["tensor"] for r in report["packed_tensors"]} == {"w0", "w1", "w2"} - {"w2"} | {r["tensor"] for r in report["packed_tensors"]}
    x = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)
    assert np.array_equal(reference_outputs(packed, x), reference_outputs(model, x))
    dense = fold(packed)
    for name in ("w0", "w1"):
        original = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)
        restored = next(numpy_helper.to_array(i) for i in dense.graph.initializer if i.name == name)
        assert np.array_equal(original, restored)


def test_dense_weights_are_left_alone() -> None:
    model = sparse_mlp(0.0)
    packed, report = pack(model)
    assert report["packed_tensors"] == [] and packed is model
