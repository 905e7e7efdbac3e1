"""An embedding table (a Gather's data) takes its own bits in `layer_bits` and can be skipped, named by
its initializer, on both of the cluster step's paths (trainable, and straight on the ONNX weights);
a name that is neither a layer nor a table is still refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.core.errors import InvalidInput
from service.core.specs import ClusterStep
from workers.methods import cluster
from workers.steps import StepContext, StepData

VOCAB, DIM, CLASSES = 400, 32, 5


def embedding_classifier() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((VOCAB, DIM)) * 0.1).astype(np.float32), "wte"),
             numpy_helper.from_array((rng.standard_normal((DIM, CLASSES)) / np.sqrt(DIM)).astype(np.float32), "fc.weight"),
             numpy_helper.from_array(np.array([1], np.int64), "axes")]
    nodes = [helper.make_node("Gather", ["wte", "ids"], ["emb"], name="embed"),
             helper.make_node("ReduceMean", ["emb", "axes"], ["pooled"], keepdims=0, name="pool"),
             helper.make_node("MatMul", ["pooled", "fc.weight"], ["logits"], name="fc")]
    graph = helper.make_graph(nodes, "embedding_classifier", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


@pytest.mark.parametrize("epochs", [0, 1])  # 0: the ONNX weights clustered where they are; 1: the trainable path
def test_the_embedding_table_takes_its_own_bits(epochs: int, tmp_path: Path) -> None:
    ids = np.random.default_rng(1).integers(0, VOCAB, (64, 8)).astype(np.int64)
    step = ClusterStep(bits=4, layer_bits={"wte": 2}, finetune_epochs=epochs, min_elements=64)
    result = cluster.apply(embedding_classifier(), step, StepData(inputs={"ids": ids}), StepContext(work_dir=tmp_path))
    rows = {row["layer"]: row for row in result.report["layers"]}
    assert rows["wte"]["embedding"] and rows["wte"]["bits"] == 2 and rows["wte"]["centroids"] <= 4
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"ids": ids[:3]})[0].shape == (3, CLASSES)


def test_a_skipped_table_stays_float_and_unknown_names_are_refused(tmp_path: Path) -> None:
    ids = np.random.default_rng(2).integers(0, VOCAB, (32, 8)).astype(np.int64)
    result = cluster.apply(embedding_classifier(), ClusterStep(bits=4, skip_layers=["wte"], finetune_epochs=0, min_elements=64),
                           StepData(inputs={"ids": ids}), StepContext(work_dir=tmp_path / "skip"))
    assert "wte" not in {row["layer"] for row in result.report["layers"]}
    assert any(i.name == "wte" and i.data_type == TensorProto.FLOAT for i in result.model.graph.initializer)
    with pytest.raises(InvalidInput) as refused:
        cluster.apply(embedding_classifier(), ClusterStep(bits=4, layer_bits={"wpe": 2}, finetune_epochs=0), StepData(inputs={"ids": ids}),
                      StepContext(work_dir=tmp_path / "unknown"))
    assert refused.value.code == "unknown_layer"
