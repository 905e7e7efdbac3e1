"""Attention-head pruning on real exports of BERT (MiniLM's class) and ViT from both torch exporters:
blocks are found, heads are ranked by measured importance, and the narrowed graph computes exactly
what the original computes with those heads switched off."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from pydantic import ValidationError

from bench.architectures import dataset, export
from service.core.specs import PruneStep
from workers.pruning import heads


def _feeds(exp, samples: int = 8) -> dict[str, np.ndarray]:
    arrays = np.load(io.BytesIO(dataset(exp, samples, seed=3, seq=12)))
    return {name: arrays[name] for name in exp.inputs}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _with_heads_zeroed(model: onnx.ModelProto, block: heads.AttentionBlock, off: list[int]) -> onnx.ModelProto:
    """The original with those heads' rows of the output projection zeroed: the heads contribute nothing."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    init = next(i for i in out.graph.initializer if i.name == block.o.weight)
    w = numpy_helper.to_array(init).copy()
    for h in off:
        index = [slice(None)] * 2
        index[1 - block.o.output_axis] = slice(h * block.head_dim, (h + 1) * block.head_dim)
        w[tuple(index)] = 0.0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    return out


@pytest.fixture(scope="module", params=[("bert", "torchscript"), ("bert", "dynamo"), ("vit", "torchscript"), ("vit", "dynamo")], ids=lambda p: "-".join(p))
def exported(request, tmp_path_factory: pytest.TempPathFactory):
    arch, exporter = request.param
    exp = export(arch, exporter, tmp_path_factory.mktemp(f"{arch}-{exporter}"))
    return exp, onnx.load(str(exp.path))


def test_blocks_are_found_with_their_heads(exported) -> None:
    _, model = exported
    blocks = heads.find_blocks(model)
    assert [(b.heads, b.head_dim) for b in blocks] == [(2, 16), (2, 16)]  # the tiny configurations: 2 layers, 2 heads of 16
    assert all("layer" in b.name or "layers" in b.name for b in blocks)


def test_pruned_graph_equals_the_original_with_those_heads_off(exported) -> None:
    exp, model = exported
    feeds = _feeds(exp)
    pruned, report = heads.prune_heads(model, 0.5, feeds)
    assert report["removed"] == 2 and all(row["heads_after"] == 1 for row in report["blocks"])
    reference = model
    for block, row in zip(heads.find_blocks(model), report["blocks"]):
        reference = _with_heads_zeroed(reference, block, row["removed"])
    np.testing.assert_allclose(_run(pruned, feeds), _run(reference, feeds), rtol=1e-4, atol=1e-5)
    # Physically narrower: the query projection of every block lost half its columns.
    for block in heads.find_blocks(model):
        before = next(i for i in model.graph.initializer if i.name == block.q.weight).dims
        after = next(i for i in pruned.graph.initializer if i.name == block.q.weight).dims
        assert after[block.q.output_axis] == before[block.q.output_axis] // 2
    # And it runs at another batch size and sequence length than it was ranked on.
    other = _feeds(exp, samples=3)
    assert _run(pruned, other).shape[0] == 3


def test_a_head_that_contributes_nothing_is_the_one_removed(exported) -> None:
    exp, model = exported
    block = heads.find_blocks(model)[0]
    silent = _with_heads_zeroed(model, block, [1])
    _, report = heads.prune_heads(silent, 0.25, _feeds(exp))  # one head of four
    assert report["removed"] == 1 and report["blocks"][0]["removed"] == [1]
    assert report["blocks"][0]["importance"][1] == pytest.approx(0.0, abs=1e-9)


def test_gpt2_fused_attention_is_refused_with_its_code(tmp_path: Path) -> None:
    exp = export("gpt2", "dynamo", tmp_path)
    with pytest.raises(heads.HeadPruningUnsupported) as info:
        heads.prune_heads(onnx.load(str(exp.path)), 0.5, _feeds(exp))
    assert info.value.code == "head_pruning_unsupported" and "GPT-2" in info.value.message


def test_heads_need_structured_pruning_and_amount_zero_needs_heads() -> None:
    with pytest.raises(ValidationError, match="kind 'structured'"):
        PruneStep(kind="unstructured", heads=0.25)
    with pytest.raises(ValidationError, match="only with heads"):
        PruneStep(kind="structured", amount=0)
    assert PruneStep(kind="structured", amount=0, heads=0.25).heads == 0.25
