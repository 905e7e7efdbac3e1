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
from workers.quantization.cpu import lacks_vnni
from workers.steps import StepContext, StepData


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


def test_int8_dynamic_measures_its_settings_and_keeps_one_meeting_the_target(ctx: StepContext) -> None:
    model = mlp(in_features=32, hidden=64)
    result = quantize.apply(model, QuantizeStep(mode="int8_dynamic"), StepData(), ctx)
    assert ops(result.model)["MatMulInteger"] == 3
    x = data_for(model).inputs["x"]
    ref, out = reference_outputs(model, x), run(result.model, x)
    assert np.abs(ref - out).max() < 0.1 * np.abs(ref).max()
    report = result.report
    assert report["mode"] == "int8_dynamic" and report["target"]["met"] is True
    names = [row["candidate"] for row in report["candidates"]]
    assert {"int8_dynamic/per-tensor/matmul", "int8_dynamic/per-channel/matmul"} <= set(names)
    chosen = next(row for row in report["candidates"] if row["candidate"] == report["chosen"])
    assert chosen["cosine"] >= 0.99 and set(chosen["speedup_by_batch"]) == {"1", "32"}
    assert "synthetic" in report["measured_on"]  # no dataset: measured on synthetic inputs, and says so


def test_int8_static_with_fixed_settings_writes_per_channel_qdq(ctx: StepContext) -> None:
    model = cnn()
    data = data_for(model)
    spec = QuantizeStep(mode="int8_static", per_channel=True, op_types=["Conv", "Gemm"], calibration={"method": "minmax"})
    result = quantize.apply(model, spec, data, ctx)
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
    # 16 of the 64 samples are held out to measure on; calibration reads the other 48.
    assert result.report["calibration"] == {"method": "minmax", "samples": 48}
    # Fixed settings are one candidate; on an x86 CPU without VNNI (u8 x s8 saturates) also its 7-bit twin.
    assert [c["settings"]["reduce_range"] for c in result.report["candidates"]] == ([False, True] if lacks_vnni() else [False])
    assert "held out" in result.report["measured_on"]


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


def test_auto_without_data_measures_convolutions_both_ways_and_keeps_a_smaller_model(ctx: StepContext) -> None:
    result = quantize.apply(cnn(channels=32), QuantizeStep(), StepData(), ctx)
    report = result.report
    assert report["mode"] == "auto"
    families = {row["settings"]["family"] for row in report["candidates"]}
    assert {"int8_dynamic", "fp16", "int4_weight_only"} <= families and "int8_static" not in families  # no data to calibrate on
    dynamic_ops = {row["settings"]["ops"] for row in report["candidates"] if row["settings"]["family"] == "int8_dynamic"}
    assert dynamic_ops == {"matmul", "all"}
    # Quantizing only the final Gemm leaves the model about as large: never kept as "quantized".
    gemm_only = [row for row in report["candidates"] if row["settings"].get("ops") == "matmul"]
    assert all(not row["meets_target"] for row in gemm_only if row["compression_ratio"] < 1.05)
    chosen = next(row for row in report["candidates"] if row["candidate"] == report["chosen"])
    assert chosen["compression_ratio"] >= 1.05 and chosen["meets_target"]
    if report["settings"].get("ops") == "matmul":
        conv_rows = [row for row in report["float_layers"] if row["op_type"] == "Conv"]
        assert len(conv_rows) == 2 and all("slower" in row["why"] for row in conv_rows)


def test_auto_with_data_measures_static_candidates_on_held_out_samples(ctx: StepContext) -> None:
    model = cnn()
    result = quantize.apply(model, QuantizeStep(), data_for(model), ctx)
    report = result.report
    static = [row for row in report["candidates"] if row["settings"]["family"] == "int8_static"]
    assert {row["settings"]["ops"] for row in static} == {"matmul", "all"}
    assert {row["settings"]["calibration"] for row in static} == {"minmax", "percentile"}
    assert all(row["status"] == "measured" for row in report["candidates"])
    assert report["target"]["met"] and "held out" in report["measured_on"]
    chosen = next(row for row in report["candidates"] if row["candidate"] == report["chosen"])
    assert chosen["cosine"] >= 0.99


def test_objective_size_keeps_the_smallest_candidate_that_meets_the_target(ctx: StepContext) -> None:
    model = mlp(in_features=256, hidden=256)
    result = quantize.apply(model, QuantizeStep(objective="size", target={"min_cosine": 0.95}), StepData(), ctx)
    rows = [row for row in result.report["candidates"] if row["status"] == "measured" and row["cosine"] >= 0.95]
    chosen = next(row for row in rows if row["candidate"] == result.report["chosen"])
    assert chosen["compression_ratio"] == max(row["compression_ratio"] for row in rows)
    assert result.report["settings"]["family"] == "int4_weight_only"


def test_an_unreachable_target_fails_with_the_candidate_table(ctx: StepContext) -> None:
    with pytest.raises(CompressionFailed) as info:
        quantize.apply(mlp(), QuantizeStep(target={"min_cosine": 1.0}, candidates=["int8_dynamic", "int4_weight_only"], mixed_precision=False), StepData(), ctx)
    assert info.value.code == "quantization_target_missed"
    assert "int8_dynamic/per-channel/matmul: cosine" in info.value.message and "on_target_missed" in info.value.message


def test_keep_closest_keeps_the_most_faithful_candidate_flagged(ctx: StepContext) -> None:
    spec = QuantizeStep(target={"min_cosine": 1.0}, candidates=["int8_dynamic", "int4_weight_only"], mixed_precision=False, on_target_missed="keep_closest")
    result = quantize.apply(mlp(), spec, StepData(), ctx)
    report = result.report
    assert report["target"]["met"] is False and "quality target missed" in report["warnings"][0]
    best = max(row["cosine"] for row in report["candidates"])
    assert next(row for row in report["candidates"] if row["candidate"] == report["chosen"])["cosine"] == best


def outlier_mlp() -> onnx.ModelProto:
    """An MLP whose second layer reads an activation with one channel 2000x the others: any int8
    activation range for that layer crushes the small channels; the first and last layers are easy.
    The function is unchanged (the outlier channel's outgoing weights are scaled down to match)."""
    model = mlp(in_features=32, hidden=64, classes=16, seed=3)
    inits = {i.name: i for i in model.graph.initializer}
    w0, b0, w1 = (onnx.numpy_helper.to_array(inits[n]).copy() for n in ("w0", "b0", "w1"))
    w0[:, 0] *= 2000.0
    b0[0] *= 2000.0
    w1[0, :] /= 2000.0
    for name, value in (("w0", w0), ("b0", b0), ("w1", w1)):
        inits[name].CopyFrom(onnx.numpy_helper.from_array(value, name))
    return model


def test_mixed_precision_leaves_the_most_sensitive_layer_in_float(ctx: StepContext) -> None:
    model = outlier_mlp()
    # 7-bit weights: on an x86 CPU without VNNI, 8-bit ones saturate and damage a second layer (cosine
    # 0.994 alone), and which of the two variants gets repaired would be decided by timing noise.
    spec = QuantizeStep(mode="int8_dynamic", per_channel=True, reduce_range=True, target={"min_cosine": 0.995})
    result = quantize.apply(model, spec, StepData(), ctx)
    report = result.report
    assert report["target"]["met"] is True
    ranked = report["sensitivity"]
    assert ranked and ranked[0]["layer"] == "MatMul_3"  # the layer reading the outlier activation (nodes named in graph order)
    assert report["settings"]["float_nodes"] == ["MatMul_3"]
    assert [row["layer"] for row in report["float_layers"]] == ["MatMul_3"] and "mixed precision" in report["float_layers"][0]["why"]
    assert ops(result.model)["MatMulInteger"] == 2
    first_try = next(row for row in report["candidates"] if row["candidate"] == "int8_dynamic/per-channel/matmul/7-bit")
    assert first_try["cosine"] < 0.995


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


def test_two_identical_jobs_keep_the_same_candidate(tmp_path) -> None:
    import io

    from bench.architectures import dataset, export
    from service.core.specs import QuantizeStep
    from workers.methods import quantize
    from workers.steps import StepContext, StepData

    exp = export("bert", "dynamo", tmp_path)
    arrays = dict(np.load(io.BytesIO(dataset(exp, 64, seq=24))))
    data = StepData(inputs={name: arrays[name] for name in exp.inputs})
    model = onnx.load(str(exp.path))
    chosen = []
    for run in range(2):
        (tmp_path / f"run{run}").mkdir()
        report = quantize.apply(model, QuantizeStep(), data, StepContext(work_dir=tmp_path / f"run{run}")).report
        chosen.append((report["chosen"], report["settings"]))
        assert "padding" in report["measured_on"]  # padded positions are left out of the comparison, and it says so
    assert chosen[0] == chosen[1]
