"""Steps that train nothing (unstructured pruning and clustering without fine-tuning, binary without
straight-through training) work on the ONNX weights where they are stored: a graph the trainable
converter refuses (here an MLP with Celu activations, which the converter does not implement) is
still pruned, clustered and binarised, the rest of the user's graph is kept as it was, and layers
carry the same torch names as on the trainable path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench.architectures import export
from service.core.errors import CompressionFailed, InvalidInput
from service.core.specs import ClusterStep, PruneStep, QuantizeStep
from workers.clustering.storage import group_offsets
from workers.methods import cluster, prune, quantize_lowbit
from workers.steps import StepContext, StepData
from workers.pruning.layers import weighted_layers
from workers.trainable.run import TrainableRun


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
    assert report["path"] == "onnx_initializers" and "no conversion" in report["why_no_conversion"]
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


def test_binary_without_training_binarises_the_onnx_weights(tmp_path: Path) -> None:
    model = celu_mlp()
    result, report = quantize_lowbit.binary(model, QuantizeStep(mode="binary"), StepData(), StepContext(work_dir=tmp_path))
    assert report["path"] == "onnx_initializers" and report["binarized_layers"] == ["w1"]  # first and last kept float
    x = np.random.default_rng(4).standard_normal((8, 64)).astype(np.float32)
    # The same function computed by hand: w1 -> sign(w1) x the mean |w1| of each output channel (a column of MatMul's [in, out]).
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w1"))
    alpha = np.abs(w).mean(axis=0, keepdims=True)
    celu = lambda v: np.maximum(v, 0) + np.minimum(0, np.expm1(np.minimum(v, 0)))  # noqa: E731 (alpha=1)
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    expected = celu(celu(x @ weights["w0"]) @ np.where(w >= 0, alpha, -alpha)) @ weights["w2"]
    np.testing.assert_allclose(_run(result, x), expected, rtol=1e-4, atol=1e-4)
    assert len(result.SerializeToString()) < 0.6 * len(model.SerializeToString())


@pytest.fixture(scope="module")
def bert_dynamo(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    return onnx.load(str(export("bert", "dynamo", tmp_path_factory.mktemp("bert")).path))


def test_a_convertible_transformer_is_also_pruned_in_place_with_its_torch_layer_names(bert_dynamo: onnx.ModelProto, tmp_path: Path) -> None:
    """The converter would take this graph, but nothing is trained: no conversion, the uploaded graph's
    nodes are all still there, and the layer names are the ones the trainable path reports."""
    trainable_names = list(weighted_layers(TrainableRun(bert_dynamo, StepData()).module))
    skipped = trainable_names[0]
    result = prune.apply(bert_dynamo, PruneStep(amount=0.5, skip_layers=[skipped]), StepData(), StepContext(work_dir=tmp_path))
    layers = [row["layer"] for row in result.report["layers"]]
    assert result.report["path"] == "onnx_initializers"
    assert layers == trainable_names[1:-1]  # skipped by its torch name; the output layer left as on the trainable path
    assert all(name.startswith("model.encoder.layer.") for name in layers)
    assert {n.name for n in bert_dynamo.graph.node} <= {n.name for n in result.model.graph.node}
    with pytest.raises(InvalidInput) as info:
        prune.apply(bert_dynamo, PruneStep(amount=0.5, skip_layers=["no.such.layer"]), StepData(), StepContext(work_dir=tmp_path))
    assert info.value.code == "unknown_layer" and trainable_names[0] in info.value.message


def test_grouped_codebooks_on_stored_weights_follow_output_channels(bert_dynamo: onnx.ModelProto, tmp_path: Path) -> None:
    """MatMul stores [in, out]: groups of output channels are columns there, as torch's rows are."""
    result = cluster.apply(bert_dynamo, ClusterStep(bits=4, group_size=8, min_elements=256), StepData(), StepContext(work_dir=tmp_path))
    row = next(r for r in result.report["layers"] if r["layer"].endswith("intermediate.dense"))
    init = next(i for i in bert_dynamo.graph.initializer if i.name == row["initializer"])
    stored = numpy_helper.to_array(init)
    c = cluster._cluster_layer(stored.T.copy(), 4, "linear", 0, 8)
    assert group_offsets(c).shape == (stored.shape[1], 1)  # one codebook offset per output channel
    offsets = [i for i in result.model.graph.initializer if i.name.endswith("o") and i.name.startswith("cl")]
    assert offsets and all(numpy_helper.to_array(o).shape[0] == 1 for o in offsets)  # per column of the stored [in, out]
    feeds = {"input_ids": np.random.default_rng(5).integers(1, 100, (4, 12)).astype(np.int64), "attention_mask": np.ones((4, 12), np.int64)}
    feeds = {i.name: feeds[i.name] for i in bert_dynamo.graph.input}
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0].reshape(4, -1)  # noqa: E731
    ref, out = run(bert_dynamo), run(result.model)
    cosine = (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    assert cosine.min() > 0.98  # the codebooks decode onto the weights they were made for
