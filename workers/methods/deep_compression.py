"""deep_compression: the recipe of Han, Mao & Dally (ICLR 2016) as one step: prune with fine-tuning
-> cluster with centroid fine-tuning -> Huffman coding, with a size and accuracy table per stage
next to the paper's LeNet numbers."""

from __future__ import annotations

from typing import Any

import onnx

from service.core.specs import DeepCompressionStep, HuffmanStep
from workers.methods import cluster, huffman, prune
from workers.steps import StepContext, StepData, StepResult

name = "deep_compression"
SPEC = DeepCompressionStep
# Han et al., Table 1 (fp32 reference -> compressed, top-1 error).
PAPER = {
    "LeNet-300-100": {"original_kb": 1070, "compressed_kb": 27, "ratio": 40, "error_before": 1.64, "error_after": 1.58},
    "LeNet-5": {"original_kb": 1720, "compressed_kb": 44, "ratio": 39, "error_before": 0.80, "error_after": 0.74},
}


def _accuracy(model: onnx.ModelProto, held_out: StepData) -> float | None:
    import onnxruntime as ort

    if held_out.labels is None:
        return None
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outs = held_out.outputs(lambda feed: session.run(None, {n: feed[n] for n in names})[0], 512)
    return float((outs.argmax(-1) == held_out.labels).mean())


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
    pruned = prune.apply(model, spec.prune, data, _sub_context(ctx, 0.0, 0.6, "prune"))
    record("pruned", len(pruned.model.SerializeToString()), pruned.model, {"sparsity": pruned.report["achieved"]})
    clustered = cluster.apply(pruned.model, spec.cluster, data, _sub_context(ctx, 0.6, 0.95, "cluster"))
    record("clustered", len(clustered.model.SerializeToString()), clustered.model, {"bits": spec.cluster.bits})
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
    return StepResult(model=clustered.model, report=report, bundle=bundle)
