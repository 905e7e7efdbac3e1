"""What a model's output is decides how it is fine-tuned and scored: a [batch, d] sentence embedding
(normalised rows, or named like one) is trained towards the original by cosine, not as class logits
(KL over softmaxed embedding dimensions barely moves a normalised embedding: MiniLM's fine-tuning
gained little until this was told apart)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from service.core.specs import PruneStep
from workers.methods import prune
from workers.steps import StepContext, StepData
from workers.trainable.training import output_kind, quality


def test_output_kinds() -> None:
    logits = torch.randn(16, 10) * 3
    unit = torch.nn.functional.normalize(torch.randn(16, 384), dim=1)
    assert output_kind(logits) == "classifier"
    assert output_kind(unit) == "features"  # L2-normalised rows: an embedding
    assert output_kind(torch.randn(16, 384), name="sentence_embedding") == "features"
    assert output_kind(torch.randn(16, 768), name="pooler_output") == "features"
    assert output_kind(unit, has_labels=True) == "classifier"  # class labels say what it is
    assert output_kind(torch.randn(2, 7, 50), vocabulary_sizes={50}) == "token_logits"
    assert output_kind(torch.randn(2, 7, 32), vocabulary_sizes={50}) == "features"


def test_embeddings_are_scored_by_cosine_not_argmax() -> None:
    reference = torch.nn.functional.normalize(torch.randn(32, 64), dim=1)
    close = torch.nn.functional.normalize(reference + 0.05 * torch.randn(32, 64), dim=1)
    cosine = float((close * reference).sum(1).mean())
    assert quality(close, None, reference, "features") == pytest.approx(cosine, abs=1e-6)


def normalised_encoder() -> helper.ModelProto:
    """x -> MatMul -> Tanh -> MatMul -> L2 normalise: a tiny sentence-embedding head."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((32, 64)) / 6).astype(np.float32), "w0"),
             numpy_helper.from_array((rng.standard_normal((64, 48)) / 8).astype(np.float32), "w1")]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"]), helper.make_node("Tanh", ["h0"], ["h"]),
             helper.make_node("MatMul", ["h", "w1"], ["e"]),
             helper.make_node("ReduceL2", ["e"], ["n"], axes=[1], keepdims=1), helper.make_node("Div", ["e", "n"], ["embedding_out"])]
    graph = helper.make_graph(nodes, "enc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("embedding_out", TensorProto.FLOAT, ["N", 48])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_pruning_an_embedding_model_fine_tunes_towards_its_cosine(tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((256, 32)).astype(np.float32)
    data = StepData(inputs={"x": x[:192]}, evaluation=StepData(inputs={"x": x[192:]}))
    step = PruneStep(amount=0.6, finetune_epochs=3, prune_output_layer=True, training={"lr": 3e-3})
    report = prune.apply(normalised_encoder(), step, data, StepContext(work_dir=tmp_path)).report
    assert report["quality_metric"] == "cosine_to_original"
    scores = report["finetune_by_round"][0]["scores_by_epoch"]
    assert 0.5 < scores[0] < 0.999 and max(scores) > scores[0]  # pruned state scored by cosine, and training raised it
    assert report["final"] == max(scores)


def test_fidelity_reports_top1_agreement_only_for_scores() -> None:
    from workers.metrics import fidelity

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 10))
    assert fidelity(logits, logits + 0.01)["top1_agreement"] == 1.0  # shape alone: class scores
    assert fidelity(logits, logits, "features")["top1_agreement"] is None
    hidden = rng.standard_normal((8, 5, 32))
    assert fidelity(hidden, hidden)["top1_agreement"] is None  # hidden states, not vocabulary-wide
    assert fidelity(hidden, hidden, "token_logits")["top1_agreement"] == 1.0


def test_taylor_importance_is_refused_for_embeddings_and_works_per_token(tmp_path: Path) -> None:
    from service.core.errors import CompressionFailed
    from tests.unit.test_real_architectures import _feeds
    from bench.architectures import export

    x = np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)
    with pytest.raises(CompressionFailed) as refused:
        prune.apply(normalised_encoder(), PruneStep(amount=0.5, importance="taylor"), StepData(inputs={"x": x}), StepContext(work_dir=tmp_path))
    assert refused.value.code == "importance_unsupported" and "wanda" in refused.value.message
    # A language model's [batch, positions, vocabulary] logits: cross-entropy at every position.
    exp = export("gpt2", "dynamo", tmp_path)
    result = prune.apply(onnx.load(str(exp.path)), PruneStep(amount=0.5, importance="taylor", finetune_epochs=0),
                         StepData(inputs=_feeds(exp, 16)), StepContext(work_dir=tmp_path))
    assert result.report["output_kind"] == "token_logits" and result.report["achieved"] > 0.45
