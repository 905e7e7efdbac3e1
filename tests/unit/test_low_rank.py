"""low_rank: SVD of linear layers and Tucker-2 of convolutions, written back into the user's graph."""

from __future__ import annotations

import json
import io
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from bench.architectures import dataset, export
from service.core.errors import CompressionFailed
from service.core.methods.low_rank import LowRankStep
from tests.cnn_models import ResidualCNN
from workers.factorization.layers import factorise_conv, factorise_linear
from workers.methods import low_rank
from workers.steps import StepContext, StepData


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_svd_recovers_a_low_rank_linear_layer_exactly() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 5) @ torch.randn(5, 64))
    replacement, ranks = factorise_linear(layer, None, 0.99999)
    assert ranks == {"rank": 5, "full_rank": 48}
    x = torch.randn(7, 64)
    torch.testing.assert_close(replacement(x), layer(x), rtol=1e-4, atol=1e-4)


def test_tucker2_recovers_a_low_multilinear_rank_convolution_exactly() -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(24, 32, 3, stride=2, padding=1)
    core = torch.randn(6, 4, 3, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.einsum("rsij,or,cs->ocij", core, torch.linalg.qr(torch.randn(32, 6))[0], torch.linalg.qr(torch.randn(24, 4))[0]))
    replacement, ranks = factorise_conv(layer, None, 0.99999)
    assert ranks["rank"] == [4, 6]
    x = torch.randn(2, 24, 9, 9)
    torch.testing.assert_close(replacement(x), layer(x), rtol=1e-4, atol=1e-4)


def _residual_cnn(path: Path) -> onnx.ModelProto:
    torch.manual_seed(0)
    net = ResidualCNN(width=16).eval()
    torch.onnx.export(net, (torch.zeros(2, 1, 14, 14),), path, dynamo=False, opset_version=17, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    return onnx.load_model(str(path))


def test_convolutions_are_factorised_in_the_users_graph_with_fewer_macs(tmp_path: Path) -> None:
    model = _residual_cnn(tmp_path / "cnn.onnx")
    x = np.random.default_rng(0).standard_normal((32, 1, 14, 14)).astype(np.float32)
    spec = LowRankStep(rank_ratio=0.5, min_layer_parameters=500, finetune_epochs=1)
    result = low_rank.apply(model, spec, StepData(inputs={"x": x}), StepContext(work_dir=tmp_path))
    report = result.report
    LowRankStep.report_model.model_validate({"index": 0, "method": LowRankStep().method, **json.loads(json.dumps(report, default=str))})
    convs = [row for row in report["layers"] if row["kind"] == "conv (Tucker-2)"]
    assert len(convs) == 3  # the block's two 3x3 convs and the strided one (the 1-channel stem is too small)
    assert all(row["parameters_after"] < row["parameters_before"] and row["macs_after"] < row["macs_before"] for row in convs)
    assert all(row["layer_ms_before"] > 0 and row["layer_ms_after"] > 0 for row in convs)
    # Written back into the same graph: original input/output names, dynamic batch, 3 Convs per factorised one.
    assert [i.name for i in result.model.graph.input] == ["x"] and [o.name for o in result.model.graph.output] == ["logits"]
    conv_count = sum(n.op_type == "Conv" for n in model.graph.node)
    assert sum(n.op_type == "Conv" for n in result.model.graph.node) == conv_count + 2 * len(convs)
    assert _run(result.model, {"x": x[:3]}).shape == (3, 10)
    assert report["quality"]["after_finetune"] >= report["quality"]["factorised"]  # the best epoch is kept


def test_transformer_linear_layers_are_factorised(tmp_path: Path) -> None:
    exp = export("bert", "torchscript", Path(tempfile.mkdtemp()))
    model = onnx.load_model(str(exp.path))
    data = StepData(inputs=dict(np.load(io.BytesIO(dataset(exp, 16, seq=16)))))
    result = low_rank.apply(model, LowRankStep(rank_ratio=0.25, min_layer_parameters=512, finetune_epochs=0), data, StepContext(work_dir=tmp_path))
    assert len(result.report["layers"]) >= 8 and result.report["factorised_parameters"]["ratio"] > 1.5
    out = _run(result.model, dict(np.load(io.BytesIO(dataset(exp, 3, seed=5, seq=11)))))
    assert out.shape[:2] == (3, 11)


def test_a_model_nothing_shrinks_in_fails_clearly(tmp_path: Path) -> None:
    model = _residual_cnn(tmp_path / "cnn.onnx")
    with pytest.raises(CompressionFailed) as info:
        low_rank.apply(model, LowRankStep(min_layer_parameters=10**9), StepData(), StepContext(work_dir=tmp_path))
    assert info.value.code == "nothing_to_factorise"


def test_finetuning_needs_a_dataset() -> None:
    assert LowRankStep(finetune_epochs=2).needs_dataset() and not LowRankStep().needs_dataset()
