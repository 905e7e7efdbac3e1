"""Feed-forward units removed on the ONNX graph (GPT-2's Conv1D MLP, whose reshapes state the width)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bench.architectures import dataset, export
from service.core.specs import PruneStep
from workers.pruning import ffn


@pytest.fixture(scope="module", params=["torchscript", "dynamo"])
def gpt2(request, tmp_path_factory) -> tuple[onnx.ModelProto, dict[str, np.ndarray], object]:
    exp = export("gpt2", request.param, tmp_path_factory.mktemp(request.param))
    return onnx.load(str(exp.path)), dict(np.load(io.BytesIO(dataset(exp, 8, seq=16)))), exp


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_blocks_are_the_mlps_named_as_in_torch(gpt2) -> None:
    model, _, _ = gpt2
    blocks = ffn.find_blocks(model)
    assert [(b.name, b.width) for b in blocks] == [(f"model.transformer.h.{i}.mlp.c_fc", 128) for i in range(2)]
    assert all(b.shape_constants for b in blocks)  # the width is spelled out in both exporters' reshapes


@pytest.mark.parametrize("importance", ["l2", "taylor"])
def test_pruned_graph_equals_the_original_with_those_units_off(gpt2, importance: str) -> None:
    model, feeds, exp = gpt2
    spec = PruneStep(kind="structured", amount=0.3, importance=importance, layer_amounts={"model.transformer.h.1.mlp.c_fc": 0.6})
    pruned, report = ffn.prune_ffn(model, spec, feeds)
    # Different widths per block: the dynamo export shares one Concat between the blocks' reshapes.
    assert [b["units_after"] for b in report["blocks"]] == [88, 48]
    blocks = ffn.find_blocks(model)
    removed = {b: [j for j in range(128) if j not in _kept_units(model, pruned, blocks[b])] for b in range(2)}
    np.testing.assert_allclose(run(pruned, feeds), run(ffn._zeroed(model, blocks, removed), feeds), rtol=1e-4, atol=1e-4)
    weights = {i.name: i.dims for i in pruned.graph.initializer}
    assert [weights[n] for n in ("model.transformer.h.0.mlp.c_fc.weight", "model.transformer.h.1.mlp.c_fc.weight")] == [[32, 88], [32, 48]]
    # Other batch sizes and sequence lengths still run.
    other = dict(np.load(io.BytesIO(dataset(exp, 3, seed=5, seq=9))))
    assert run(pruned, other).shape == (3, 9, 200)


def _kept_units(original: onnx.ModelProto, pruned: onnx.ModelProto, block: ffn.FeedForward) -> list[int]:
    """Which of the original's columns the pruned first weight holds (matched by value)."""
    before = onnx.numpy_helper.to_array(next(i for i in original.graph.initializer if i.name == block.up.weight))
    after = onnx.numpy_helper.to_array(next(i for i in pruned.graph.initializer if i.name == block.up.weight))
    return [int(np.argmin(np.abs(before - after[:, [k]]).sum(0))) for k in range(after.shape[1])]


def test_bert_feed_forward_blocks_are_found_too(tmp_path: Path) -> None:
    model = onnx.load(str(export("bert", "dynamo", tmp_path).path))
    assert [b.name for b in ffn.find_blocks(model)] == [f"model.encoder.layer.{i}.intermediate.dense" for i in range(2)]
