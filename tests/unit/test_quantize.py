"""The quantize method, called directly on in-memory models: structure (op counts) and numbers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service.core.errors import CompressionFailed, JobCancelled
from service.core.specs import QuantizeStep
from tests.builders import cnn, mlp, reference_outputs
from workers.methods import quantize
from workers.methods.base import StepContext, StepData


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    onnx.checker.check_model(model, full_check=True)  # every output must be a valid model, not just runnable
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


@pytest.fixture
def ctx(tmp_path: Path) -> StepContext:
    return StepContext(work_dir=tmp_path)


def data_for(model: onnx.ModelProto, n: int = 64, seed: int = 0) -> StepData:
    dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    return StepData(inputs={"x": np.random.default_rng(seed).standard_normal((n, *dims)).astype(np.float32)})


def test_int8_dynamic_quantizes_matmuls_and_stays_close(ctx: StepContext) -> None:
    model = mlp(in_features=32, hidden=64)
    result = quantize.apply(model, QuantizeStep(mode="int8_dynamic"), StepData(), ctx)
    assert ops(result.model)["MatMulInteger"] == 3
    x = data_for(model).inputs["x"]
    ref, out = reference_outputs(model, x), run(result.model, x)
    assert np.abs(ref - out).max() < 0.1 * np.abs(ref).max()
    assert result.report["mode"] == "int8_dynamic"


def test_int8_static_writes_per_channel_qdq(ctx: StepContext) -> None:
    model = cnn()
    data = data_for(model)
    result = quantize.apply(model, QuantizeStep(mode="int8_static"), data, ctx)
    counts = ops(result.model)
    assert counts["QuantizeLinear"] >= 2 and counts["DequantizeLinear"] >= 4
    per_channel_scales = [
        i for i in result.model.graph.initializer if i.name.endswith("_scale") and len(i.dims) == 1 and i.dims[0] == 8
    ]
    assert per_channel_scales, "conv weights should carry one scale per output channel"
    ref, out = reference_outputs(model, data.inputs["x"]), run(result.model, data.inputs["x"])
    # This random CNN's logits sit close together, so compare values, not argmax.
    cosine = (ref * out).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(out, axis=-1))
    assert cosine.mean() > 0.99
    assert result.report["calibration"] == {"method": "minmax", "samples": 64}


def test_calibration_methods_choose_different_ranges(ctx: StepContext, tmp_path: Path) -> None:
    """Entropy and percentile must not silently degenerate to min-max (ORT's defaults do)."""
    model = mlp(in_features=16, hidden=32)
    data = data_for(model, n=128)
    scales = {}
    for method in ("minmax", "entropy", "percentile"):
        step_ctx = StepContext(work_dir=tmp_path / method)
        step_ctx.work_dir.mkdir()
        spec = QuantizeStep(mode="int8_static", calibration={"method": method, "num_bins": 512, "percentile": 99.0})
        result = quantize.apply(model, spec, data, step_ctx)
        scales[method] = {
            i.name: onnx.numpy_helper.to_array(i).item() for i in result.model.graph.initializer if i.name.endswith("_scale") and not i.dims
        }
    assert scales["minmax"].keys() == scales["entropy"].keys()
    assert scales["entropy"] != scales["minmax"]
    assert scales["percentile"] != scales["minmax"]
    # Percentile clips outliers, so its activation ranges are never wider than min-max's.
    assert all(scales["percentile"][k] <= scales["minmax"][k] + 1e-9 for k in scales["minmax"])


def test_fp16_halves_weights_and_keeps_float32_io(ctx: StepContext) -> None:
    model = mlp(in_features=32, hidden=64)
    result = quantize.apply(model, QuantizeStep(mode="fp16"), StepData(), ctx)
    assert all(i.data_type == onnx.TensorProto.FLOAT16 for i in result.model.graph.initializer)
    assert result.model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x = data_for(model).inputs["x"]
    np.testing.assert_allclose(run(result.model, x), reference_outputs(model, x), atol=2e-2)


def test_auto_without_data_leaves_convolutions_in_float(ctx: StepContext) -> None:
    result = quantize.apply(cnn(), QuantizeStep(), StepData(), ctx)
    counts = ops(result.model)
    assert counts["Conv"] == 2 and "ConvInteger" not in counts
    assert result.report["mode"] == "int8_dynamic" and "slower" in result.report["reason"]


def test_auto_with_data_calibrates(ctx: StepContext) -> None:
    model = cnn()
    result = quantize.apply(model, QuantizeStep(), data_for(model), ctx)
    assert result.report["mode"] == "int8_static"


def test_excluded_op_types_stay_float(ctx: StepContext) -> None:
    model = cnn()
    result = quantize.apply(model, QuantizeStep(mode="int8_static", exclude_op_types=["Conv"]), data_for(model), ctx)
    conv_inputs = {i for n in result.model.graph.node if n.op_type == "Conv" for i in n.input}
    dq_outputs = {o for n in result.model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert not conv_inputs & dq_outputs


def test_static_without_data_fails_clearly(ctx: StepContext) -> None:
    with pytest.raises(CompressionFailed) as info:
        quantize.apply(mlp(), QuantizeStep(mode="int8_static"), StepData(), ctx)
    assert info.value.code == "dataset_required"


def test_cancellation_during_calibration_propagates(tmp_path: Path) -> None:
    def cancel(fraction: float, message: str, milestone: bool = False) -> None:
        if "calibrating" in message:
            raise JobCancelled("cancelled by the user")

    model = mlp()
    with pytest.raises(JobCancelled):
        quantize.apply(model, QuantizeStep(mode="int8_static"), data_for(model), StepContext(work_dir=tmp_path, report_progress=cancel))
