"""What int8 does beyond ONNX Runtime's round-to-nearest: GPTQ error feedback on ORT's own grid
(workers.quantization.error_feedback) and SmoothQuant for dynamic int8 with each activation's alpha
chosen on the calibration data (workers.quantization.smoothing), on a tiny BERT export and on
small layers whose inputs have the outlier channels real transformers have."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bench.architectures import dataset, export
from service.core.specs import QuantizeStep
from workers.methods import quantize
from workers.quantization import error_feedback, int8, smoothing
from workers.quantization.candidates import plan
from workers.steps import StepContext, StepData


def _correlated_inputs(rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Rows from one distribution (the mixing is fixed; `seed` draws other rows of it)."""
    mixing = np.random.default_rng(0).standard_normal((k, k)) / np.sqrt(k)
    x = np.random.default_rng(100 + seed).standard_normal((rows, k)) @ mixing
    x[:, 3] *= 30.0  # an outlier channel, as LayerNorm outputs of real transformers have
    return x.astype(np.float32)


def test_gptq_codes_stay_on_the_grid_and_move_the_output_less_than_rounding() -> None:
    rng = np.random.default_rng(1)
    x = _correlated_inputs(2048, 64)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    h = (x.astype(np.float64).T @ x) / len(x)
    scale = np.abs(w).max(axis=0) / 127
    nearest = np.clip(np.round(w / scale), -127, 127)
    codes = error_feedback.gptq_codes(w, h, scale, np.zeros(32), -127, 127)
    assert codes.shape == w.shape and codes.min() >= -127 and codes.max() <= 127
    before = error_feedback.output_error(w, nearest * scale, h)
    after = error_feedback.output_error(w, codes * scale, h)
    assert after < 0.7 * before
    held_out = _correlated_inputs(512, 64, seed=5)  # the gain is not only on the data it was fitted to
    err = lambda q: float(np.square(held_out @ (w - q * scale)).sum())  # noqa: E731
    assert err(codes) < err(nearest)


def test_gptq_rounding_replaces_only_the_codes_of_ort_int8(tmp_path: Path) -> None:
    exp = export("bert", "dynamo", tmp_path)
    data = StepData(inputs=dict(np.load(io.BytesIO(dataset(exp, 48, seq=16)))))
    out = tmp_path / "q.onnx"
    int8.dynamic(exp.path, out, per_channel=False, reduce_range=False, ops=["MatMul"], exclude=[], only=None)
    plain = onnx.load_model(str(out))
    stats = error_feedback.statistics(exp.path, data, 48, 1, lambda f, msg: None)
    assert stats.samples == 48 and stats.positions < 48 * 16 + 1
    report = error_feedback.refine(out, exp.path, stats, reduce_range=False)
    refined = onnx.load_model(str(out))
    assert report["layers"] > 0 and report["mean_output_error_gptq"] < report["mean_output_error_nearest"]
    assert [n.op_type for n in refined.graph.node] == [n.op_type for n in plain.graph.node]
    before = {i.name: numpy_helper.to_array(i) for i in plain.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in refined.graph.initializer}
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    assert changed and all(name.endswith("_quantized") for name in changed)  # scales and zero points are ORT's own
    assert all(after[name].dtype == np.int8 for name in changed)
    feed = dict(np.load(io.BytesIO(dataset(exp, 4, seq=10))))
    assert np.isfinite(ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)[0]).all()


def test_int8_gptq_job_reports_each_layer_and_needs_a_dataset(tmp_path: Path) -> None:
    exp = export("bert", "torchscript", tmp_path)
    model = onnx.load_model(str(exp.path))
    data = StepData(inputs=dict(np.load(io.BytesIO(dataset(exp, 48, seq=16)))))
    spec = QuantizeStep(mode="int8_dynamic", per_channel=True, transformer_fusion=False, smooth_quant=False, int8_rounding="gptq", target={"min_cosine": 0.5})
    report = quantize.apply(model, spec, data, StepContext(work_dir=tmp_path)).report
    feedback = report["error_feedback"]
    assert feedback["layers"] == len(feedback["per_layer"]) > 0
    assert all(row["output_error_gptq"] < row["output_error_nearest"] for row in feedback["per_layer"])
    assert spec.needs_dataset() and not QuantizeStep(mode="int8_dynamic").needs_dataset()


def _outlier_layer(k: int = 32, n: int = 16) -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "layer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_alphas_chosen_on_the_data_make_dynamic_int8_closer_to_float(tmp_path: Path) -> None:
    model = _outlier_layer()
    x = _correlated_inputs(1024, 32)
    x[:, 7] *= 50.0
    maxima, samples = smoothing.collect(model, iter([{"x": x[:512]}, {"x": x[512:]}]), rows=1024)
    alphas = smoothing.choose_alphas(model, maxima, samples)
    assert set(alphas) == {"x"} and alphas["x"] in smoothing.ALPHAS
    smoothed, count = smoothing.smooth(model, maxima, alphas)
    assert count == 1
    paths = {}
    for label, graph in (("plain", model), ("smoothed", smoothed)):
        source, out = tmp_path / f"{label}.onnx", tmp_path / f"{label}-int8.onnx"
        onnx.save(graph, str(source))
        int8.dynamic(source, out, per_channel=True, reduce_range=False, ops=["MatMul"], exclude=[], only=None)
        paths[label] = out
    held_out = _correlated_inputs(256, 32, seed=9)
    held_out[:, 7] *= 50.0
    exact = held_out @ numpy_helper.to_array(model.graph.initializer[0])
    error = {label: float(np.square(ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": held_out})[0] - exact).sum())
             for label, p in paths.items()}
    assert error["smoothed"] < 0.5 * error["plain"]


def test_dynamic_int8_measures_smoothquant_on_transformers_with_data() -> None:
    with_data = plan(QuantizeStep(mode="int8_dynamic"), has_data=True, transformer=True, has_matmul=True, has_conv=False)
    smoothed = [c for c in with_data if c.smooth]
    assert smoothed and all(not c.fused and c.ops == "matmul" for c in smoothed)
    assert {c.name for c in smoothed} >= {"int8_dynamic/per-channel/matmul/smoothquant"}
    assert not any(c.smooth for c in plan(QuantizeStep(mode="int8_dynamic"), has_data=False, transformer=True, has_matmul=True, has_conv=False))
    assert not any(c.smooth for c in plan(QuantizeStep(mode="int8_dynamic"), has_data=True, transformer=False, has_matmul=True, has_conv=False))
