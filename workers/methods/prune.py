"""prune: unstructured or structured pruning, one shot or in rounds of prune -> fine-tune, or the
lottery-ticket procedure; the result goes back out as ONNX (sparse weights packed, narrower layers
really narrower)."""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from service.core.errors import CompressionFailed
from service.core.specs import PruneStep
from workers import output_sensitivity, sparse_pack
from workers.evaluation import mask_input
from workers.fixed_batch import chunks, exactly
from workers.hessian import Batch, supported
from workers.steps import StepContext, StepData, StepResult
from workers.pruning import allocation, ffn, heads, initializers, refit, sparsegpt, structured, unstructured
from workers.pruning.layers import is_transformer, mlp_hidden_layers, selected_layers, weighted_layers
from workers.trainable.device import training_device
from workers.trainable.to_onnx import export, has_dynamic_batch
from workers.trainable.run import TrainableRun
from workers.trainable.verify import trainable
from workers.trainable.write_back import trained_onnx
from workers.trainable.training import FINETUNE_LR, finetune_epochs, predict, train, train_config

name = "prune"
SPEC = PruneStep
TAYLOR_BATCHES = 8
WANDA_BATCHES = 16  # calibration batches for the input-feature norms
CALIBRATION_SAMPLES = 512  # samples a layer's input Hessian is taken on (SparseGPT)
# Measuring each layer's sensitivity prunes it three times on the unchanged model: its Hessian on
# fewer samples than the pruning's own, the loss to the original's outputs on fewer still.
SENSITIVITY_HESSIAN_SAMPLES = 64
SENSITIVITY_SAMPLES = 32  # with 64 (and 128 for the Hessian) MiniLM got amounts as good (0.955 either way) in 82 s of measuring, not 50
# Samples a narrowed layer is refitted on: each layer costs a forward pass of the pruned and of the
# reference model up to it per batch, and a least-squares fit needs positions well over its inputs
# (a transformer: samples x tokens; a convolution: samples x pixels).
REFIT_SAMPLES = 256
DEFAULT_TRANSFORMER_IMPORTANCE = (
    "wanda (the unit's RMS at the layer that reads it x that layer's weights for it), the default for structured pruning of a "
    "transformer with data: on all-MiniLM-L6-v2 (30% of feed-forward units, least-squares refit, no fine-tuning) held-out cosine "
    "0.960 against 0.805 with l1 (bench/real_models.py, 2026-12-06); set `importance` to choose another")
DEFAULT_TRANSFORMER_UNSTRUCTURED_IMPORTANCE = (
    "sparsegpt (each layer's remaining weights updated to reproduce the original's output on the data), the default for unstructured "
    "pruning of a transformer with data: on all-MiniLM-L6-v2 at 50% held-out cosine 0.973 (each layer's sparsity measured, its fit "
    "weighed by the output's sensitivity, the mask chosen in 3 rounds, the kept weights and bias re-solved; bench/real_models.py, 2026-12-08) against 0.930 with wanda and "
    "0.891 with l1, both fine-tuned 2 epochs (2026-12-06), in about seven times wanda's time; set `importance` to choose another")


class _Run(TrainableRun):
    """The state one prune step works on (TrainableRun: the module, its data, the original's outputs as
    reference), plus the rounds' fine-tuning log."""

    def __init__(self, model: onnx.ModelProto, spec: PruneStep, data: StepData, ctx: StepContext) -> None:
        super().__init__(model, data)
        self.spec, self.ctx = spec, ctx
        self.has_data = data.available
        self.fixed_batch = data.fixed_batch
        self.dynamic_batch = has_dynamic_batch(model)
        self.baseline = self.quality()
        # Per round: the score after each fine-tuning epoch (index 0: just pruned) and the epoch kept.
        self.finetune_log: list[dict] = []
        self.epochs = finetune_epochs(spec.finetune_epochs, data.available)
        self.config = train_config(spec.training, self.epochs, FINETUNE_LR)

    def finetune(self, round_index: int, rounds: int, after_step=None) -> list[float]:  # type: ignore[override]
        if self.epochs == 0:
            return []

        def on_epoch(epoch: int, loss: float) -> None:
            fraction = (round_index + (epoch + 1) / self.epochs) / rounds
            self.ctx.progress(0.05 + 0.9 * fraction, f"round {round_index + 1}/{rounds}: fine-tuned epoch {epoch + 1}/{self.epochs}, loss {loss:.4f}", milestone=True)

        config = dataclasses.replace(self.config, seed=self.config.seed + round_index)
        # Keep the best epoch on the evaluation data (the pruned state counts): never worse than no fine-tuning.
        augment, augmented = self.augmentation(config, self.labels is not None)
        outcome: dict = {"augmented": augmented}
        losses = train(self.module, self.inputs, self.labels, self.teacher, config, on_epoch, after_step, self.fixed_batch,
                       keep_best=self.quality, outcome=outcome, kind=self.kind, augment=augment)
        self.finetune_log.append(outcome)
        return losses

    @torch.no_grad()
    def input_norms(self, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """Per layer, the L2 norm of each input feature (channel) over the data (Wanda's activation term)."""
        sums: dict[str, torch.Tensor] = {}

        def hook(name: str):
            def record(_module: nn.Module, args: tuple, _output: Any) -> None:
                x = args[0].detach().float()
                # Linear: features on the last axis; Conv: channels on axis 1.
                flat = x.reshape(-1, x.shape[-1]) if isinstance(_module, nn.Linear) else x.transpose(0, 1).reshape(x.shape[1], -1).T
                sums[name] = sums.get(name, 0) + (flat ** 2).sum(0)
            return record

        handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
        try:
            self.module.eval()
            for rows in self._batches(WANDA_BATCHES):
                self.module(*(t[rows] for t in self.inputs))
        finally:
            for handle in handles:
                handle.remove()
        return {name: total.sqrt() for name, total in sums.items()}

    def taylor_gradients(self) -> None:
        """Accumulate dLoss/dw over a few batches (for Taylor importance): cross-entropy against the
        labels, or against the original's own top class (at every position, for token logits). The
        loss towards the original's outputs would not do: at the original it is at its minimum, so
        its gradient is zero. Features (embeddings, hidden states) have no classes to take it against."""
        import torch.nn.functional as F

        if self.kind == "features":
            raise CompressionFailed("`importance: taylor` needs class or token scores to take gradients against; this model outputs "
                                    "features (an embedding or hidden states): use l1, l2 or wanda", code="importance_unsupported")
        self.module.zero_grad()
        self.module.train()
        for rows in self._batches(TAYLOR_BATCHES):
            out = self.module(*(t[rows] for t in self.inputs))
            if self.labels is not None and self.kind == "classifier":
                target = torch.from_numpy(self.labels[rows]).long()
            else:
                target = self.teacher[rows].argmax(-1)
            F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1)).backward()
        self.module.eval()

    def _batches(self, limit: int) -> list[np.ndarray]:
        """The first `limit` batches of the data, as row slices (the job's fixed batch size, if any)."""
        batch = self.fixed_batch or self.config.batch_size
        return [idx for idx, _ in chunks(len(self.inputs[0]), batch, self.fixed_batch is not None)][:limit]

    def exceeds_budget(self, value: float) -> bool:
        return self.spec.max_accuracy_drop is not None and self.baseline - value > self.spec.max_accuracy_drop + 1e-12


def _layer_table(before: dict[str, tuple], run: _Run, thresholds: dict[str, float] | None, errors: dict[str, dict[str, float]] | None = None) -> list[dict[str, Any]]:
    rows = []
    for layer_name, layer in weighted_layers(run.module).items():
        w = layer.weight.detach()
        row = {
            "layer": layer_name,
            "shape_before": list(before[layer_name]),
            "shape_after": list(w.shape),
            "sparsity": float((w == 0).float().mean()),
            "removed_fraction": 1.0 - w.numel() / float(np.prod(before[layer_name])),
        }
        if thresholds is not None:
            row["importance_threshold"] = thresholds.get(layer_name)
        row.update((errors or {}).get(layer_name, {}))
        rows.append(row)
    return rows


def _iterate(run: _Run, prune_round, after_step_for, snapshot) -> tuple[list[dict], tuple[Any, int], str | None]:
    """Rounds of prune -> fine-tune; returns the rounds, (snapshot of the last round within the
    accuracy budget, its number) and why it stopped early, if it did."""
    spec, rounds = run.spec, []
    best = None
    stopped = None
    for r in range(spec.iterations):
        run.ctx.progress(0.05 + 0.9 * r / spec.iterations, f"round {r + 1}/{spec.iterations}: pruning")
        achieved = prune_round(r)
        losses = run.finetune(r, spec.iterations, after_step_for())
        value = run.quality()
        rounds.append({"round": r + 1, **achieved, run.metric: value, "finetune_loss": losses})
        if run.exceeds_budget(value):
            stopped = f"round {r + 1} lost {run.baseline - value:.4f} {run.metric} (budget {spec.max_accuracy_drop}); kept round {r}"
            break
        best = snapshot(), r + 1
    if best is None:
        raise CompressionFailed(
            f"even the first pruning round lost more {run.metric} than max_accuracy_drop allows "
            f"({run.baseline:.4f} -> {rounds[0][run.metric]:.4f}); lower `amount`, raise `iterations` or fine-tune longer",
            code="accuracy_budget_exceeded",
        )
    return rounds, best, stopped


def _unstructured(run: _Run) -> dict[str, Any]:
    spec = run.spec
    layers = selected_layers(run.module, spec)
    state: dict[str, Any] = {"masks": None, "thresholds": {}, "errors": None, "allocation": None}
    # SparseGPT's layer errors are measured against the unpruned model's outputs: kept as it was before any round.
    reference = copy.deepcopy(run.module).eval() if spec.importance == "sparsegpt" else None
    amounts = {n: spec.layer_amounts.get(n, spec.amount) for n in layers}
    # SparseGPT's Hessians, taken on the same batches each time: the output sensitivity pairs its weights with them by index.
    hessian_batches = run.calibration_batches(CALIBRATION_SAMPLES) if reference is not None else []
    sensitivity = None
    if reference is not None and spec.output_weighted:
        sensitivity, state["output_sensitivity"] = _output_sensitivity(run, layers, hessian_batches)
    if reference is not None and spec.scope == "global":
        amounts, state["allocation"] = _allocated_amounts(run, layers, amounts, hessian_batches, sensitivity)

    def prune_round(r: int) -> dict[str, Any]:
        if reference is not None:
            masks, state["errors"] = _sparsegpt_round(run, layers, amounts, spec.round_fraction(r), reference, hessian_batches, sensitivity)
            state["masks"] = masks
            return {"sparsity": unstructured.sparsity(layers)}
        grads = norms = None
        if spec.importance == "taylor":
            run.taylor_gradients()
            grads = {n: layer.weight.grad.detach().clone() for n, layer in layers.items()}
        if spec.importance == "wanda":
            norms = run.input_norms(layers)
        scores = unstructured.scores(layers, spec.importance, grads, norms)
        masks, thresholds = unstructured.masks_for(layers, scores, spec, spec.round_fraction(r), state["masks"], per_row=spec.importance == "wanda")
        unstructured.apply_masks(layers, masks)
        state["masks"], state["thresholds"] = masks, thresholds
        return {"sparsity": unstructured.sparsity(layers)}

    def after_step():
        masks = state["masks"]
        return (lambda: unstructured.apply_masks(layers, masks)) if masks else None

    rounds, best, stopped = _iterate(run, prune_round, after_step, lambda: copy.deepcopy(run.module.state_dict()))
    run.module.load_state_dict(best[0])
    return {"rounds": rounds, "kept_round": best[1], "stopped": stopped, "thresholds": state["thresholds"], "achieved": unstructured.sparsity(layers),
            "errors": state["errors"], "allocation": state["allocation"], "output_sensitivity": state.get("output_sensitivity")}


def _output_sensitivity(run: _Run, layers: dict[str, nn.Module], batches: list[Batch]) -> tuple[dict[str, output_sensitivity.Sensitivity], dict[str, Any]]:
    """How much the model's output depends on each layer's positions and output channels
    (workers.output_sensitivity), on the unchanged model, and the report's `output_sensitivity`."""
    run.ctx.progress(0.01, "measuring how much the output depends on each layer's positions and channels")
    started = time.perf_counter()
    second_order = {n: layer for n, layer in layers.items() if supported(layer)}
    how = ("each layer's fit weighs its calibration positions and output channels by the model output's Gauss-Newton diagonal at the "
           f"layer's output ({output_sensitivity.OUTPUT_SPACE[run.kind]}), tempered")
    try:
        found = output_sensitivity.measure(run.module, second_order, batches, run.kind, seed=run.spec.training.seed)
    except RuntimeError as exc:
        # A graph op torch cannot differentiate: the fits go unweighted (the paper's), and the report says why.
        found, how = {}, f"not measured, every position fitted alike: the output could not be differentiated ({str(exc).splitlines()[0][:200]})"
    report = {"how": how,
              "probes": output_sensitivity.PROBES, "power": output_sensitivity.POWER, "seconds": round(time.perf_counter() - started, 1),
              "layers": [{"layer": n, "position_spread": s.spread(), "channel_spread": s.channel_spread()} for n, s in found.items()]}
    return found, report


def _allocated_amounts(run: _Run, layers: dict[str, nn.Module], amounts: dict[str, float], batches: list[Batch],
                       sensitivity: dict[str, output_sensitivity.Sensitivity] | None) -> tuple[dict[str, float], dict[str, Any] | None]:
    """scope global with SparseGPT: each layer's sparsity from its measured sensitivity, the step's
    amounts holding over the layers together (workers/pruning/allocation.py); layers named in
    layer_amounts keep theirs. Returns the amounts and the report's `allocation`. The Hessians are
    taken on the first of SparseGPT's `batches` that hold SENSITIVITY_HESSIAN_SAMPLES samples."""
    free = {n: layer for n, layer in layers.items() if supported(layer) and n not in run.spec.layer_amounts}
    if len(free) < 2:
        return amounts, None

    def progress(index: int, total: int, layer_name: str) -> None:
        run.ctx.progress(0.01 + 0.04 * index / total, f"measuring each layer's sensitivity: {index + 1}/{total} ({layer_name})")

    first = batches[:len(run.calibration_batches(SENSITIVITY_HESSIAN_SAMPLES))]
    curves = allocation.measure(run.module, free, amounts, lambda: first, run.distance_to_original(SENSITIVITY_SAMPLES), progress, sensitivity)
    chosen = allocation.allocate(curves, {n: layer.weight.numel() for n, layer in free.items()}, amounts)
    report = {"how": "each layer's sparsity from its measured sensitivity, the amount holding over the layers together (scope global)",
              "predicted_loss_uniform": round(allocation.predicted_loss(curves, amounts), 8),
              "predicted_loss_allocated": round(allocation.predicted_loss(curves, chosen), 8),
              "layers": [{"layer": n, "amount": chosen[n], "measured": {str(k): round(v, 8) for k, v in curves[n].items()}} for n in free]}
    return {**amounts, **chosen}, report


def _sparsegpt_round(run: _Run, layers: dict[str, nn.Module], targets: dict[str, float], fraction_of_target: float, reference: nn.Module,
                     hessian_batches: list[Batch], sensitivity: dict[str, output_sensitivity.Sensitivity] | None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    """One round of SparseGPT on the layers it supports (magnitude within each row on the others,
    e.g. depthwise convolutions): the masks that keep the result, and each layer's output errors."""
    spec = run.spec
    amounts = {n: unstructured.round_target(targets[n], fraction_of_target) for n in layers}
    second_order = {n: layer for n, layer in layers.items() if supported(layer)}
    others = {n: layer for n, layer in layers.items() if n not in second_order}
    if others:
        current = {n: (layer.weight != 0).float() for n, layer in others.items()}
        masks, _ = unstructured.masks_for(others, unstructured.scores(others, "l1", None), spec, fraction_of_target, current, per_row=True)
        unstructured.apply_masks(others, masks)

    def progress(index: int, total: int, name: str) -> None:
        run.ctx.progress(0.05 + 0.4 * index / max(1, total), f"SparseGPT: layer {index + 1}/{total} ({name})")

    errors = sparsegpt.prune_layers(run.module, second_order, amounts, lambda: hessian_batches, progress, reference, selected_layers(reference, spec),
                                    sensitivity, spec.mask_rounds)
    return {n: (layer.weight != 0).float() for n, layer in layers.items()}, errors


def _lottery(run: _Run) -> dict[str, Any]:
    spec = run.spec
    layers = selected_layers(run.module, spec)
    initial = copy.deepcopy(run.module.state_dict())
    masks, thresholds, rounds = None, {}, []
    for r in range(spec.iterations):
        current = masks
        losses = run.finetune(r, spec.iterations + 1, (lambda current=current: unstructured.apply_masks(layers, current)) if current else None)
        value = run.quality()
        rounds.append({"round": r + 1, "sparsity": unstructured.sparsity(layers), run.metric: value, "finetune_loss": losses})
        masks, thresholds = unstructured.masks_for(layers, unstructured.scores(layers, "l1", None), spec, (r + 1) / spec.iterations, masks)
        trained = {name: value.detach().clone() for name, value in run.module.state_dict().items()}
        run.module.load_state_dict(initial)  # rewind the survivors to the uploaded weights
        unstructured.apply_masks(layers, masks)
        # What the rewind did, in the report: how far fine-tuning had moved the weights, and how far the
        # survivors are from the uploaded ones now (0: rewound).
        rewound = run.module.state_dict()
        rounds[-1]["trained_max_change"] = max(float((trained[n] - initial[n]).abs().max()) for n in initial if initial[n].is_floating_point())
        rounds[-1]["rewound_max_distance"] = max(float(((rewound[n] - initial[n]) * (rewound[n] != 0)).abs().max())
                                                 for n in initial if initial[n].is_floating_point())
    final_masks = masks
    losses = run.finetune(spec.iterations, spec.iterations + 1, lambda: unstructured.apply_masks(layers, final_masks))
    value = run.quality()
    rounds.append({"round": "ticket", "sparsity": unstructured.sparsity(layers), run.metric: value, "finetune_loss": losses})
    stopped = None if not run.exceeds_budget(value) else f"the retrained ticket lost {run.baseline - value:.4f} {run.metric}, over the budget"
    return {"rounds": rounds, "kept_round": "ticket", "stopped": stopped, "thresholds": thresholds, "achieved": unstructured.sparsity(layers)}


def _finetune_only(run: _Run, params_original: int) -> dict[str, Any]:
    """The graph was narrowed already (heads with `amount: 0`, or feed-forward units on the graph):
    rounds of fine-tuning only."""
    params = sum(p.numel() for p in run.module.parameters())
    rounds, best, stopped = _iterate(run, lambda r: {"parameters": params}, lambda: None, lambda: copy.deepcopy(run.module))
    run.module = best[0]
    return {"rounds": rounds, "kept_round": best[1], "stopped": stopped, "thresholds": {}, "achieved": 1.0 - params / params_original}


def _needs_graph_ffn(run: _Run) -> bool:
    """A transformer whose feed-forward blocks the converted module cannot narrow (GPT-2's Conv1D
    reshapes): they are narrowed on the graph (workers.pruning.ffn)."""
    return run.spec.kind == "structured" and run.spec.amount > 0 and is_transformer(run.module) and not mlp_hidden_layers(run.module)


def _structured(run: _Run) -> dict[str, Any]:
    spec = run.spec
    all_layers = weighted_layers(run.module)
    selected = selected_layers(run.module, spec)
    if is_transformer(run.module):
        # Narrowing a layer that feeds attention heads or the residual stream would need every
        # reshape into heads rewritten; a feed-forward block's hidden units touch only its two linears.
        hidden = {run.module.layer_names[k] for k in mlp_hidden_layers(run.module)}
        selected = {name: layer for name, layer in selected.items() if name in hidden}
        if not selected:
            raise CompressionFailed(
                "structured pruning of this transformer found no feed-forward block whose hidden units can be removed alone "
                "(for example, GPT-2's Conv1D reshapes around its MLP); use unstructured pruning, cluster or quantize",
                code="structured_pruning_unsupported",
            )
    example = tuple(t[:2] for t in run.inputs) if not run.fixed_batch else tuple(exactly(t, run.fixed_batch) for t in run.inputs)
    try:
        pruner, importance = structured.make_pruner(run.module, example, spec, selected, all_layers)
    except Exception as exc:
        raise CompressionFailed(f"torch-pruning could not build the layer dependency graph: {str(exc).splitlines()[0][:300]}", code="structured_pruning_failed") from exc
    params_before = sum(p.numel() for p in run.module.parameters())
    thresholds: dict[str, float] = {}
    refitting = refit_wanted(spec, run.epochs, is_transformer(run.module)) and run.data.available
    refits: list[dict[str, Any]] = []

    def prune_round(r: int) -> dict[str, Any]:
        if spec.importance == "taylor":
            run.taylor_gradients()
        if spec.importance in ("apoz", "wanda"):
            with importance.measure(run.module):
                predict(run.module, [t[:2048] for t in run.inputs], top_k=1)  # only the activations matter
        # Score every channel group before the step; after it, a layer's threshold is the score of
        # the most important channel that was still removed (its k-th smallest, k = channels removed).
        raw = copy.copy(importance)
        raw.normalizer = None
        owners = {id(layer): layer_name for layer_name, layer in all_layers.items()}
        scores: dict[str, torch.Tensor] = {}
        for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
            owner = owners.get(id(group[0][0].target.module))
            value = raw(group) if owner is not None else None
            if value is not None:
                scores[owner] = value.detach().flatten()
        widths = {n: all_layers[n].weight.shape[0] for n in scores}
        inputs_before = refit.input_widths(all_layers)
        reference = copy.deepcopy(run.module) if refitting else None  # what the narrowed layers' outputs are fitted to
        removed_outputs = _step_recording_outputs(pruner, all_layers)
        if reference is not None:
            _refit_round(run, reference, refit.narrowed(inputs_before, all_layers), removed_outputs, r, refits)
            del reference
        for layer_name, value in scores.items():
            removed = widths[layer_name] - all_layers[layer_name].weight.shape[0]
            if removed > 0:
                thresholds[layer_name] = float(torch.sort(value).values[removed - 1])
        return {"parameters": sum(p.numel() for p in run.module.parameters()), "parameters_removed": 1 - sum(p.numel() for p in run.module.parameters()) / params_before}

    # Structured rounds change shapes, so the best model is kept as a whole module, not a state dict.
    rounds, best, stopped = _iterate(run, prune_round, lambda: None, lambda: copy.deepcopy(run.module))
    run.module = best[0]
    return {"rounds": rounds, "kept_round": best[1], "stopped": stopped, "thresholds": thresholds,
            "achieved": 1 - sum(p.numel() for p in run.module.parameters()) / params_before, "refit": refits if refitting else None}


def refit_wanted(spec: PruneStep, epochs: int, transformer: bool) -> bool:
    """The spec's `refit`, else on when nothing is fine-tuned after pruning, or on a transformer ranked by
    wanda (its default), and off otherwise. Measured (bench/real_models.py, bench/prune_refit_cnn.py,
    2026-12-06): one-shot, the refit is most of the quality (residual CNN on MNIST at half its channels
    67.2% -> 96.0%; MiniLM, 30% of its feed-forward units, cosine 0.769 -> 0.805 by l1, 0.960 by wanda);
    fine-tuned for the default 2 epochs, MiniLM by wanda with 25% of its heads 0.928 -> 0.938 with it,
    while by l1 (0.884 -> 0.859) and the CNN (97.41% -> 97.17%) ended lower from the refitted weights."""
    if spec.refit is not None:
        return spec.refit
    return epochs == 0 or (transformer and spec.importance == "wanda")


def _step_recording_outputs(pruner: Any, layers: dict[str, nn.Module]) -> dict[str, list[int]]:
    """torch-pruning's step, group by group: which output channels of each layer it removed (a layer
    narrowed on both sides is refitted to its kept outputs only)."""
    names = {id(layer): name for name, layer in layers.items()}
    removed: dict[str, list[int]] = {}
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            name = names.get(id(dep.target.module))
            if name is not None and getattr(dep.handler, "__name__", "") == "prune_out_channels":
                removed.setdefault(name, []).extend(int(i) for i in idxs)
        group.prune()
    return removed


def _refit_round(run: _Run, reference: nn.Module, narrowed: dict[str, nn.Module], removed_outputs: dict[str, list[int]], round_index: int,
                 rows: list[dict[str, Any]]) -> None:
    """The layers whose inputs lost channels this round, refitted to their outputs before it (workers.pruning.refit)."""
    def progress(index: int, total: int, name: str) -> None:
        run.ctx.progress(0.05, f"refitting layer {index + 1}/{total} ({name}) to its output before pruning")

    found = refit.refit(reference, weighted_layers(reference), run.module, narrowed, lambda: run.calibration_batches(REFIT_SAMPLES),
                        removed_outputs, progress)
    rows += [{"round": round_index + 1, **row} for row in found]


NO_CONVERSION = "nothing is trained, so the ONNX weights were pruned where they are stored (no conversion to torch; the graph is otherwise the one uploaded)"


def _prune_initializers(model: onnx.ModelProto, spec: PruneStep, ctx: StepContext) -> StepResult:
    """Nothing to train: prune the ONNX weights directly (any graph ONNX Runtime runs)."""
    ctx.progress(0.5, "pruning the ONNX weights directly (nothing to train, no conversion needed)")
    pruned, rows, achieved = initializers.prune(model, spec)
    if not rows:
        raise CompressionFailed("no MatMul/Gemm/Conv weight to prune in this graph", code="nothing_to_prune")
    result, packing = sparse_pack.pack(pruned)
    return StepResult(model=result, report={
        "kind": spec.kind, "path": "onnx_initializers", "why_no_conversion": NO_CONVERSION,
        "importance": "magnitude", "scope": spec.scope, "target_amount": spec.amount, "achieved": achieved, "target_reached": True,
        "stopped": None, "layers": rows, "storage": packing, "finetune_epochs": 0,
    })


def _head_feeds(run: _Run, samples: int = 32) -> dict[str, np.ndarray]:
    """The data heads are ranked on: the step's own inputs (synthetic ones when the job has none)."""
    return {name: (exactly(t, run.fixed_batch) if run.fixed_batch else t[:samples]).numpy() for name, t in zip(run.module.input_names, run.inputs)}


def _prune_heads(run: _Run, model: onnx.ModelProto, data: StepData) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Attention heads removed on the graph (workers.pruning.heads), each output projection refitted when
    the refit applies; the run's module becomes the narrowed graph's."""
    run.ctx.progress(0.01, "measuring each attention head's importance")
    refit_on = None
    if refit_wanted(run.spec, run.epochs, True) and data.available:
        feeds = _head_feeds(run, REFIT_SAMPLES)
        mask = mask_input(data)
        refit_on = (feeds, feeds[mask] if mask in feeds else None)
    graph, report = heads.prune_heads(model, run.spec.heads, _head_feeds(run), run.ctx.threads, refit_on)
    run.module = trainable(graph, data)
    return graph, report


def _reconstruction_notes(outcome: dict[str, Any], importance_note: str | None) -> dict[str, Any]:
    """What the step did to make up for what it removed: SparseGPT's errors, the refit, the ranking chosen."""
    notes: dict[str, Any] = {}
    if outcome.get("errors"):
        errors = outcome["errors"].values()
        notes["reconstruction"] = {label: round(sum(e[key] for e in errors) / len(errors), 6)
                                   for label, key in (("masked", "output_error_masked"), ("sparsegpt", "output_error_sparsegpt"), ("updated", "output_error"))}
    if outcome.get("allocation") is not None:
        notes["allocation"] = outcome["allocation"]
    if outcome.get("output_sensitivity") is not None:
        notes["output_sensitivity"] = outcome["output_sensitivity"]
    if outcome.get("refit") is not None:
        notes["refit"] = outcome["refit"]
    if importance_note is not None:
        notes["importance_chosen"] = importance_note
    return notes


def _default_importance(run: _Run, spec: PruneStep, data: StepData) -> tuple[PruneStep, str | None]:
    """The importance a step that left it out gets, and the note that says why (None for l1, the
    default everywhere the data has not shown better): on a transformer with data, wanda for
    structured pruning and SparseGPT for unstructured."""
    transformer = data.available and is_transformer(run.module)
    if transformer and spec.kind == "structured":
        return spec.model_copy(update={"importance": "wanda"}), DEFAULT_TRANSFORMER_IMPORTANCE
    if transformer and spec.kind == "unstructured" and not spec.lottery_ticket:
        return spec.model_copy(update={"importance": "sparsegpt"}), DEFAULT_TRANSFORMER_UNSTRUCTURED_IMPORTANCE
    return spec.model_copy(update={"importance": "l1"}), None


def apply(model: onnx.ModelProto, spec: PruneStep, data: StepData, ctx: StepContext) -> StepResult:
    needs_data = spec.needs_dataset()
    if needs_data and not data.available:
        raise CompressionFailed("this prune step fine-tunes or measures importance on data: submit the job with a dataset_id", code="dataset_required")
    trains = spec.lottery_ticket or spec.kind != "unstructured" or needs_data or finetune_epochs(spec.finetune_epochs, data.available) > 0
    if not trains:
        return _prune_initializers(model, spec, ctx)
    ctx.progress(0.0, "converting the model to a trainable form")
    run = _Run(model, spec, data, ctx)  # built on the original: its outputs are the reference
    importance_note = None
    if spec.importance is None:  # left to its default: chosen here, where the model is known
        spec, importance_note = _default_importance(run, spec, data)
        run.spec = spec
    before = {n: tuple(layer.weight.shape) for n, layer in weighted_layers(run.module).items()}
    params_original = sum(p.numel() for p in run.module.parameters())
    graph, head_report = _prune_heads(run, model, data) if spec.heads else (model, None)
    ffn_report = None
    if _needs_graph_ffn(run):
        ctx.progress(0.02, "narrowing the feed-forward blocks in the graph")
        graph, ffn_report = ffn.prune_ffn(graph, spec, _head_feeds(run), ctx.threads)
        run.module = trainable(graph, data)
    torch.manual_seed(spec.training.seed)
    if spec.kind == "structured" and (spec.amount == 0 or ffn_report is not None):
        outcome = _finetune_only(run, params_original)
    elif spec.lottery_ticket:
        outcome = _lottery(run)
    elif spec.kind == "unstructured":
        outcome = _unstructured(run)
    else:
        outcome = _structured(run)
    ctx.progress(0.97, "exporting to ONNX")
    example = tuple(t[:2] for t in run.inputs) if not run.fixed_batch else tuple(exactly(t, run.fixed_batch) for t in run.inputs)
    result = trained_onnx(graph, run.module, example, lambda: export(run.module, example, run.module.input_names, run.module.output_names, run.dynamic_batch))
    packing: dict[str, Any] = {"packed_tensors": []}
    if spec.kind == "unstructured":
        result, packing = sparse_pack.pack(result)
    final = run.quality()
    target_reached = outcome["stopped"] is None
    report = {
        "kind": spec.kind,
        "device": str(training_device()),
        "lottery_ticket": spec.lottery_ticket,
        "importance": spec.importance,
        "scope": spec.scope,
        "target_amount": spec.amount,
        "achieved": outcome["achieved"],
        "target_reached": target_reached,
        "stopped": outcome["stopped"],
        "quality_metric": run.metric,
        "output_kind": run.kind,
        "evaluated_on": run.evaluated_on,
        "baseline": run.baseline,
        "final": final,
        "rounds": outcome["rounds"],
        "kept_round": outcome["kept_round"],
        "layers": _layer_table(before, run, outcome["thresholds"], outcome.get("errors")),
        "storage": packing,
        "finetune_epochs": run.epochs,
        "finetune_lr": run.config.lr,
        "finetune_by_round": run.finetune_log,
    }
    report.update(_reconstruction_notes(outcome, importance_note))
    if ffn_report is not None:
        report["ffn"] = ffn_report
    if head_report is not None:
        report["heads"] = head_report
        report["achieved"] = 1 - sum(p.numel() for p in run.module.parameters()) / params_original  # heads and units together
    return StepResult(model=result, report=report)
