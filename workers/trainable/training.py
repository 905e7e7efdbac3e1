"""Fine-tuning and evaluation of trainable modules on a job's data.

Labels, when the data has them, give a cross-entropy loss; without labels the original model's
outputs are the targets, by what the output is (`output_kind`): soft-target distillation at
temperature T (loss scaled by T^2) for class logits, the same at every position for per-token
logits, 1 - cosine + MSE per vector for embeddings and hidden states. So an unlabelled production
sample still trains, and a sentence embedding is not mistaken for class logits.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workers import output_kind as kinds
from workers.fixed_batch import exactly, padded_order
from workers.trainable.augment import DEFAULT_SHARE
from workers.trainable.device import training_device
from workers.steps import StepData

DISTILL_TEMPERATURE = 2.0


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    seed: int = 0
    augment_copies: int | None = None  # None: the default where augmentation applies (workers.trainable.augment)
    augment_share: float = DEFAULT_SHARE
    auto_batch: bool = False  # the step did not set batch_size: small datasets get smaller batches

    def batch_for(self, samples: int) -> int:
        """The batch size to train `samples` with: as asked, or by default at least MIN_STEPS_PER_EPOCH
        steps an epoch (measured on MiniLM, 300 sentences: 10 steps in 2 epochs left 50% Wanda pruning at
        cosine 0.921, 150 steps at 0.941), never below MIN_AUTO_BATCH."""
        if not self.auto_batch:
            return self.batch_size
        return max(MIN_AUTO_BATCH, min(self.batch_size, samples // MIN_STEPS_PER_EPOCH))


DEFAULT_BATCH = 64
MIN_STEPS_PER_EPOCH = 16
MIN_AUTO_BATCH = 8


# A trained model is fine-tuned gently; a new student learns from scratch.
FINETUNE_LR = 1e-4
STUDENT_LR = 1e-3
# Fine-tuning epochs when the job has data and the step does not say (prune, cluster).
DEFAULT_FINETUNE_EPOCHS = 2


def train_config(training, epochs: int, default_lr: float) -> TrainConfig:
    values = training.model_dump()
    values["lr"] = values.get("lr") or default_lr
    auto_batch = values.get("batch_size") is None
    values["batch_size"] = values.get("batch_size") or DEFAULT_BATCH
    return TrainConfig(epochs=epochs, auto_batch=auto_batch, **values)


def finetune_epochs(asked: int | None, data_available: bool) -> int:
    return asked if asked is not None else (DEFAULT_FINETUNE_EPOCHS if data_available else 0)


def tensors(data: StepData, names: list[str]) -> list[torch.Tensor]:
    return [torch.from_numpy(data.inputs[name]) for name in names]


# A language model's reference outputs are kept as each position's TOP_K most likely tokens and the
# mass of the rest (TopTokens): the whole distribution of GPT-2 over 256 sequences of 16 tokens is
# 823 MB (a float per vocabulary word and position), these 33 outcomes about 1 MB. A trained model puts
# most of its mass in its top 32; the loss stays an exact KL over the 33 outcomes either way.
TOP_K = 32
# Batches of reference outputs are cut so that one batch of them stays under this.
PREDICT_BATCH_BYTES = 64 * 1024**2


@dataclass
class TopTokens:
    """Per-token scores kept as the log-probabilities (at `temperature`) of the k most likely tokens,
    descending, their token ids, and the log of the probability left to all other tokens: the
    distribution coarse-grained into k + 1 outcomes, so the soft-target loss is an exact KL divergence
    (a randomly initialised model spreads most of its mass outside any top 32)."""

    log_probs: torch.Tensor  # [samples, positions, k]
    indices: torch.Tensor  # [samples, positions, k]
    log_rest: torch.Tensor  # [samples, positions]
    temperature: float

    @classmethod
    def of(cls, logits: torch.Tensor, k: int, temperature: float) -> "TopTokens":
        log_probs = F.log_softmax(logits.float() / temperature, -1)
        top, indices = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1)
        return cls(top, indices, _log_rest(top), temperature)

    def __getitem__(self, rows: Any) -> "TopTokens":
        return TopTokens(self.log_probs[rows], self.indices[rows], self.log_rest[rows], self.temperature)

    def __len__(self) -> int:
        return len(self.log_probs)

    def to(self, device: Any) -> "TopTokens":
        return TopTokens(self.log_probs.to(device), self.indices.to(device), self.log_rest.to(device), self.temperature)

    def argmax(self, dim: int = -1) -> torch.Tensor:
        return self.indices[..., 0]


Targets = Union[torch.Tensor, TopTokens]


def concatenated(first: Targets, second: Targets) -> Targets:
    """Two sets of reference outputs as one (the training data's and an augmentation's)."""
    if isinstance(first, TopTokens) and isinstance(second, TopTokens):
        return TopTokens(*(torch.cat([getattr(first, f), getattr(second, f)]) for f in ("log_probs", "indices", "log_rest")), first.temperature)
    assert isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)
    return torch.cat([first, second])


def _log_rest(top_log_probs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum of the top probabilities), kept finite when the top tokens hold all the mass."""
    covered = torch.logsumexp(top_log_probs, -1).clamp(max=-1e-7)
    return torch.log(-torch.expm1(covered))


def module_fixed_batch(module: nn.Module) -> int | None:
    """The batch a module converted from a fixed-batch export accepts (its students inherit it)."""
    return getattr(module, "fixed_batch", None)


@torch.no_grad()
def predict(module: nn.Module, inputs: list[torch.Tensor], batch_size: int = 256, top_k: int | None = None,
            temperature: float = DISTILL_TEMPERATURE) -> Any:
    """First output over all inputs, computed on the training device, returned on the CPU; in
    chunks of the module's fixed batch when it has one (filler rows dropped), else in batches whose
    outputs stay under PREDICT_BATCH_BYTES. With `top_k`, per-token scores come back as TopTokens."""
    device = training_device()
    module.to(device).eval()
    fixed = module_fixed_batch(module)
    n = len(inputs[0])
    outs: list[Any] = []
    start = 0
    batch = fixed or min(batch_size, 4)  # a few rows first: how large is one sample's output?
    while start < n:
        real = min(batch, n - start)
        rows = torch.from_numpy(exactly(np.arange(start, start + real), fixed) if fixed else np.arange(start, start + real))
        out = module(*(t[rows].to(device) for t in inputs))
        out = (out[0] if isinstance(out, tuple) else out)[:real]
        if top_k is not None:
            outs.append(TopTokens.of(out, top_k, temperature).to("cpu"))
        else:
            outs.append(out.cpu())
        if not fixed:
            batch = int(max(1, min(batch_size, PREDICT_BATCH_BYTES // max(1, out[:1].numel() * out.element_size()))))
        start += real
    module.to("cpu")
    if top_k is not None:
        return TopTokens(*(torch.cat([getattr(o, f) for o in outs]) for f in ("log_probs", "indices", "log_rest")), temperature)
    return torch.cat(outs)


def reference_outputs(module: nn.Module, inputs: list[torch.Tensor], kind: str, temperature: float = DISTILL_TEMPERATURE) -> Targets:
    """The original's outputs to train and score towards: whole, or a language model's top tokens at
    the temperature its soft targets will be taken at."""
    return predict(module, inputs, top_k=TOP_K if kind == "token_logits" else None, temperature=temperature)


def padding_mask(module: nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor | None:
    """The input that marks real tokens (1) against padding (0), by the module's input names: an
    integer [samples, positions] input named like an attention mask. Padded positions are left out
    of losses and scores as they are of the pipeline's fidelity (workers.evaluation)."""
    for name, tensor in zip(getattr(module, "input_names", None) or [], inputs):
        if "mask" in name.lower() and tensor.dim() == 2 and not tensor.is_floating_point():
            return tensor
    return None


def _real_positions(outputs: Any, positions: torch.Tensor | None) -> torch.Tensor | None:
    """[samples, positions] booleans when the outputs are per token and the mask fits them."""
    if positions is None:
        return None
    shape = outputs.log_probs.shape if isinstance(outputs, TopTokens) else outputs.shape
    return positions.bool() if len(shape) >= 3 and tuple(positions.shape) == tuple(shape[:2]) else None


def score(module: nn.Module, inputs: list[torch.Tensor], labels: np.ndarray | None, reference: Targets, kind: str) -> float:
    """`quality` of the module's outputs on `inputs`; a language model's as its top token only."""
    outputs = predict(module, inputs, top_k=1 if kind == "token_logits" else None)
    return quality(outputs, labels, reference, kind, padding_mask(module, inputs))


def output_kind(outputs: torch.Tensor, vocabulary_sizes: set[int] | None = None, name: str | None = None, has_labels: bool = False) -> str:
    """See workers.output_kind: one rule for training and for the pipeline's measurements."""
    return kinds.output_kind(outputs.detach().cpu().numpy(), vocabulary_sizes, name, has_labels)


def _kind(outputs: torch.Tensor, kind: str | None) -> str:
    return kind or ("classifier" if outputs.dim() == 2 and outputs.shape[1] > 1 else "features")


def quality(outputs: Targets, labels: np.ndarray | None, reference: Targets, kind: str | None = None, positions: torch.Tensor | None = None) -> float:
    """Accuracy against labels when there are labels; otherwise top-1 agreement with the original
    model for class logits and per-token logits (the next word), the mean cosine similarity to it
    for anything else; per-token outputs at the real (unpadded) `positions` only."""
    real = _real_positions(outputs, positions)
    if kind == "token_logits":
        same = outputs.argmax(-1) == reference.argmax(-1)
        return float(same[real].float().mean()) if real is not None and real.any() else float(same.float().mean())
    assert isinstance(outputs, torch.Tensor) and isinstance(reference, torch.Tensor)
    if _kind(outputs, kind) == "classifier":
        target = torch.from_numpy(labels) if labels is not None else reference.argmax(1)
        return float((outputs.argmax(1) == target[: len(outputs)]).float().mean())
    if real is not None:
        keep = real.unsqueeze(-1).to(outputs.dtype)
        outputs, reference = outputs * keep, reference * keep
    return float(F.cosine_similarity(outputs.flatten(1), reference.flatten(1)).mean())


def soft_loss(student: torch.Tensor, teacher: Targets, t: float, kind: str, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The loss towards the original's (teacher's) outputs, by what they are; for per-token outputs,
    over the real (unpadded) `positions` only."""
    real = _real_positions(student, positions)
    if real is not None and kind != "classifier" and real.any():
        student = student[real]  # [real positions, ...]: each position a row
        teacher = teacher[real] if isinstance(teacher, TopTokens) else teacher[real]
    if isinstance(teacher, TopTokens):
        # KL between the two distributions coarse-grained the same way: the teacher's top k tokens,
        # and everything else as one outcome.
        if abs(teacher.temperature - t) > 1e-9:
            raise ValueError(f"soft targets were kept at temperature {teacher.temperature}, not {t}")
        top = F.log_softmax(student / t, -1).gather(-1, teacher.indices)
        kl = (teacher.log_probs.exp() * (teacher.log_probs - top)).sum(-1) + teacher.log_rest.exp() * (teacher.log_rest - _log_rest(top))
        return kl.mean() * t * t
    if kind == "classifier":
        return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t
    if kind == "token_logits":  # KL at every position, averaged over positions
        v = student.shape[-1]
        return F.kl_div(F.log_softmax(student.reshape(-1, v) / t, 1), F.softmax(teacher.reshape(-1, v) / t, 1), reduction="batchmean") * t * t
    # Embeddings and hidden states: direction matters most (a normalised sentence embedding's MSE is
    # tiny whatever happens), so 1 - cosine per vector, plus MSE for the magnitude.
    s, te = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    return (1 - F.cosine_similarity(s, te, dim=1)).mean() + F.mse_loss(s, te)


def _loss(student: torch.Tensor, labels: torch.Tensor | None, teacher: Targets, kind: str | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
    kind = _kind(student, kind)
    if labels is not None and kind == "classifier":
        return F.cross_entropy(student, labels)
    return soft_loss(student, teacher, DISTILL_TEMPERATURE, kind, positions)


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def train(
    module: nn.Module,
    inputs: list[torch.Tensor],
    labels: np.ndarray | None,
    teacher: Targets,
    config: TrainConfig,
    on_epoch: Callable[[int, float], None],
    after_step: Callable[[], None] | None = None,
    fixed_batch: int | None = None,
    keep_best: Callable[[], float] | None = None,
    outcome: dict | None = None,
    kind: str | None = None,
    augment: Callable[[torch.Generator], tuple[list[torch.Tensor], Targets]] | None = None,
) -> list[float]:
    """Train for config.epochs; `on_epoch(epoch, loss)` runs after each epoch (progress, cancel);
    `after_step` after each optimiser step (e.g. re-applying pruning masks). With `keep_best` (a
    score on held-out data, higher is better), the weights of the best epoch, counting the state
    before training as epoch 0, are restored at the end; `outcome` receives the scores and the pick.
    With `augment` (distillation only: no labels), each epoch also trains on the inputs and targets it
    draws (workers.trainable.augment), at the batch size the data alone would get."""
    if augment is not None and labels is not None:
        raise ValueError("augmented inputs have no labels: augment only when distilling")
    best_score, best_state, best_epoch, scores = None, None, 0, []
    if keep_best is not None:
        best_score = keep_best()
        best_state = copy.deepcopy(module.state_dict())
        scores.append(best_score)
    generator = torch.Generator().manual_seed(config.seed)
    device = training_device()
    module.to(device)  # before the optimiser is built, so it holds the device's parameters
    optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad], config)
    label_tensor = torch.from_numpy(labels).long() if labels is not None else None
    fixed_batch = fixed_batch or module_fixed_batch(module)
    batch = fixed_batch or config.batch_for(len(inputs[0]))
    losses = []
    for epoch in range(config.epochs):
        epoch_inputs, epoch_teacher = inputs, teacher
        if augment is not None:
            extra_inputs, extra_teacher = augment(generator)
            epoch_inputs = [torch.cat([a, b]) for a, b in zip(inputs, extra_inputs)]
            epoch_teacher = concatenated(teacher, extra_teacher)
        mask = padding_mask(module, epoch_inputs)
        n = len(epoch_inputs[0])
        module.train()
        order = torch.randperm(n, generator=generator)
        if fixed_batch:
            order = padded_order(order, batch)
        total, count = 0.0, 0
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            if len(idx) < 2 and not fixed_batch:
                continue  # batch norm cannot train on one sample
            out = module(*(t[idx].to(device) for t in epoch_inputs))
            out = out[0] if isinstance(out, tuple) else out
            loss = _loss(out, label_tensor[idx].to(device) if label_tensor is not None else None, epoch_teacher[idx].to(device), kind,
                         None if mask is None else mask[idx].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if after_step:
                after_step()
            total += loss.item() * len(idx)
            count += len(idx)
        losses.append(total / max(1, count))
        module.to("cpu")  # callbacks (evaluation, cancellation) and exports expect the CPU module
        on_epoch(epoch, losses[-1])
        if keep_best is not None:
            score = keep_best()
            scores.append(score)
            if score > best_score:
                best_score, best_state, best_epoch = score, copy.deepcopy(module.state_dict()), epoch + 1
        module.to(device)
    module.to("cpu").eval()
    if best_state is not None:
        module.load_state_dict(best_state)
    if outcome is not None:
        outcome["batch_size"] = batch
        if keep_best is not None:
            outcome.update({"scores_by_epoch": scores, "kept_epoch": best_epoch})
    return losses
