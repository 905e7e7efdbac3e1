"""The parts of quantize that are written here rather than taken from ONNX Runtime: SmoothQuant,
int4 of embedding tables and tied weights, and the transformer-fusion candidate, on tiny
configurations of real architectures (Hugging Face GPT-2 and BERT from both torch exporters)."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench.architectures import dataset, export
from service.core.specs import QuantizeStep
from workers.methods import quantize
from workers.steps import StepContext, StepData
from workers.quantization import int4, smoothing


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def layernorm_block(seed: int = 0) -> onnx.ModelProto:
    """x -> LayerNorm -> (MatMul q, MatMul k) -> Add, and a second MatMul on a graph input (no LayerNorm to fold into)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("gamma", rng.uniform(0.5, 1.5, 16)), ("beta", rng.standard_normal(16) * 0.1),
        ("wq", rng.standard_normal((16, 8))), ("wk", rng.standard_normal((16, 8))), ("wz", rng.standard_normal((16, 8))))]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["ln", "wq"], ["q"], name="q"), helper.make_node("MatMul", ["ln", "wk"], ["k"], name="k"),
             helper.make_node("MatMul", ["z", "wz"], ["zz"], name="zz"), helper.make_node("Add", ["q", "k"], ["qk"], name="add"),
             helper.make_node("Add", ["qk", "zz"], ["y"], name="out")]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
                                               helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_smoothquant_keeps_the_function_and_flattens_outlier_channels() -> None:
    model = layernorm_block()
    rng = np.random.default_rng(1)
    z = rng.standard_normal((32, 16)).astype(np.float32)
    z[:, 3] *= 100.0  # an outlier channel
    feed = {"x": rng.standard_normal((32, 16)).astype(np.float32), "z": z}
    maxima = smoothing.activation_maxima(model, iter([feed]))
    smoothed, count = smoothing.smooth(model, maxima, alpha=0.5)
    onnx.checker.check_model(smoothed, full_check=True)
    assert count == 2
    np.testing.assert_allclose(_run(smoothed, feed), _run(model, feed), rtol=1e-4, atol=1e-3)
    # The LayerNorm-fed pair folds into gamma/beta; the graph input needs a Mul, by 1/s stored as a byte per channel.
    assert [n.output[0] for n in smoothed.graph.node if n.op_type == "Mul" and n.output[0].endswith(smoothing.SUFFIX)] == ["sq0__smooth"]
    codes = {i.name: i for i in smoothed.graph.initializer}["sq0_c"]
    assert codes.data_type == onnx.TensorProto.INT8 and list(codes.dims) == [16]
    after = smoothing.activation_maxima(smoothed, iter([feed]))["sq0__smooth"]
    assert after.max() / after.min() < maxima["z"].max() / maxima["z"].min() / 5


@pytest.fixture(scope="module")
def workspace() -> Path:
    return Path(tempfile.mkdtemp(prefix="quantization-parts-"))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_int4_quantizes_gpt2_embeddings_and_stores_the_tied_projection_once(exporter: str, workspace: Path) -> None:
    exp = export("gpt2", exporter, workspace)
    model = onnx.load_model(str(exp.path))
    feed = dict(np.load(io.BytesIO(dataset(exp, 8, seq=16))))
    reference = _run(model, feed)
    quantized, report = int4.quantize(model, algorithm="rtn", block_size=16, embeddings=True, exclude=[])
    onnx.checker.check_model(quantized)
    ops = [n.op_type for n in quantized.graph.node]
    assert "GatherBlockQuantized" in ops and "MatMulNBits" in ops
    assert "Transpose" not in {n.op_type for n in quantized.graph.node if any("wte" in i or "lm_head" in i for i in n.input)}
    assert len(report["tied_tables_stored_once"]) == 1
    tied = report["tied_tables_stored_once"][0]["table"]
    assert tied not in {i.name for i in quantized.graph.initializer}  # the float table is gone, and not stored twice
    assert report["float_share"] < 0.05
    assert all(layer["relative_error"] < 0.2 for layer in report["layers"])
    out = _run(quantized, feed)
    assert (out.argmax(-1) == reference.argmax(-1)).mean() > 0.8


def test_int4_mode_measures_rtn_hqq_and_gptq_and_reports_what_stayed_float(workspace: Path, tmp_path: Path) -> None:
    exp = export("gpt2", "torchscript", workspace)
    model = onnx.load_model(str(exp.path))
    data = StepData(inputs=dict(np.load(io.BytesIO(dataset(exp, 32, seq=16)))))
    result = quantize.apply(model, QuantizeStep(mode="int4_weight_only", block_size=16, target={"min_cosine": 0.9}), data, StepContext(work_dir=tmp_path))
    report = result.report
    assert {row["settings"]["algorithm"] for row in report["candidates"]} == {"rtn", "hqq", "gptq"}
    assert all(row["top1_agreement"] is not None for row in report["candidates"] if row["status"] == "measured")
    assert report["layers"] and "float_weights" in report and report["float_share"] < 0.05


def test_transformer_fusion_is_a_measured_candidate_on_bert(workspace: Path, tmp_path: Path) -> None:
    exp = export("bert", "torchscript", workspace)
    model = onnx.load_model(str(exp.path))
    result = quantize.apply(model, QuantizeStep(mode="int8_dynamic", per_channel=True), StepData(), StepContext(work_dir=tmp_path))
    report = result.report
    assert report["transformer_fusion"], "ONNX Runtime's optimizer should fuse LayerNorm/GELU in a BERT export"
    assert {row["settings"]["transformer_fusion"] for row in report["candidates"]} == {False, True}
    feed = dict(np.load(io.BytesIO(dataset(exp, 4, seq=12))))
    assert _run(result.model, feed).shape == _run(model, feed).shape


def test_static_int8_with_smoothquant_runs_on_a_bert_export(workspace: Path, tmp_path: Path) -> None:
    exp = export("bert", "dynamo", workspace)
    model = onnx.load_model(str(exp.path))
    data = StepData(inputs=dict(np.load(io.BytesIO(dataset(exp, 48, seq=16)))))
    spec = QuantizeStep(mode="int8_static", smooth_quant=True, calibration={"method": "minmax"}, target={"min_cosine": 0.5})
    result = quantize.apply(model, spec, data, StepContext(work_dir=tmp_path))
    report = result.report
    assert [row["status"] for row in report["candidates"]] == ["measured"] * len(report["candidates"])
    assert report["smooth_quant"]["activations"] > 0 and report["settings"]["smooth_quant"] is True
    feed = dict(np.load(io.BytesIO(dataset(exp, 3, seq=10))))
    assert np.isfinite(_run(result.model, feed)).all()


def test_latency_within_timing_noise_is_a_tie_broken_by_size() -> None:
    from service.core.specs import QualityTarget
    from workers.quantization.candidates import Candidate
    from workers.quantization.measure import Measured
    from workers.quantization.selection import best

    def measured(size: int, speed: float, float_nodes: tuple[str, ...] = ()) -> Measured:
        return Measured(Candidate("int8_dynamic", float_nodes=float_nodes), size_bytes=size, compression=10_000 / size, cosine=0.999,
                        latency_ratio={1: 1 / speed, 32: 1 / speed})

    quantized, mostly_float = measured(3_000, 1.50), measured(9_000, 1.53, ("MatMul_0", "MatMul_3"))
    assert best([quantized, mostly_float], QualityTarget(), "latency") is quantized  # 2% "faster" is noise
    clearly_faster = measured(9_000, 1.80, ("MatMul_0",))
    assert best([quantized, clearly_faster], QualityTarget(), "latency") is clearly_faster
    assert best([quantized, clearly_faster], QualityTarget(), "size") is quantized
    # Seen in one of four identical tiny-BERT jobs: unfused int8 3.5% faster than fused int8 that is 16%
    # smaller, and 5% faster than the original; the comparison is between the two, so fused stays.
    fused, unfused = measured(6_200, 1 / 0.985), measured(7_200, 1 / 0.950)
    assert best([unfused, fused], QualityTarget(), "latency") is fused
    # Each extra byte must buy clear speed over every smaller model kept, not over its neighbour only.
    steps = [measured(1_000, 1.0), measured(1_100, 1 / 0.93), measured(1_200, 1 / 0.86)]
    assert best(steps, QualityTarget(), "latency") is steps[2]
    assert best(steps[:2], QualityTarget(), "latency") is steps[0]
    # A larger model 5-9% faster is a speed tie: the smaller is kept (identical jobs must agree, and
    # a step inside the noise between them would let one keep each).
    assert best([measured(1_000, 1.0), measured(1_100, 1.08)], QualityTarget(), "latency").size_bytes == 1_000


def test_a_close_size_trade_is_decided_by_timing_the_two_against_each_other() -> None:
    from service.core.specs import QualityTarget
    from workers.quantization.candidates import Candidate
    from workers.quantization.measure import Measured
    from workers.quantization.selection import best

    def measured(name: str, size: int, speed: float) -> Measured:
        return Measured(Candidate(name), size_bytes=size, compression=10_000 / size, cosine=0.999, latency_ratio={1: 1 / speed, 32: 1 / speed})

    # Each timed against the original, the larger looks 14% faster; timed against each other, 2%.
    fused, unfused = measured("int8_dynamic", 6_200, 1.00), measured("int8_static", 7_200, 1.14)
    duels: list[tuple[str, str]] = []

    def head_to_head(*ratios: float):
        def timed(first: Measured, second: Measured, timing: int) -> float:
            duels.append((first.candidate.family, second.candidate.family))
            return ratios[timing % len(ratios)]
        return timed

    assert best([unfused, fused], QualityTarget(), "latency") is unfused  # without a direct timing, 14% is beyond the line
    assert best([unfused, fused], QualityTarget(), "latency", head_to_head(1 / 1.02)) is fused
    assert duels == [("int8_static", "int8_dynamic")]  # the larger against the smaller
    assert best([unfused, fused], QualityTarget(), "latency", head_to_head(1 / 1.15)) is unfused  # a real 15% stays bought
    # A duel too close to the 10% line to call is timed twice more and the median decides: one lucky
    # 11% among two 7% timings does not buy the larger model.
    duels.clear()
    assert best([unfused, fused], QualityTarget(), "latency", head_to_head(1 / 1.11, 1 / 1.07, 1 / 1.08)) is fused and len(duels) == 3
    duels.clear()
    assert best([unfused, fused], QualityTarget(), "latency", head_to_head(1 / 1.11, 1 / 1.12, 1 / 1.07)) is unfused and len(duels) == 3
    # Far outside the band of doubt, the two ratios decide and nothing is timed again.
    duels.clear()
    much_faster = measured("int8_static", 7_200, 2.0)
    assert best([much_faster, fused], QualityTarget(), "latency", head_to_head(1.0)) is much_faster and duels == []


def test_initializer_shapes_restated_by_the_exporter_are_dropped_before_quantizing(tmp_path: Path) -> None:
    """torch's dynamo exporter restates initializer shapes in value_info; ONNX Runtime 1.30's dynamic
    quantizer transposes a Gemm weight under its own name and the stale entry then breaks loading
    (every int8 candidate of a dynamo ResNet/ViT failed under torch 2.11 + ORT 1.30). The quantizer's
    source keeps every other shape."""
    exp = export("resnet", "dynamo", tmp_path, tiny=True)
    model = onnx.load(str(exp.path))
    initializers = {t.name for t in model.graph.initializer}
    restated = [v.name for v in model.graph.value_info if v.name in initializers]
    assert restated, "the dynamo export restates initializer shapes (what this guards against)"
    clean = quantize._without_initializer_shapes(model)
    assert not [v for v in clean.graph.value_info if v.name in initializers]
    assert [v.name for v in clean.graph.value_info] == [v.name for v in model.graph.value_info if v.name not in initializers]
    assert len(model.graph.value_info) > len(clean.graph.value_info)  # the caller's model is left as it was
    feed = {i.name: np.random.default_rng(0).standard_normal([1, 3, 32, 32]).astype(np.float32) for i in model.graph.input}
    np.testing.assert_allclose(_run(clean, feed), _run(model, feed), rtol=1e-5, atol=1e-6)


def test_dynamic_int8_drops_all_zero_weight_zero_points_and_computes_the_same(workspace: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from workers.quantization import int8

    exp = export("bert", "torchscript", workspace)
    direct, ours = workspace / "ort-direct.onnx", workspace / "ours.onnx"
    quantize_dynamic(str(exp.path), str(direct), per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    int8.dynamic(exp.path, ours, per_channel=True, reduce_range=False, ops=["MatMul"], exclude=[], only=None)
    model = onnx.load_model(str(ours))
    products = [n for n in model.graph.node if n.op_type == "MatMulInteger"]
    assert products and all(len(n.input) == 3 for n in products)  # symmetric int8 weights: the zero point is 0, so it is left out
    assert ours.stat().st_size < direct.stat().st_size
    feed = dict(np.load(io.BytesIO(dataset(exp, 4, seq=12))))
    np.testing.assert_array_equal(_run(model, feed), _run(onnx.load_model(str(direct)), feed))
