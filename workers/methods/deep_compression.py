"""deep_compression: the recipe of Han, Mao & Dally (ICLR 2016) as one step: prune with fine-tuning
-> cluster with centroid fine-tuning -> Huffman coding, with a size and accuracy table per stage
next to the paper's LeNet numbers."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch

from service.core.errors import CompressionFailed
from service.core.methods.deep_compression import AUTO_FEWER_BITS, AUTO_GROUP_SIZE, AUTO_SCHEDULE, DEFAULT_QUALITY_DROP, PRUNE_SHARE
from service.core.specs import DeepCompressionStep, HuffmanStep
from workers.output_kind import model_output_kind
from workers.trainable.run import metric_for
from workers.trainable.training import quality
from workers.methods import cluster, huffman, prune
from workers.steps import StepContext, StepData, StepResult

name = "deep_compression"
SPEC = DeepCompressionStep
# Han et al., Table 1 (fp32 reference -> compressed, top-1 error).
PAPER = {
    "LeNet-300-100": {"original_kb": 1070, "compressed_kb": 27, "ratio": 40, "error_before": 1.64, "error_after": 1.58},
    "LeNet-5": {"original_kb": 1720, "compressed_kb": 44, "ratio": 39, "error_before": 0.80, "error_after": 0.74},
}


def _outputs(model: onnx.ModelProto, held_out: StepData) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return held_out.outputs(lambda feed: session.run(None, {n: feed[n] for n in names})[0], 512)


def _accuracy(model: onnx.ModelProto, held_out: StepData) -> float | None:
    if held_out.labels is None:
        return None
    return float((_outputs(model, held_out).argmax(-1) == held_out.labels).mean())


class _Budget:
    """The default pruning stage's yardstick: the quality measure the methods report for this model's
    outputs (workers.trainable.run.metric_for), the original's outputs on the held-out data, and the
    budget of max_quality_drop (given, or the measure's default)."""

    def __init__(self, model: onnx.ModelProto, spec: DeepCompressionStep, held_out: StepData) -> None:
        self.held_out = held_out
        self.reference = _outputs(model, held_out)
        self.kind = model_output_kind(model, self.reference[:4], held_out.labels is not None)
        self.metric = metric_for(self.kind, held_out.labels is not None)
        self.total = spec.max_quality_drop if spec.max_quality_drop is not None else DEFAULT_QUALITY_DROP[self.metric]
        self.for_pruning = self.total * PRUNE_SHARE
        self.quality_of_original = self.quality(model)

    def quality(self, model: onnx.ModelProto) -> float:
        # Scored as the methods score (training.quality), on every held-out sample.
        return quality(torch.from_numpy(_outputs(model, self.held_out)), self.held_out.labels, torch.from_numpy(self.reference), self.kind)

    def chosen(self, pruned: dict[str, Any], final: float) -> dict[str, Any]:
        baseline = self.quality_of_original
        tried = [{"sparsity": r.get("sparsity"), self.metric: r.get(pruned["quality_metric"])} for r in pruned["rounds"]]
        kept = pruned["achieved"]
        why = (pruned["stopped"] if pruned["stopped"] else
               f"every sparsity of the schedule stayed within {self.for_pruning:.4g} {self.metric}; the last, {kept:.0%}, is kept")
        return {"quality_metric": self.metric, "max_quality_drop": self.total, "pruning_budget": self.for_pruning,
                "max_quality_drop_default": DEFAULT_QUALITY_DROP[self.metric], "tried": tried, "sparsity": kept, "why": why,
                "original": baseline, "final": final, "within_budget": baseline - final <= self.total + 1e-12}


def _prune_stage(model: onnx.ModelProto, spec: DeepCompressionStep, data: StepData, ctx: StepContext, budget: _Budget | None) -> StepResult:
    sub = _sub_context(ctx, 0.0, 0.6, "prune")
    if budget is None:
        return prune.apply(model, spec.prune, data, sub)  # type: ignore[arg-type]
    try:
        return prune.apply(model, spec.auto_prune(budget.for_pruning), data, sub)
    except CompressionFailed as exc:
        if exc.code != "accuracy_budget_exceeded":
            raise
        # Not even the schedule's first sparsity fits the budget: the clusters and the code go on alone.
        why = (f"not even the first sparsity of the schedule, {AUTO_SCHEDULE[0]:.0%}, kept {budget.metric} within {budget.for_pruning:.4g} "
               f"after fine-tuning ({exc.message.split('(')[-1].split(')')[0]}): nothing is pruned")
        return StepResult(model=model, report={"achieved": 0.0, "quality_metric": budget.metric, "rounds": [], "stopped": why})


def _cluster_stage(model: onnx.ModelProto, spec: DeepCompressionStep, data: StepData, ctx: StepContext,
                   budget: _Budget | None) -> tuple[StepResult, dict[str, Any] | None]:
    """The clusters as given; with the default stages, a codebook per layer first and, when that ends
    beyond the budget, a codebook per AUTO_GROUP_SIZE rows of each unpruned layer (rows of transformer
    weights differ in scale: MiniLM at 4 bits 0.960 -> 0.975), keeping the one within the budget or
    else the more faithful. When one is within the budget and each layer's bits were measured, the same
    is tried at AUTO_FEWER_BITS fewer bits a weight on average, then fewer again, down to one bit
    fewer, while each stays within the budget and is smaller (one of the same size passes on down), then
    once halfway between the last that fit and the first that did not (the fewest bits the data
    supports). Each layer's cost is measured once per codebook layout and reused by every rung; a rung
    whose allocation is the kept one's is not clustered again (cluster.planned_bits)."""
    stage = spec.clusters()
    measured: dict = {}  # each layer's cost at the stage's bits, measured once per codebook layout for every rung below
    per_layer = cluster.apply(model, stage, data, _sub_context(ctx, 0.6, 0.75 if budget else 0.95, "cluster"), measured)
    if budget is None or spec.cluster is not None:
        return per_layer, None
    tried = [{"group_size": None, "average_bits": None, "quality": budget.quality(per_layer.model), "size_bytes": per_layer.model.ByteSize()}]
    results = [per_layer]

    def within(i: int) -> bool:
        return budget.quality_of_original - tried[i]["quality"] <= budget.total + 1e-12

    if not within(0):
        grouped = cluster.apply(model, stage.model_copy(update={"group_size": AUTO_GROUP_SIZE}), data,
                                _sub_context(ctx, 0.75, 0.85, f"cluster, a codebook per {AUTO_GROUP_SIZE} rows"), measured)
        tried.append({"group_size": AUTO_GROUP_SIZE, "average_bits": None, "quality": budget.quality(grouped.model), "size_bytes": grouped.model.ByteSize()})
        results.append(grouped)
    fits = [i for i in range(len(tried)) if within(i)]
    kept = fits[0] if fits else max(range(len(tried)), key=lambda i: tried[i]["quality"])
    # Fewer bits a weight on average, a step at a time down to the allocation's floor (bits - 1), while
    # each stays within the budget and makes the file smaller (a rung of the same size passes on down);
    # after the first that does not, the step is halved once between it and the last tried that fit
    # (the fewest bits the data supports, to an eighth).
    average, step, failed = float(stage.bits), AUTO_FEWER_BITS, None
    while fits and results[kept].report.get("bit_allocation") and step >= AUTO_FEWER_BITS / 2:
        candidate = average - step
        if candidate < stage.bits - 1 or (failed is not None and candidate <= failed):
            step /= 2
            continue
        rung = stage.model_copy(update={"group_size": tried[kept]["group_size"], "average_bits": candidate})
        if cluster.planned_bits(measured, rung) == _bits_of(results[kept]):
            # The measured costs choose the same bits a layer as the kept rung: the same model, not clustered
            # and fine-tuned again (2 of LeNet-5's 5 rungs).
            tried.append({**tried[kept], "average_bits": candidate, "same_bits_as": tried[kept]["average_bits"] or float(stage.bits)})
            results.append(results[kept])
        else:
            fewer = cluster.apply(model, rung, data, _sub_context(ctx, 0.85, 0.95, f"cluster, {candidate:g} bits a weight on average"), measured)
            tried.append({"group_size": tried[kept]["group_size"], "average_bits": candidate, "quality": budget.quality(fewer.model),
                          "size_bytes": fewer.model.ByteSize()})
            results.append(fewer)
        fit = within(len(tried) - 1)
        if fit and tried[-1]["size_bytes"] < tried[kept]["size_bytes"]:
            kept, average = len(tried) - 1, candidate
        elif fit and tried[-1]["size_bytes"] == tried[kept]["size_bytes"]:
            # The allocation chose the same bits as at the last kept (a model of few layers cannot spend a
            # quarter bit): not a failure, the next rung down may still fit (LeNet-300-100 stopped at 3.75).
            average = candidate
        else:
            failed, step = candidate, step / 2
    return results[kept], {"tried": tried, "kept": tried[kept]}


def _bits_of(result: StepResult) -> dict[str, int]:
    """The bits per layer a cluster step's measured allocation chose (its report's `bit_allocation`)."""
    return {row["layer"]: row["bits"] for row in result.report["bit_allocation"]["layers"]}


def _sub_context(ctx: StepContext, start: float, end: float, stage: str) -> StepContext:
    def report(fraction: float, message: str, milestone: bool = False) -> None:
        ctx.progress(start + (end - start) * fraction, f"{stage}: {message}", milestone)

    return StepContext(work_dir=ctx.work_dir, report_progress=report, seed=ctx.seed, load_model=ctx.load_model)


def apply(model: onnx.ModelProto, spec: DeepCompressionStep, data: StepData, ctx: StepContext) -> StepResult:
    held_out = data.evaluation or data
    original_bytes = len(model.SerializeToString())
    stages: list[dict[str, Any]] = []

    def record(stage: str, size: int, current: onnx.ModelProto, details: dict[str, Any]) -> None:
        stages.append({"stage": stage, "size_bytes": size, "ratio": original_bytes / size, "accuracy": _accuracy(current, held_out), **details})

    record("original (fp32 ONNX)", original_bytes, model, {})
    budget = _Budget(model, spec, held_out) if spec.prune is None else None
    pruned = _prune_stage(model, spec, data, ctx, budget)
    record("pruned", len(pruned.model.SerializeToString()), pruned.model, {"sparsity": pruned.report["achieved"]})
    clustered, cluster_choice = _cluster_stage(pruned.model, spec, data, ctx, budget)
    record("clustered", len(clustered.model.SerializeToString()), clustered.model, {"bits": spec.clusters().bits})
    bundle = None
    if spec.huffman:
        coded = huffman.apply(clustered.model, HuffmanStep(), data, _sub_context(ctx, 0.95, 1.0, "huffman"))
        bundle = coded.bundle
        record("huffman", len(bundle), clustered.model, {})
    report = {
        "stages": stages,
        "paper": PAPER,
        "prune": pruned.report,
        "cluster": clustered.report,
        "labels_for_accuracy": held_out.labels is not None,
    }
    warnings = []
    if budget is not None:
        chosen = report["chosen"] = budget.chosen(pruned.report, cluster_choice["kept"]["quality"] if cluster_choice else budget.quality(clustered.model))
        chosen["clusters"] = cluster_choice
        if not chosen["within_budget"]:
            warnings.append(f"deep_compression lost {chosen['original'] - chosen['final']:.4f} {budget.metric} on the evaluation data "
                            f"({chosen['original']:.4f} -> {chosen['final']:.4f}), beyond max_quality_drop {budget.total:.4g}: the pruning "
                            f"stage kept {chosen['sparsity']:.0%} within half of it and the {spec.clusters().bits}-bit clusters lost the rest; "
                            "raise the cluster's `bits`, or give `prune` a lower amount")
    report["warnings"] = warnings
    return StepResult(model=clustered.model, report=report, bundle=bundle)
