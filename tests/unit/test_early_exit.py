"""early_exit on a LeNet-5 trained briefly on real MNIST: heads, the threshold policy, and the
deployable ONNX model in which computation stops at the exit taken."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from service.core.errors import CompressionFailed
from service.core.methods.early_exit import EarlyExitStep
from tests import mnist
from workers.dynamic.onnx_exits import EXIT_INDEX
from workers.methods import early_exit
from workers.steps import StepContext, StepData

pytestmark = pytest.mark.skipif(not mnist.available(), reason="MNIST files are not in ../shared/data/mnist")


@pytest.fixture(scope="module")
def lenet5() -> tuple[onnx.ModelProto, StepData]:
    torch.manual_seed(0)
    x, y = mnist.load("train")
    x, y = x[:4000].reshape(-1, 1, 28, 28), y[:4000]
    net = nn.Sequential(nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))
    net = mnist.fit(net, torch.from_numpy(x), torch.from_numpy(y), epochs=1)
    model = onnx.load_model_from_string(mnist.export(net, torch.zeros(2, 1, 28, 28)))
    test_x, test_y = mnist.load("test")
    data = StepData(inputs={"x": x[:3000]}, labels=y[:3000])
    data.evaluation = StepData(inputs={"x": test_x[:600].reshape(-1, 1, 28, 28)}, labels=test_y[:600])
    return model, data


def test_exits_policy_and_a_model_that_stops_at_the_exit_taken(lenet5: tuple[onnx.ModelProto, StepData], tmp_path: Path) -> None:
    model, data = lenet5
    result = early_exit.apply(model, EarlyExitStep(max_accuracy_drop=0.02, epochs=5), data, StepContext(work_dir=tmp_path))
    report = result.report
    EarlyExitStep.report_model.model_validate({"index": 0, "method": EarlyExitStep().method, **json.loads(json.dumps(report, default=str))})
    assert [e["layer"] for e in report["exits"]] == ["0"]  # the only layer within the first half of LeNet-5's MACs
    assert report["exits"][0]["share_of_model_macs"] < 0.2
    chosen = report["chosen"]
    assert chosen["accuracy_drop"] <= 0.02 and chosen["mac_reduction"] > 0 and chosen["exit_shares"][0] > 0
    assert len(report["thresholds"]) == 15
    # The deployable model: same input and first output, plus exit_index; nested If, so the rest is skipped.
    onnx.checker.check_model(result.model, full_check=True)
    assert [o.name for o in result.model.graph.output] == ["logits", EXIT_INDEX]
    assert any(n.op_type == "If" for n in result.model.graph.node)
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    exited = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    threshold = chosen["threshold"]
    taken = []
    for i in range(60):
        feed = {"x": data.evaluation.inputs["x"][i:i + 1]}
        logits, index = exited.run(None, feed)
        taken.append(int(index))
        if index == 1:  # the final exit is the original model, unchanged
            np.testing.assert_allclose(logits, original.run(None, feed)[0], rtol=1e-5, atol=1e-5)
        else:
            assert torch.softmax(torch.from_numpy(logits), 1).max().item() >= threshold
    assert 0 in taken and 1 in taken
    deployable = report["deployable"]
    assert deployable["ms_per_sample_batch1"]["early_exit"] > 0 and sum(deployable["exit_shares_measured"]) == pytest.approx(1.0)


def test_a_regression_model_is_refused(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 1), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "reg", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    data = StepData(inputs={"x": np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)})
    with pytest.raises(CompressionFailed) as info:
        early_exit.apply(model, EarlyExitStep(), data, StepContext(work_dir=tmp_path))
    assert info.value.code == "not_a_classifier"


def test_unknown_exit_layers_are_named_in_the_error(lenet5: tuple[onnx.ModelProto, StepData], tmp_path: Path) -> None:
    from service.core.errors import InvalidInput

    model, data = lenet5
    with pytest.raises(InvalidInput) as info:
        early_exit.apply(model, EarlyExitStep(exits=["nope"]), data, StepContext(work_dir=tmp_path))
    assert "nope" in info.value.message and info.value.code == "unknown_layer"
