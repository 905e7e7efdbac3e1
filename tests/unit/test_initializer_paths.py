"""Unstructured pruning and clustering without fine-tuning work on the ONNX weights directly, so a
graph the trainable converter refuses (here an MLP with Celu activations, which the converter does
not implement) is still pruned and clustered, and the result runs in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.core.errors import CompressionFailed
from service.core.specs import ClusterStep, PruneStep
from workers.methods import cluster, prune
from workers.methods.base import StepContext, StepData


def celu_mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    dims = [64, 128, 128, 10]
    nodes, inits, prev = [], [], "x"
    for i in range(3):
        inits.append(numpy_helper.from_array((rng.standard_normal((dims[i], dims[i + 1])) / np.sqrt(dims[i])).astype(np.float32), f"w{i}"))
        out = "logits" if i == 2 else f"mm{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out], name=f"fc{i}"))
        if i < 2:
            nodes.append(helper.make_node("Celu", [out], [f"h{i}"], name=f"celu{i}"))
            prev = f"h{i}"
    graph = helper.make_graph(nodes, "celu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_the_converter_refuses_this_graph_when_training_is_asked_for(tmp_path: Path) -> None:
    data = StepData(inputs={"x": np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)})
    with pytest.raises(CompressionFailed) as info:
        prune.apply(celu_mlp(), PruneStep(amount=0.5, finetune_epochs=1), data, StepContext(work_dir=tmp_path))
    assert info.value.code == "unsupported_operator" and "Celu" in info.value.message


def test_unstructured_pruning_without_training_prunes_the_onnx_weights(tmp_path: Path) -> None:
    model = celu_mlp()
    result = prune.apply(model, PruneStep(amount=0.6), StepData(), StepContext(work_dir=tmp_path))
    report = result.report
    assert report["path"] == "onnx_initializers" and "Celu" in report["why_no_conversion"]
    assert [row["layer"] for row in report["layers"]] == ["w0", "w1"]  # the output layer is left, as in the trainable path
    assert report["achieved"] == pytest.approx(0.6, abs=0.01)
    assert report["storage"]["packed_tensors"]  # stored sparse: the file really shrinks
    assert len(result.model.SerializeToString()) < 0.75 * len(model.SerializeToString())
    x = np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32)
    assert _run(result.model, x).shape == (8, 10)


def test_clustering_without_training_clusters_the_onnx_weights(tmp_path: Path) -> None:
    model = celu_mlp()
    result = cluster.apply(model, ClusterStep(bits=4), StepData(), StepContext(work_dir=tmp_path))
    report = result.report
    assert report["path"] == "onnx_initializers" and {row["layer"] for row in report["layers"]} == {"w0", "w1", "w2"}
    assert all(row["centroids"] <= 16 for row in report["layers"])
    x = np.random.default_rng(3).standard_normal((8, 64)).astype(np.float32)
    ref, out = _run(model, x), _run(result.model, x)
    cosine = (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    assert cosine.mean() > 0.98
    assert len(result.model.SerializeToString()) < 0.4 * len(model.SerializeToString())
