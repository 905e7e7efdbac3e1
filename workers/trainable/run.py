"""The scaffold shared by methods that change a model's layers and then train it back (low_rank,
depthwise_separable, early_exit): the trainable module, training and held-out tensors, the
original's outputs as the reference, a quality score, fine-tuning that keeps the best epoch, and the
way back into the user's ONNX graph."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from workers.layer_names import require_known
from workers.steps import StepData
from workers.data import token_vocabularies
from workers.evaluation import mask_input
from workers.fixed_batch import chunks, exactly
from workers.hessian import Batch
from workers.trainable.augment import DEFAULT_COPIES, token_replacement
from workers.trainable.from_onnx import OnnxGraphModule, to_torch
from workers.trainable.to_onnx import example_input, export, has_dynamic_batch
from workers.trainable.training import DISTILL_TEMPERATURE, FINETUNE_LR, Targets, TrainConfig, finetune_epochs, output_kind, padding_mask, predict, reference_outputs, score, soft_loss, tensors, train, train_config
from workers.trainable.verify import trainable
from workers.trainable.write_back import trained_onnx


CALIBRATION_BATCH = 32


class TrainableRun:
    def __init__(self, model: onnx.ModelProto, data: StepData, example_batch: int = 8) -> None:
        self.model = model
        self.module: OnnxGraphModule = trainable(model, data)
        self.data = data
        names = self.module.input_names
        if data.available:
            self.inputs, self.labels = tensors(data, names), data.labels
            held_out = data.evaluation or data
            self.eval_inputs, self.eval_labels = tensors(held_out, names), held_out.labels
            self.evaluated_on = "evaluation data" if data.evaluation else "training data (no evaluation dataset)"
        else:
            rng = np.random.default_rng(0)
            self.inputs = self.eval_inputs = [torch.from_numpy(rng.standard_normal(e.shape).astype(e.dtype)) for e in (example_input(model, i) for i in names)]
            self.labels = self.eval_labels = None
            self.evaluated_on = "synthetic inputs"
        self.example = tuple(exactly(t, data.fixed_batch) if data.fixed_batch else t[:example_batch] for t in self.eval_inputs)
        # Now, before the method changes the module: these are the original's outputs.
        # What the output is decides the fine-tuning loss and the score (a sentence embedding is not class
        # logits), and how the reference is kept (a language model's as its top tokens); a few rows tell.
        few = predict(self.module, [t[: data.fixed_batch or 4] for t in self.inputs])
        self.kind = output_kind(few, set(token_vocabularies(model).values()), self.module.output_names[0], self.labels is not None)
        self.teacher = reference_outputs(self.module, self.inputs, self.kind)
        self.eval_teacher = self.teacher if data.evaluation is None else reference_outputs(self.module, self.eval_inputs, self.kind)
        self.metric = metric_for(self.kind, self.eval_labels is not None)
        # With token ids in the data, fine-tuning draws replaced copies of the sequences
        # (workers.trainable.augment), labelled by the original converted again from the untouched graph
        # when first needed: one more copy of the weights in memory, only for steps that fine-tune.
        self.token_input = token_input(model, names) if data.available else None
        self.original: nn.Module | None = None

    def quality(self, module: nn.Module | None = None) -> float:
        return score(module or self.module, self.eval_inputs, self.eval_labels, self.eval_teacher, self.kind)

    @staticmethod
    def check_named(layers: dict[str, nn.Module], asked: list[str] | None, what: str = "layers") -> None:
        """Every layer the step names must exist; the error lists the model's."""
        require_known(asked, layers, what)

    def inputs_seen(self, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """The input each named layer receives on the example batch."""
        seen: dict[str, torch.Tensor] = {}

        def recorder(layer_name: str):
            def hook(_module: nn.Module, args: tuple, _output: Any) -> None:  # returns None: a returned value would replace the output
                seen.setdefault(layer_name, args[0].detach())
            return hook

        hooks = [layer.register_forward_hook(recorder(n)) for n, layer in layers.items()]
        with torch.no_grad():
            self.module.eval()(*self.example)
        for hook in hooks:
            hook.remove()
        return seen

    def distance_to_original(self, samples: int) -> Callable[[], float]:
        """The distillation loss of the module's outputs to the original's (self.teacher) on the first
        training samples, batch by batch (a language model's logits for all of them at once would be
        the vocabulary times the samples): how far a change moved the model, continuous for every
        output kind (what sensitivity measurements compare)."""
        count = min(samples, len(self.inputs[0]))
        fixed = self.data.fixed_batch

        @torch.no_grad()
        def distance() -> float:
            self.module.eval()
            total = 0.0
            for rows, real in chunks(count, fixed or 16, fixed is not None):
                index = torch.from_numpy(rows)
                inputs = [t[index] for t in self.inputs]
                out = self.module(*inputs)
                out = (out[0] if isinstance(out, tuple) else out)[:real]
                total += real * float(soft_loss(out, self.teacher[index[:real]], DISTILL_TEMPERATURE, self.kind, padding_mask(self.module, [t[:real] for t in inputs])))
            return total / count
        return distance

    def calibration_batches(self, samples: int, batch_size: int = CALIBRATION_BATCH) -> list[Batch]:
        """Up to `samples` training samples in batches (the model's fixed batch, if it has one), each
        with its token mask when the model takes one: what a layer's input Hessian is taken on."""
        mask_name = mask_input(self.data)
        names = list(self.module.input_names)
        mask = self.inputs[names.index(mask_name)] if mask_name in names else None
        batch = self.data.fixed_batch or batch_size
        count = min(samples, len(self.inputs[0]))
        return [(tuple(t[rows] for t in self.inputs), None if mask is None else mask[rows])
                for rows, _ in chunks(count, batch, self.data.fixed_batch is not None)]

    def replace(self, layer_name: str, replacement: nn.Module) -> None:
        key = next(k for k, n in self.module.layer_names.items() if n == layer_name)
        self.module.layers[key] = replacement

    def finetune(self, asked_epochs: int | None, training: Any, on_epoch: Callable[[int, int, float], None], *, distil: bool = False,
                 default_lr: float = FINETUNE_LR, after_step: Callable[[], Any] | None = None) -> dict[str, Any]:
        """Train the changed module (on labels, or with `distil` or without labels on the original's
        outputs), keeping the best epoch on the held-out data; returns the scores, the epoch kept and
        the loss per epoch. `after_step` runs after each optimiser step (e.g. re-imposing a constraint)."""
        epochs = finetune_epochs(asked_epochs, self.data.available)
        outcome: dict[str, Any] = {"epochs": epochs, "target": "the original model's outputs" if distil or self.labels is None else "labels", "losses": []}
        if epochs:
            labels = None if distil else self.labels
            config = train_config(training, epochs, default_lr)
            augment, outcome["augmented"] = self.augmentation(config, labels is not None)
            outcome["losses"] = train(self.module, self.inputs, labels, self.teacher, config,
                                      lambda epoch, loss: on_epoch(epoch, epochs, loss), after_step, self.data.fixed_batch, keep_best=self.quality,
                                      outcome=outcome, kind=self.kind, augment=augment)
        return outcome

    def augmentation(self, config: TrainConfig, labels_used: bool) -> tuple[Callable[[torch.Generator], tuple[list[torch.Tensor], Targets]] | None, dict | None]:
        """What fine-tuning draws each epoch besides the data (`train`'s `augment`) and its report:
        replaced copies of the token sequences labelled by the original, when the step distils towards
        the original's outputs (not on labels) and the data has token ids; (None, None) otherwise."""
        copies = DEFAULT_COPIES if config.augment_copies is None else config.augment_copies
        if labels_used or self.token_input is None:
            return None, None
        replacement = token_replacement(self.inputs, self.token_input, padding_mask(self.module, self.inputs), copies, config.augment_share)
        if replacement is None:
            return None, None
        if self.original is None:
            self.original = to_torch(self.model).eval()
        original, inputs, kind = self.original, self.inputs, self.kind

        def draw(generator: torch.Generator) -> tuple[list[torch.Tensor], Targets]:
            extra = replacement.copies_of(inputs, generator)
            return extra, reference_outputs(original, extra, kind)
        return draw, replacement.describe(self.module.input_names[self.token_input], len(inputs[0]))

    def to_onnx(self) -> onnx.ModelProto:
        """The user's graph with the changed layers written in; a fresh export when that cannot be done."""
        module, example = self.module, self.example
        return trained_onnx(self.model, module, example, lambda: export(module, example, module.input_names, module.output_names, has_dynamic_batch(self.model)))


def token_input(model: onnx.ModelProto, names: list[str]) -> int | None:
    """Which of the module's inputs holds token ids: the one reading the largest embedding table
    (token type ids read a table of two rows)."""
    vocabularies = {name: rows for name, rows in token_vocabularies(model).items() if name in names and rows > 2}
    return names.index(max(vocabularies, key=lambda n: vocabularies[n])) if vocabularies else None


def metric_for(kind: str, has_labels: bool) -> str:
    """The quality measure a method reports for outputs of `kind` (workers.output_kind)."""
    if kind == "classifier":
        return "accuracy" if has_labels else "agreement_with_original"
    return "next_token_agreement_with_original" if kind == "token_logits" else "cosine_to_original"
