"""Per-layer weight-only quantization of a real GenAI export (a tiny random Llama through ONNX Runtime
GenAI's builder): int4, int8 and float layers in one graph, GPTQ from the one-pass Hessians, the
plans auto measures in order of size, and the result runs in ONNX Runtime with its logits close to
the fp32 export's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from service.core.hf_checkpoint import extract
from service.core.specs import QuantizeStep
from tests.llm_checkpoints import tiny_llama_zip
from workers.llm import calibration, decoder, weight_quant
from workers.llm.candidates import plans
from workers.llm.export import build_genai
from workers.quantization import int4


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("llm")
    (tmp / "ckpt.zip").write_bytes(tiny_llama_zip())
    return build_genai(extract(tmp / "ckpt.zip", tmp / "ckpt"), tmp / "fp32", tmp / "cache")


def _windows(count: int = 4, length: int = 48) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(1, 512, size=length).astype(np.int64) for _ in range(count)]


def test_mixed_bits_gptq_and_float_layers_in_one_graph(export: Path, tmp_path: Path) -> None:
    model = onnx.load(str(export / "model.onnx"))
    head = decoder.head_size(export)
    hessians = calibration.hessians(model, _windows(), head, tmp_path / "aug", 1)
    layers = [n.name for n in calibration.weight_matmuls(model)]
    assert len(layers) == 11 and set(hessians) == {n.input[0] for n in calibration.weight_matmuls(model)}
    lm_head = next(n for n in layers if "lm_head" in n)
    plan = weight_quant.Plan(algorithm="gptq", bits={layers[0]: 8, layers[1]: 32, lm_head: 8})
    quantized, report = weight_quant.quantize(model, plan, hessians)
    bits = {n.name: helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits")) for n in quantized.graph.node if n.op_type == "MatMulNBits"}
    assert sorted(bits.values()).count(8) == 2 and sorted(bits.values()).count(4) == 8
    assert [n.name for n in quantized.graph.node if n.op_type == "MatMul"] == [layers[1]]  # the float layer stays a MatMul
    assert report["bits_count"] == {"4": 8, "8": 2, "32": 1}
    assert all(r["algorithm"] == "gptq" for r in report["layers"] if r["bits"] == 4)
    assert any(e["kind"] == "embedding" for e in report["embeddings"])  # the (untied) table in 4-bit blocks
    # What the graph computes with is what the report measured: its 4-bit weights read back from the node's packing.
    inits = {i.name: i for i in quantized.graph.initializer}
    original = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    checked = [n for n in quantized.graph.node if n.op_type == "MatMulNBits" and bits[n.name] == 4]
    assert len(checked) == 8
    for node in checked:
        source = next(n for n in model.graph.node if n.name == node.name.removesuffix("_Q4"))
        weight = original[source.input[1]]
        error = np.linalg.norm(weight - int4.dequantize_matmulnbits(node, inits)) / np.linalg.norm(weight)
        row = next(r for r in report["layers"] if r["layer"] == source.name)
        assert abs(error - row["relative_error"]) < 1e-4, (node.name, error, row)

    folder = tmp_path / "q"
    folder.mkdir()
    onnx.save_model(quantized, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    ids = _windows(1)[0]
    ref = decoder.session(export, 1).run(["logits"], decoder.feed(decoder.session(export, 1), ids, head))[0]
    sess = decoder.session(folder, 1)
    got = sess.run(["logits"], decoder.feed(sess, ids, head))[0]
    cosine = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cosine > 0.95, cosine

    # GPTQ's output error on the calibration text is not above round-to-nearest's for any layer it solved.
    rtn, rtn_report = weight_quant.quantize(model, weight_quant.Plan(algorithm="rtn"), hessians)
    gptq, gptq_report = weight_quant.quantize(model, weight_quant.Plan(algorithm="gptq"), hessians)
    rtn_err = {r["layer"]: r["output_error"] for r in rtn_report["layers"]}
    assert sum(r["output_error"] for r in gptq_report["layers"]) < sum(rtn_err.values())


def test_auto_plans_run_smallest_first(export: Path, tmp_path: Path) -> None:
    model = onnx.load(str(export / "model.onnx"))
    hessians = calibration.hessians(model, _windows(), decoder.head_size(export), tmp_path / "aug", 1)
    layers = [n.name for n in calibration.weight_matmuls(model)]
    lm_head = next(n for n in layers if "lm_head" in n)
    ranked = weight_quant.sensitivity(model, hessians, weight_quant.Plan())
    assert all(r["error_int4"] > r["error_int8"] for r in ranked) and ranked[0]["error_int4"] >= ranked[-1]["error_int4"]
    candidates = plans(QuantizeStep(method="quantize"), layers, ranked, lm_head)
    eights = [sum(1 for name in layers if plan.bits_of(name) == 8) for _, plan in candidates]
    assert eights[0] == 0 and eights == sorted(eights) and eights[-1] == len(layers)
    names = [name for name, _ in candidates]
    assert names[1].endswith("int8 lm_head") and candidates[1][1].bits_of(lm_head) == 8 and eights[1] == 1  # the lm_head first
    down = [name for name in layers if "/mlp/down_proj/" in name]
    assert down and all(candidates[2][1].bits_of(name) == 8 for name in down) and eights[2] == 1 + len(down)  # then every down_proj
    rest = [r["layer"] for r in ranked if r["layer"] != lm_head and r["layer"] not in down]
    assert candidates[3][1].bits_of(rest[0]) == 8  # then the most sensitive of the others
    assert all(plan.bits_of(lm_head) == 4 for _, plan in plans(QuantizeStep(method="quantize", lm_head_bits=4), layers, ranked, lm_head))
    fixed = plans(QuantizeStep(method="quantize", mode="int4_weight_only", lm_head_bits=8), layers, ranked, lm_head)
    assert len(fixed) == 1 and fixed[0][1].bits_of(lm_head) == 8 and fixed[0][1].bits_of(layers[0]) == 4


@pytest.mark.parametrize("lm_head_bits, cosine", [(4, 0.95), (8, 0.995)])
def test_a_tied_lm_head_and_its_embedding_table_are_stored_once(tmp_path: Path, lm_head_bits: int, cosine: float) -> None:
    # The GenAI builder exports a tied model as MatMul(lm_head weight) and Gather(Transpose(lm_head weight));
    # the table reads the output projection's 4- or 8-bit codes (GatherBlockQuantized of the same bits).
    (tmp_path / "ckpt.zip").write_bytes(tiny_llama_zip(tied=True))
    export = build_genai(extract(tmp_path / "ckpt.zip", tmp_path / "ckpt"), tmp_path / "fp32", tmp_path / "cache")
    model = onnx.load(str(export / "model.onnx"))
    assert any(n.op_type == "Transpose" and "lm_head" in n.input[0] for n in model.graph.node)
    lm_head = next(n.name for n in calibration.weight_matmuls(model) if "lm_head" in n.name)
    plan = weight_quant.Plan(algorithm="rtn")
    plan.bits[lm_head] = lm_head_bits
    quantized, report = weight_quant.quantize(model, plan, None)
    assert report["tied_tables_stored_once"] and report["float_share"] < 0.05
    assert [e["bits"] for e in report["embeddings"]] == [lm_head_bits]
    assert not any(i.data_type == onnx.TensorProto.FLOAT and int(np.prod(i.dims)) >= 512 * 64 for i in quantized.graph.initializer)  # no float table left
    gathers = [n for n in quantized.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gathers) == 1 and next(a.i for a in gathers[0].attribute if a.name == "bits") == lm_head_bits
    ids = _windows(1)[0]
    head = decoder.head_size(export)
    ref = decoder.session(export, 1).run(["logits"], decoder.feed(decoder.session(export, 1), ids, head))[0]
    folder = tmp_path / "q"
    folder.mkdir()
    onnx.save_model(quantized, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    sess = decoder.session(folder, 1)
    got = sess.run(["logits"], decoder.feed(sess, ids, head))[0]
    assert float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got)) > cosine


def _with_outlier_channels(model: onnx.ModelProto, factor: float = 30.0) -> onnx.ModelProto:
    """The same function with a few loud input channels, as real LLMs have: layer 0's input norm scales
    channels 3 and 17 up by `factor` and the q/k/v weight's rows for them down by as much."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    qkv = next(n for n in out.graph.node if n.name == "/model/layers.0/attn/qkv_proj/MatMul")
    norm = next(n for n in out.graph.node if qkv.input[0] in n.output)
    for name, axis_scale in ((norm.input[1], factor), (qkv.input[1], 1 / factor)):
        array = onnx.numpy_helper.to_array(inits[name]).copy()
        array[[3, 17]] *= axis_scale
        inits[name].CopyFrom(onnx.numpy_helper.from_array(array, name))
    return out


def _logits(folder: Path, model: onnx.ModelProto, ids: np.ndarray, head: int) -> np.ndarray:
    folder.mkdir()
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    sess = decoder.session(folder, 1)
    return sess.run(["logits"], decoder.feed(sess, ids, head))[0]


def test_awq_scales_loud_channels_before_rounding_and_beats_round_to_nearest(export: Path, tmp_path: Path) -> None:
    model = _with_outlier_channels(onnx.load(str(export / "model.onnx")))
    head = decoder.head_size(export)
    hessians = calibration.hessians(model, _windows(), head, tmp_path / "aug", 1)
    awq, report = weight_quant.quantize(model, weight_quant.Plan(algorithm="awq"), hessians)
    rtn, rtn_report = weight_quant.quantize(model, weight_quant.Plan(algorithm="rtn"), hessians)
    groups = {row["input"]: row for row in report["awq"]}
    # Never worse than round-to-nearest on the calibration text (alpha 0 is it), and on the group with
    # the loud channels several times better.
    assert all(row["output_error_awq"] <= row["output_error_rtn"] for row in groups.values())
    qkv = groups["/model/layers.0/input_layernorm/output_0"]
    assert qkv["alpha"] > 0 and qkv["output_error_awq"] < 0.5 * qkv["output_error_rtn"], qkv
    assert qkv["inverse_scale"].startswith("folded into SimplifiedLayerNormalization")
    # Folded where a norm writes the input; a Mul node only where none does (o_proj, down_proj).
    muls = [n for n in awq.graph.node if n.name.endswith("__awq")]
    assert len(muls) == sum(1 for row in groups.values() if row["alpha"] > 0 and row["inverse_scale"].startswith("a Mul"))
    assert all("o_proj" in n.name or "down_proj" in n.name for n in muls)
    assert {r["algorithm"] for r in report["layers"] if r["bits"] == 4} == {"awq"}
    rtn_errors = {r["layer"]: r["output_error"] for r in rtn_report["layers"]}
    awq_errors = {r["layer"]: r["output_error"] for r in report["layers"]}
    assert awq_errors["/model/layers.0/attn/qkv_proj/MatMul"] < 0.5 * rtn_errors["/model/layers.0/attn/qkv_proj/MatMul"]
    # The graph computes what it should: AWQ's logits closer to the float model's than round-to-nearest's.
    ids = _windows(1, 64)[0]
    reference = _logits(tmp_path / "fp32", model, ids, head)
    errors = {name: float(np.linalg.norm(_logits(tmp_path / name, q, ids, head) - reference)) for name, q in (("awq", awq), ("rtn", rtn))}
    assert errors["awq"] < errors["rtn"], errors
