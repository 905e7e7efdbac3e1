"""ONNX -> trainable torch module: same outputs as ONNX Runtime, for hand-built graphs and for what
torch.onnx.export writes at opset 17 and with the dynamo exporter (opset 18+)."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from tests.builders import cnn, mlp, reference_outputs
from workers.trainable.from_onnx import UnsupportedModel, to_torch
from workers.trainable.to_onnx import export


def roundtrip_error(model: onnx.ModelProto, x: np.ndarray) -> float:
    module = to_torch(model)
    out = module(torch.from_numpy(x)).detach().numpy()
    return float(np.abs(out - reference_outputs(model, x)).max())


@pytest.mark.parametrize(("model", "shape"), [(mlp(), (5, 16)), (cnn(), (5, 1, 8, 8))])
def test_hand_built_graphs(model: onnx.ModelProto, shape: tuple) -> None:
    assert roundtrip_error(model, np.random.default_rng(0).standard_normal(shape).astype(np.float32)) < 1e-5


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        y = torch.cat([y, torch.relu(self.conv2(y))], dim=1)[:, :8] + y
        y = nn.functional.max_pool2d(y, 2)
        return torch.softmax(self.fc(y.flatten(1)), dim=-1)


@pytest.mark.parametrize("dynamo", [False, True], ids=["opset17", "dynamo"])
def test_torch_exports(dynamo: bool) -> None:
    torch.manual_seed(0)
    block = Block().eval()
    with torch.no_grad():
        block.bn.running_mean.uniform_(-0.5, 0.5)
        block.bn.running_var.uniform_(0.5, 2.0)
    buffer = io.BytesIO()
    example = torch.randn(2, 3, 8, 8)
    if dynamo:
        program = torch.onnx.export(block, (example,), dynamo=True, input_names=["x"], dynamic_shapes=({0: torch.export.Dim("batch")},))
        model = program.model_proto
        assert model.opset_import[0].version >= 18
    else:
        torch.onnx.export(block, (example,), buffer, dynamo=False, opset_version=17, do_constant_folding=False, input_names=["x"], dynamic_axes={"x": {0: "N"}})
        model = onnx.load_model_from_string(buffer.getvalue())
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    assert roundtrip_error(model, x) < 1e-5
    module = to_torch(model)
    assert sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules()) == 3
    again = export(module, (torch.from_numpy(x[:2]),), module.input_names, module.output_names, dynamic_batch=True)
    onnx.checker.check_model(again, full_check=True)
    np.testing.assert_allclose(reference_outputs(again, x), reference_outputs(model, x), atol=1e-5)


def test_matmul_and_bias_add_become_one_linear() -> None:
    module = to_torch(mlp())
    linears = [m for m in module.layers.values() if isinstance(m, nn.Linear)]
    assert len(linears) == 3 and all(m.bias is not None for m in linears)
    assert [tuple(m.weight.shape) for m in linears] == [(32, 16), (32, 32), (4, 32)]


def test_unsupported_operator_is_named() -> None:
    node = helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["selected"])
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4, 4]), helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, 4])],
        [helper.make_tensor_value_info("selected", TensorProto.INT64, [None, 3])],
    )
    with pytest.raises(UnsupportedModel) as info:
        to_torch(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert info.value.code == "unsupported_operator" and "NonMaxSuppression" in info.value.message


def test_constant_nodes_and_reshape() -> None:
    shape = helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([0, -1], np.int64)))
    nodes = [shape, helper.make_node("Reshape", ["x", "shape"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    assert roundtrip_error(model, np.arange(12, dtype=np.float32).reshape(2, 2, 3)) == 0.0


def test_every_unsupported_operator_is_named_in_one_error() -> None:
    nodes = [helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["selected"]), helper.make_node("Unique", ["scores"], ["u"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4, 4]), helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, 4])],
        [helper.make_tensor_value_info("selected", TensorProto.INT64, [None, 3]), helper.make_tensor_value_info("u", TensorProto.FLOAT, [None])],
    )
    with pytest.raises(UnsupportedModel) as info:
        to_torch(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert "NonMaxSuppression, Unique" in info.value.message


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_flatten_by_view_of_size_converts_from_either_exporter(tmp_path, dynamo: bool) -> None:
    # x.view(x.size(0), -1): Shape -> Gather(scalar index) -> Unsqueeze -> Concat -> Reshape.
    import onnx
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(12, 8), torch.nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x.view(x.size(0), -1))))

    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(4, 3, 4)
    path = tmp_path / "m.onnx"
    if dynamo:
        torch.onnx.export(net, (x,), path, input_names=["x"], dynamo=True, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    else:
        torch.onnx.export(net, (x,), path, input_names=["x"], dynamo=False, opset_version=17, dynamic_axes={"x": {0: "batch"}})
    model = onnx.load(str(path))
    if not dynamo:
        assert {"Shape", "Gather", "Reshape"} <= {n.op_type for n in model.graph.node}
    module = to_torch(model)
    with torch.no_grad():
        for batch in (1, 5):
            sample = torch.randn(batch, 3, 4)
            torch.testing.assert_close(module(sample), net(sample))


def test_a_converter_that_disagrees_with_onnx_runtime_is_caught_at_the_diverging_node(monkeypatch) -> None:
    from workers.steps import StepData
    from workers.trainable import onnx_ops
    from workers.trainable.verify import ConversionMismatch, trainable

    model = mlp()
    model.graph.node[2].name = "first_relu"
    data = StepData(inputs={"x": np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)})
    trainable(model, data)  # agrees: no error
    # A converter bug, simulated: Relu passes negatives through.
    monkeypatch.setitem(onnx_ops.OPS, "Relu", lambda i, a: [i[0]])
    with pytest.raises(ConversionMismatch) as info:
        trainable(model, data)
    assert info.value.code == "conversion_mismatch" and "'first_relu' (Relu)" in info.value.message


@pytest.mark.parametrize("starts,ends,axes,steps", [
    ([-1], [-9223372036854775808], [1], [-1]),  # x[:, ::-1], as padding code that reverses pads writes it
    ([4], [0], [1], [-2]),
    ([-2], [-5], [1], [-1]),
    ([3, 10], [-10, -100], [0, 1], [-1, -3]),
    ([0], [9223372036854775807], [1], [2]),
])
def test_slice_with_negative_steps_matches_onnx(starts, ends, axes, steps) -> None:
    """MobileNetV2 from transformers slices backwards; ONNX's clamping rules, checked against its reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    from workers.trainable.onnx_ops import OPS

    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    consts = [numpy_helper.from_array(np.array(v, np.int64), n) for v, n in ((starts, "s"), (ends, "e"), (axes, "a"), (steps, "p"))]
    graph = helper.make_graph([helper.make_node("Slice", ["x", "s", "e", "a", "p"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], consts)
    expected = ReferenceEvaluator(helper.make_model(graph)).run(None, {"x": x})[0]
    got = OPS["Slice"]([torch.from_numpy(x), *(torch.tensor(v) for v in (starts, ends, axes, steps))], {})[0].numpy()
    np.testing.assert_array_equal(got, expected)


def test_an_ops_inputs_follow_the_accelerator() -> None:
    """On a GPU, `Shape` gives a host tensor while the int64 constant it is concatenated with moved to
    the GPU with the module (every transformer failed to train on CUDA before this; seen on an H200).
    CI has no GPU, so the rule is checked with torch's `meta` device standing in for one; the GPU
    itself is exercised by bench/gpu_session.sh."""
    from workers.trainable.from_onnx import on_one_device

    host, accelerator = torch.tensor([2, 3]), torch.empty(4, device="meta")
    moved = on_one_device([host, accelerator, None, 3])
    assert [a.device.type if isinstance(a, torch.Tensor) else a for a in moved] == ["meta", "meta", None, 3]
    assert on_one_device([host, torch.ones(1)])[0] is host  # all on the host: untouched
