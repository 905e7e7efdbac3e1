"""Comparing the original and a compressed model batch by batch: padded positions left out of
token-output fidelity, scores reduced on the fly (the same numbers as comparing everything at once)."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.architectures import dataset, export
from workers.evaluation import Comparison, ReferenceRun, compare
from workers.steps import StepData
from workers.metrics import fidelity


class _NoisyPadding:
    """The original's session, but what it answers at padded positions is replaced by noise: a model
    that differs from the original only where the user never looks."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session, self.rng = session, np.random.default_rng(0)

    def run(self, names, feed):
        (out,) = self.session.run(names, feed)
        padded = feed["attention_mask"] == 0
        out = out.copy()
        out[padded] = self.rng.standard_normal((int(padded.sum()), out.shape[-1])) * 10
        return [out]


def test_padded_positions_are_left_out_of_token_fidelity() -> None:
    exp = export("bert", "torchscript", Path(tempfile.mkdtemp()))
    arrays = dict(np.load(io.BytesIO(dataset(exp, 40, seq=32))))
    data = StepData(inputs={name: arrays[name] for name in exp.inputs})
    session = ort.InferenceSession(str(exp.path), providers=["CPUExecutionProvider"])
    reference = ReferenceRun(session, data, limit=40)
    result = compare(reference, _NoisyPadding(session), "features")
    assert result.fidelity()["cosine"] > 0.9999 and result.samples == 40
    padded = 1 - arrays["attention_mask"].mean()
    assert f"{padded:.0%} of positions are padding" in result.positions_note()
    # Counting every position, as before, would have called this model unfaithful.
    everything = fidelity(session.run(None, data.inputs)[0], _NoisyPadding(session).run(None, data.inputs)[0], "features")
    assert everything["cosine"] < 0.9


def test_running_scores_equal_the_whole_dataset_at_once() -> None:
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((50, 7))
    cand = ref + rng.standard_normal((50, 7)) * 0.3
    labels = rng.integers(0, 7, 50)
    result = Comparison(kind="classifier")
    for start in range(0, 50, 16):
        result.add(ref[start:start + 16], cand[start:start + 16], None, labels[start:start + 16])
    whole = fidelity(ref, cand, "classifier")
    assert np.isclose(result.fidelity()["cosine"], whole["cosine"]) and np.isclose(result.fidelity()["top1_agreement"], whole["top1_agreement"])
    assert np.isclose(result.fidelity()["max_abs_diff"], whole["max_abs_diff"])
    assert result.accuracy() == float((cand.argmax(-1) == labels).mean()) and result.reference_accuracy() == float((ref.argmax(-1) == labels).mean())


def test_token_agreement_counts_real_positions_only() -> None:
    ref = np.zeros((2, 3, 5))
    ref[..., 0] = 1
    cand = ref.copy()
    cand[1, 2] = [0, 9, 0, 0, 0]  # disagrees only at a padded position
    positions = np.array([[True, True, True], [True, True, False]])
    result = Comparison(kind="token_logits")
    result.add(ref, cand, positions, None)
    assert result.fidelity()["top1_agreement"] == 1.0 and result.fidelity()["cosine"] == 1.0


def test_non_finite_outputs_are_counted_per_sample() -> None:
    ref = np.ones((4, 3))
    cand = ref.copy()
    cand[2, 1] = np.nan
    result = Comparison(kind="features")
    result.add(ref, cand, None, None)
    assert result.non_finite_samples == 1


def test_training_losses_and_scores_leave_padding_out() -> None:
    import torch

    from workers.trainable.training import TopTokens, quality, soft_loss

    teacher = torch.randn(2, 3, 8)
    student = teacher.clone()
    positions = torch.tensor([[1, 1, 0], [1, 0, 0]])
    student[positions == 0] = torch.randn(3, 8) * 10  # different only where the mask says padding
    assert float(soft_loss(student, teacher, 2.0, "features", positions)) < 1e-6
    assert float(soft_loss(student, teacher, 2.0, "features")) > 0.1
    assert quality(student, None, teacher, "features", positions) > 0.9999
    top = TopTokens.of(teacher, 4, 2.0)
    assert float(soft_loss(student, top, 2.0, "token_logits", positions)) < 1e-5
    assert quality(TopTokens.of(student, 1, 2.0), None, top, "token_logits", positions) == 1.0
