"""depthwise_separable: K x K convolutions replaced by depthwise + pointwise in the user's graph."""

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
from service.core.methods.depthwise_separable import DepthwiseSeparableStep
from tests.cnn_models import ResidualCNN
from workers.factorization.layers import depthwise_separable
from workers.methods import depthwise_separable as method
from workers.steps import StepContext, StepData


def test_a_separable_convolution_is_recovered_exactly() -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    depth, point = torch.randn(6, 3, 3), torch.randn(10, 6)
    with torch.no_grad():
        layer.weight.copy_(torch.einsum("oc,cij->ocij", point, depth))
    replacement, facts = depthwise_separable(layer)
    assert facts["approximation_error"] < 1e-4 and facts["expected_ratio"] == pytest.approx(1 / 10 + 1 / 9, abs=1e-5)
    x = torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(replacement(x), layer(x), rtol=1e-4, atol=1e-4)


def test_each_replaced_layer_keeps_one_over_o_plus_one_over_k_squared_of_its_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = ResidualCNN(width=16).eval()
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(net, (torch.zeros(2, 1, 14, 14),), path, dynamo=False, opset_version=17, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    model = onnx.load_model(str(path))
    x = np.random.default_rng(0).standard_normal((32, 1, 14, 14)).astype(np.float32)
    result = method.apply(model, DepthwiseSeparableStep(finetune_epochs=1), StepData(inputs={"x": x}), StepContext(work_dir=tmp_path))
    report = result.report
    DepthwiseSeparableStep.report_model.model_validate({"index": 0, "method": DepthwiseSeparableStep().method, **json.loads(json.dumps(report, default=str))})
    assert [row["layer"].split(".", 1)[-1] for row in report["layers"]] == ["block.0", "block.3", "down.0"]
    assert report["left_alone"][0]["layer"].endswith("stem.0")  # one input channel: left alone by default
    for row in report["layers"]:
        assert abs(row["ratio_vs_expected"] - 1) <= 0.10
        assert row["macs_after"] < row["macs_before"]
    groups = [a.i for n in result.model.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
    assert sorted(groups)[-3:] == [16, 16, 16]  # three depthwise convolutions in the user's graph
    assert [o.name for o in result.model.graph.output] == ["logits"]
    out = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x[:5]})[0]
    assert out.shape == (5, 10)
    assert set(report["quality"]) == {"original", "replaced", "after_distillation"}
    assert report["distillation"]["target"] == "the original model's outputs"


def test_a_model_without_standard_convolutions_fails_clearly(tmp_path: Path) -> None:
    from tests.builders import mlp

    with pytest.raises(CompressionFailed) as info:
        method.apply(mlp(), DepthwiseSeparableStep(), StepData(), StepContext(work_dir=tmp_path))
    assert info.value.code == "nothing_to_replace"
