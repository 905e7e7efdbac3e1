"""Fine-tuning's replaced copies of the token sequences (workers/trainable/augment.py): which tokens
may change, what they change to, and that distillation on a real BERT export trains on them while
training on labels does not."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import torch

from bench.architectures import dataset, export
from service.core.methods.common import TrainingSpec
from service.core.methods.rows import FinetuneLog
from service.core.reported import STRICT
from workers.steps import StepData
from workers.trainable.augment import token_replacement
from workers.trainable.run import TrainableRun
from workers.trainable.training import predict


def _right_and_left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[101, 11, 12, 13, 14, 102, 0, 0],
                        [0, 0, 0, 101, 21, 22, 23, 102],
                        [101, 102, 0, 0, 0, 0, 0, 0]])
    return ids, (ids != 0).long()


def test_only_inner_real_tokens_change_and_only_to_tokens_of_the_data() -> None:
    ids, mask = _right_and_left_padded()
    replacement = token_replacement([ids, mask], 0, mask, copies=50, share=1.0)
    assert replacement is not None
    # Row 0: 11..14; row 1: 21..23 (left-padded: its first real token is at position 3); row 2 has none.
    assert replacement.replaceable.sum().item() == 7
    assert set(replacement.pool.tolist()) == {11, 12, 13, 14, 21, 22, 23}
    copies_ids, copies_mask = replacement.copies_of([ids, mask], torch.Generator().manual_seed(0))
    assert copies_ids.shape == (150, 8) and torch.equal(copies_mask, mask.repeat(50, 1))
    fixed = ~replacement.replaceable.repeat(50, 1)
    assert torch.equal(copies_ids[fixed], ids.repeat(50, 1)[fixed]), "padding, the first and the last real token stay"
    changed = copies_ids[~fixed]
    assert set(changed.tolist()) <= {11, 12, 13, 14, 21, 22, 23}
    # Drawn from the whole pool: row 0's positions also take row 1's tokens.
    assert {21, 22, 23} & set(copies_ids[0::3][:, 1:5].flatten().tolist())


def test_the_share_is_the_expected_fraction_and_nothing_to_replace_gives_none() -> None:
    ids = torch.randint(1, 1000, (64, 32))
    mask = torch.ones_like(ids)
    replacement = token_replacement([ids, mask], 0, mask, copies=4, share=0.3)
    assert replacement is not None
    copies_ids, _ = replacement.copies_of([ids, mask], torch.Generator().manual_seed(1))
    inner = replacement.replaceable.repeat(4, 1)
    # Replaced positions almost always hold another token (1000 possible ids): about 30% differ.
    differs = (copies_ids != ids.repeat(4, 1))[inner].float().mean().item()
    assert 0.25 < differs < 0.35
    assert token_replacement([ids, mask], 0, mask, copies=0, share=0.3) is None
    assert token_replacement([ids, mask], None, mask, copies=3, share=0.3) is None
    short = torch.tensor([[101, 102], [101, 102]])
    assert token_replacement([short], 0, None, copies=3, share=0.3) is None


def _bert_run(tmp_path: Path, labelled: bool = False) -> TrainableRun:
    exp = export("bert", "torchscript", tmp_path)
    arrays = dict(np.load(io.BytesIO(dataset(exp, 24, seed=0, seq=16))))
    held = dict(np.load(io.BytesIO(dataset(exp, 8, seed=1, seq=16))))
    labels = np.arange(24) % 2 if labelled else None
    return TrainableRun(onnx.load(str(exp.path)), StepData(inputs=arrays, labels=labels, evaluation=StepData(inputs=held)))


def test_distilling_a_bert_export_trains_on_its_copies_and_reports_them(tmp_path: Path) -> None:
    run = _bert_run(tmp_path)
    assert run.module.input_names[run.token_input] == "input_ids"
    assert run.original is None, "the original is converted again only for a step that fine-tunes"
    outcome = run.finetune(1, TrainingSpec(lr=1e-3), lambda *a: None)
    augmented = outcome["augmented"]
    assert augmented["input"] == "input_ids" and augmented["copies"] == 3 and augmented["samples_per_epoch"] == 96
    FinetuneLog.model_validate(outcome, context=STRICT)
    # The batch the data alone gets (24 samples: 8), so an epoch takes four times the steps.
    assert outcome["batch_size"] == 8 and len(outcome["losses"]) == 1
    # The original the copies are labelled by is not the module being trained: it still gives the reference outputs.
    assert {id(p) for p in run.original.parameters()}.isdisjoint(id(p) for p in run.module.parameters())
    run.finetune(1, TrainingSpec(lr=1e-2), lambda *a: None)
    assert torch.allclose(predict(run.original, run.inputs), run.teacher, atol=1e-5)
    assert run.finetune(1, TrainingSpec(augment_copies=0), lambda *a: None)["augmented"] is None


def test_training_on_labels_draws_no_copies(tmp_path: Path) -> None:
    run = _bert_run(tmp_path, labelled=True)
    assert run.labels is not None
    assert run.finetune(1, TrainingSpec(), lambda *a: None)["augmented"] is None
    # Distilling the same model towards the original's outputs does.
    assert run.finetune(1, TrainingSpec(), lambda *a: None, distil=True)["augmented"]["copies"] == 3
