"""quantize: candidates built with ONNX Runtime's quantizers, each measured against the original on
held-out data, the best by the step's objective kept among those meeting its quality target.

    plan (workers.quantization.candidates) -> build (int8 / int4 / fp16 modules here) ->
    measure (workers.quantization.measure) -> choose (selection), repairing a promising miss by
    leaving its most sensitive layers in float (mixed_precision) -> report every candidate.

binary is a training method (straight-through fine-tuning) and is not measured this way.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from service.core.errors import CompressionFailed, JobFailure
from service.core.specs import QuantizeStep
from workers import model_files
from workers.memory import release_freed_memory
from workers.methods import quantize_lowbit
from workers.steps import StepContext, StepData, StepResult
from workers.data import graph_inputs, synthetic_data, token_vocabularies
from workers.quantization import error_feedback, fusion, int4, int8, mixed_precision, selection, smoothing
from workers.quantization.candidates import Candidate, plan
from workers.quantization.measure import MIN_COMPRESSION, Measured, Reference

name = "quantize"
SPEC = QuantizeStep
MIN_HOLDOUT = 8  # samples measured on, and at least as many left to calibrate on, before a dataset is split
SYNTHETIC_SAMPLES = 32
WEIGHTED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", "Attention", "LSTM", "GRU")


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def _subset(data: StepData, start: int, stop: int) -> StepData:
    return StepData(inputs={k: v[start:stop] for k, v in data.inputs.items()},
                    labels=None if data.labels is None else data.labels[start:stop], fixed_batch=data.fixed_batch)


def _split(model: onnx.ModelProto, data: StepData) -> tuple[StepData, StepData, str]:
    """(calibration data, measurement data, what the measurement data is)."""
    if data.evaluation is not None and data.evaluation.available:
        return data, data.evaluation, "the job's evaluation dataset"
    if data.available:
        n = data.samples
        hold = max(MIN_HOLDOUT, n // 4)
        if n - hold >= MIN_HOLDOUT:
            return _subset(data, 0, n - hold), _subset(data, n - hold, n), f"held out: the dataset's last {hold} of {n} samples (calibration used the rest)"
        return data, data, f"the dataset's {n} samples (too few to hold some out: calibration used the same samples)"
    if data.probe is not None and data.probe.available:
        return data, data.probe, data.probe.description or "synthetic inputs"

    probe, description = synthetic_data(graph_inputs(model), SYNTHETIC_SAMPLES, seed=0, vocab=token_vocabularies(model))
    return data, probe, description


def _to_fp16(source: Path, spec: QuantizeStep) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    # By path: the converter then infers shapes with onnx's path-based inference, which works on
    # models over 2 GB (the in-memory one serializes the model whole).
    converted = convert_float_to_float16(
        str(source), keep_io_types=spec.keep_io_types, op_block_list=spec.exclude_op_types or None, node_block_list=spec.exclude_nodes or None,
    )
    # The converter appends its input/output Casts at the end of the node list; ONNX Runtime runs
    # that, but onnx.checker (and other runtimes) require topological order.
    wrapper = OnnxModel(converted)
    wrapper.topological_sort()
    return wrapper.model


def _without_initializer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model less the value_info entries that restate an initializer's shape. torch's dynamo
    exporter writes them; ONNX Runtime's quantizer (1.30 and older) transposes a Gemm's weight under
    its own name and keeps the stale entry, and the quantized model then fails to load ("Inferred
    shape and existing shape differ"): every int8 candidate of a dynamo-exported CNN or ViT failed
    under torch 2.11 + ORT 1.30. An initializer states its own shape, so nothing is lost."""
    initializers = {t.name for t in model.graph.initializer}
    if not any(v.name in initializers for v in model.graph.value_info):
        return model
    kept = [v for v in model.graph.value_info if v.name not in initializers]
    clean = onnx.ModelProto()
    clean.CopyFrom(model)
    del clean.graph.value_info[:]
    clean.graph.value_info.extend(kept)
    return clean


class Builder:
    """Builds candidates, sharing what they have in common: one fused graph, one pre-processed (and
    smoothed) graph, one calibration per (graph, method, operator set)."""

    def __init__(self, model: onnx.ModelProto, spec: QuantizeStep, calibration: StepData, ctx: StepContext, kinds: tuple[str, ...]) -> None:
        self.model, self.spec, self.data, self.ctx, self.kinds = model, spec, calibration, ctx, kinds
        self.work = ctx.work_dir
        self.source = self.work / "source.onnx"
        model_files.save_to(_without_initializer_shapes(model), self.source)
        self._fused: Path | None = None
        self.fusions: dict[str, int] | None = None
        self._prepared: dict[bool, Path] = {}
        self._caches: dict[tuple, Path] = {}
        self.calibration_samples = 0
        self.smoothed_activations = 0
        self.smooth_nodes: list[str] = []
        self._smoothed: Path | None = None
        self.alphas: float | dict[str, float] | None = None
        self.count = 0
        self._statistics: dict[Path, error_feedback.Statistics] = {}
        self.progress: Any = lambda fraction, message: None  # the candidate being built reports (and honours cancel) through it

    def fused(self) -> Path | None:
        if self._fused is None and self.fusions is None and self.kinds:
            out = self.work / "fused.onnx"
            self.fusions = fusion.fuse(self.source, out, self.kinds) or {}
            self._fused = out if self.fusions else None
        return self._fused

    def graph(self, candidate: Candidate) -> Path:
        if candidate.fused:
            fused = self.fused()
            if fused is None:
                raise CompressionFailed("ONNX Runtime's transformer optimizer fused nothing in this graph", code="nothing_to_fuse")
            return fused
        if candidate.family == "int8_static":
            return self.prepared(candidate.smooth)
        return self.smoothed() if candidate.smooth else self.source

    def ops(self, candidate: Candidate) -> list[str]:
        from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry

        registry = QDQRegistry if candidate.family == "int8_static" else IntegerOpsRegistry
        return int8.op_types(registry, candidate.ops, self.spec.op_types if candidate.ops == "custom" else None, self.spec.exclude_op_types)

    def smoothed(self) -> Path:
        """The source graph after SmoothQuant, with each activation's alpha chosen on the calibration
        data unless the step fixes one (computed once, for dynamic and static candidates alike)."""
        if self._smoothed is None:
            feeds = self.data.batches(self.data.batch_size(16), limit=self.spec.calibration.max_samples)
            maxima, samples = smoothing.collect(self.model, feeds, self.ctx.threads)
            self.alphas = self.spec.smooth_quant_alpha if self.spec.smooth_quant_alpha is not None else smoothing.choose_alphas(self.model, maxima, samples)
            smoothed, self.smoothed_activations = smoothing.smooth(self.model, maxima, self.alphas)
            # The inserted 1/s Muls stay float: their outputs, the smoothed activations, are what gets quantized.
            self.smooth_nodes = [n.name for n in smoothed.graph.node if n.name.endswith(smoothing.SUFFIX)]
            self._smoothed = self.work / "smoothed.onnx"
            model_files.save_to(smoothed, self._smoothed)
        return self._smoothed

    def smooth_details(self) -> dict[str, Any]:
        if isinstance(self.alphas, dict):
            counts = Counter(self.alphas.values())
            alpha: Any = {"chosen_per_activation": True, "counts": {str(a): counts[a] for a in sorted(counts)}}
        else:
            alpha = self.alphas
        return {"smooth_quant": {"alpha": alpha, "activations": self.smoothed_activations}}

    def prepared(self, smooth: bool) -> Path:
        if smooth not in self._prepared:
            base = self.smoothed() if smooth else self.source
            self._prepared[smooth] = int8.prepare(base, self.work / f"prepared-{int(smooth)}.onnx")
        return self._prepared[smooth]

    def cache(self, candidate: Candidate, ops: list[str]) -> Path:
        key = (candidate.smooth, candidate.calibration)
        if key not in self._caches:
            path = self.work / f"calibration-{int(candidate.smooth)}-{candidate.calibration}.json"
            self.calibration_samples = int8.calibrate(self.prepared(candidate.smooth), path, self.work, self.data, self.spec.calibration,
                                                      candidate.calibration, lambda f, msg: self.progress(0.5 * f, msg))
            self._caches[key] = path
        return self._caches[key]

    def refined(self, candidate: Candidate, graph: Path, out: Path, after: float = 0.0) -> dict[str, Any]:
        """GPTQ codes in place of ORT's rounded ones (error_feedback), with the statistics of the graph
        the candidate was quantized from (computed once per graph). Its progress runs from `after`
        (what the build reported before) to half the candidate's share."""
        if self.spec.int8_rounding != "gptq":
            return {}
        if not self.data.available:
            raise CompressionFailed("int8_rounding gptq fits the weights to calibration data: submit the job with a dataset_id, or use nearest",
                                    code="dataset_required")
        if graph not in self._statistics:
            self._statistics[graph] = error_feedback.statistics(graph, self.data, self.spec.calibration.max_samples, self.ctx.threads,
                                                                lambda f, msg: self.progress(after + (0.5 - after) * f, msg))
        return {"error_feedback": error_feedback.refine(out, graph, self._statistics[graph], candidate.reduce_range)}

    def build(self, candidate: Candidate, only: list[str] | None = None) -> tuple[Path, dict[str, Any]]:
        self.count += 1
        out = self.work / f"candidate-{self.count}.onnx"
        exclude = list(self.spec.exclude_nodes) + list(candidate.float_nodes)
        if candidate.family == "int8_dynamic":
            graph = self.graph(candidate)
            int8.dynamic(graph, out, per_channel=candidate.per_channel, reduce_range=candidate.reduce_range,
                         ops=self.ops(candidate), exclude=exclude, only=only)
            return out, (self.smooth_details() if candidate.smooth else {}) | self.refined(candidate, graph, out)
        if candidate.family == "int8_static":
            ops = self.ops(candidate)
            exclude += self.smooth_nodes if candidate.smooth else []
            graph = self.graph(candidate)
            int8.static(graph, out, self.cache(candidate, ops), method=candidate.calibration, per_channel=candidate.per_channel,
                        reduce_range=candidate.reduce_range, ops=ops, exclude=exclude, only=only)
            details = {"calibration": {"method": candidate.calibration, "samples": self.calibration_samples}, "format": "QDQ"}
            if candidate.smooth:
                details |= self.smooth_details()
            return out, details | self.refined(candidate, graph, out, after=0.5)
        if candidate.family == "fp16":
            model_files.save_to(_to_fp16(self.source, self.spec), out)
            return out, {"keep_io_types": self.spec.keep_io_types}
        result, details = int4.quantize(self.model, algorithm=candidate.algorithm, block_size=self.spec.block_size, embeddings=self.spec.int4_embeddings,
                                        exclude=exclude, data=self.data, samples=self.spec.calibration.max_samples)
        model_files.save_to(result, out)
        return out, details


def _measure(builder: Builder, reference: Reference, candidate: Candidate, timing: bool, progress: Any, only: list[str] | None = None) -> Measured:
    builder.progress = progress
    try:
        path, details = builder.build(candidate, only)
    except CompressionFailed as exc:
        if candidate.family == builder.spec.mode or only is not None:  # a named mode's own refusal ends the job
            raise
        return Measured(candidate, error=exc.message)
    except JobFailure:  # cancellation
        raise
    except Exception as exc:  # noqa: BLE001 - one candidate ORT cannot build is a row in the table, not a failed job
        return Measured(candidate, error=f"ONNX Runtime could not build it: {(str(exc).splitlines() or [type(exc).__name__])[0][:200]}")
    wants_time = timing and only is None
    measured = reference.measure(Measured(candidate, path, details=details), keep_session=wants_time)
    if wants_time and measured.error is None and (not candidate.float_nodes or measured.meets(builder.spec.target)):
        # Building (calibration) reports the first half of the candidate's share, timing the second: never backwards.
        reference.time(measured, lambda f, msg: progress(0.5 + 0.5 * f, msg))
    else:
        reference.release(measured)
    if only is not None or measured.error is not None or (candidate.float_nodes and not measured.meets(builder.spec.target)):
        path.unlink(missing_ok=True)  # never kept: a model's worth of disk per sensitivity probe otherwise
        measured.path = None
    release_freed_memory()  # the candidate's build and its session
    return measured


def _float_layers(original: onnx.ModelProto, result: onnx.ModelProto, candidate: Candidate, spec: QuantizeStep, ops: list[str]) -> list[dict[str, Any]]:
    """Weights (1024+ values) the chosen model still holds in float32, with the reason for each."""
    if candidate.family == "fp16":
        return []
    if candidate.family == "int4_weight_only":
        return []  # the int4 report lists its own float weights (float_weights)
    remaining = {i.name for i in result.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    sizes = {i.name: int(np.prod(i.dims)) for i in original.graph.initializer}
    rows = []
    for node in original.graph.node:
        weights = [x for x in node.input if x in remaining and sizes.get(x, 0) >= 1024]
        if node.op_type not in WEIGHTED_OPS or not weights:
            continue
        if node.name in candidate.float_nodes:
            why = "mixed precision: among the layers whose quantization cost the most fidelity"
        elif node.name in spec.exclude_nodes:
            why = "excluded by the step (exclude_nodes)"
        elif node.op_type in spec.exclude_op_types:
            why = f"operator type {node.op_type} excluded by the step"
        elif node.op_type not in ops:
            why = (f"{node.op_type}: {candidate.name} quantizes {', '.join(o for o in ops if o in WEIGHTED_OPS)} only"
                   + (" (dynamic int8 convolutions run slower than float on CPU)" if node.op_type == "Conv" else ""))
        else:
            why = "ONNX Runtime's quantizer left this node in float (its pattern is not supported)"
        rows.append({"layer": node.name, "op_type": node.op_type, "parameters": sum(sizes[w] for w in weights), "why": why})
    return rows


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every node named: quantizers select and exclude layers by node name, and reports name them."""
    if all(n.name for n in model.graph.node):
        return model
    named = onnx.ModelProto()
    named.CopyFrom(model)
    taken = {n.name for n in named.graph.node}
    for i, node in enumerate(named.graph.node):
        if not node.name:
            node.name = next(f"{node.op_type}_{i}{suffix}" for suffix in ("", *(f"_{k}" for k in range(1, 1000))) if f"{node.op_type}_{i}{suffix}" not in taken)
            taken.add(node.name)
    return named


def _measure_candidates(builder: Builder, reference: Reference, candidates: list[Candidate], share: float, ctx: StepContext) -> list[Measured]:
    """Each candidate built, checked and timed in turn, over the first `share` of the step's progress."""
    measured: list[Measured] = []
    for i, candidate in enumerate(candidates):
        base = share * i / len(candidates)

        def progress(f: float, msg: str, base: float = base, name: str = candidate.name) -> None:
            ctx.progress(base + share * f / len(candidates), f"{name}: {msg}")

        ctx.progress(base, f"candidate {i + 1}/{len(candidates)}: building {candidate.name}")
        measured.append(_measure(builder, reference, candidate, timing=True, progress=progress))
        ctx.progress(share * (i + 1) / len(candidates), f"measured {candidate.name}", milestone=True)
    return measured


def _quantize_measured(model: onnx.ModelProto, spec: QuantizeStep, data: StepData, ctx: StepContext) -> StepResult:
    model = _named(model)
    if spec.mode == "int8_static" and not data.available:
        raise CompressionFailed("int8_static needs calibration data: submit the job with a dataset_id", code="dataset_required")
    calibration, held_out, measured_on = _split(model, data)
    kinds = fusion.model_kinds(model)
    op_types = {n.op_type for n in model.graph.node}
    candidates = plan(spec, has_data=calibration.available, transformer=bool(kinds),
                      has_matmul=bool(op_types & {"MatMul", "Gemm"}), has_conv=bool(op_types & {"Conv", "ConvTranspose"}))
    if not candidates:
        raise CompressionFailed("no quantization applies to this model (no matrix products or convolutions)", code="nothing_to_quantize")
    builder = Builder(model, spec, calibration, ctx, kinds)
    if any(c.fused for c in candidates) and builder.fused() is None:
        candidates = [c for c in candidates if not c.fused]
    release_freed_memory()  # the transformer optimizer's copies of the graph
    ctx.progress(0.0, f"measuring the original on {held_out.samples} samples")
    reference = Reference(builder.source, held_out, ctx.threads)
    share = 0.8 if spec.mixed_precision else 0.95
    measured = _measure_candidates(builder, reference, candidates, share, ctx)
    chosen = selection.best(measured, spec.target, spec.objective, reference.head_to_head)
    sensitivity = None
    miss = selection.promising_miss(measured, spec.target, spec.objective, chosen) if spec.mixed_precision else None
    if miss is not None:
        layers = mixed_precision.quantizable_layers(onnx.load_model(str(builder.graph(miss.candidate))), builder.ops(miss.candidate))
        quiet = lambda f, msg: None  # noqa: E731 - per-layer builds report through the step's own progress below
        sensitivity = mixed_precision.rank(
            layers, lambda layer: _measure(builder, reference, miss.candidate, timing=False, progress=quiet, only=[layer]),
            lambda f, msg: ctx.progress(share + (1 - share) * 0.7 * f, f"{miss.candidate.name}: {msg}"))
        ctx.progress(share + (1 - share) * 0.7, "mixed precision: leaving the most sensitive layers in float", milestone=True)
        _, attempts = mixed_precision.repair(miss.candidate, sensitivity, spec.target,
                                             lambda c: _measure(builder, reference, c, timing=True, progress=quiet))
        measured += attempts
        chosen = selection.best(measured, spec.target, spec.objective, reference.head_to_head)

    rows = [c.row(spec.target) for c in measured]
    target_met = chosen is not None
    warnings = []
    if chosen is None:
        closest = selection.closest(measured)
        what = (f"cosine >= {spec.target.min_cosine}" if reference.accuracy is None else f"accuracy drop <= {spec.target.max_accuracy_drop}") \
            + f" while at least {MIN_COMPRESSION}x smaller"
        if closest is None:
            raise CompressionFailed(f"no quantization candidate could be built or run: {selection.table_text(rows)}", code="quantize_failed")
        if spec.mode == "auto" and spec.on_target_missed == "fail":
            raise CompressionFailed(
                f"no candidate met the quality target ({what}, measured on {measured_on}); candidates: {selection.table_text(rows)}. "
                "Relax `target`, or set on_target_missed: keep_closest to keep the most faithful one (flagged)",
                code="quantization_target_missed")
        chosen = closest
        warnings.append(f"quality target missed: no candidate met {what}; kept the most faithful, {chosen.candidate.name}")
    assert chosen.path is not None
    result = onnx.load_model(str(chosen.path))
    ctx.progress(1.0, f"kept {chosen.candidate.name}", milestone=True)
    report = {
        "mode": spec.mode,
        "chosen": chosen.candidate.name,
        "settings": chosen.candidate.settings(),
        "objective": spec.objective,
        "target": spec.target.model_dump() | {"met": target_met},
        "measured_on": measured_on + (f"; {reference.positions}" if reference.positions else ""),
        "reason": _reason(chosen, spec, target_met, measured),
        "candidates": rows,
        "sensitivity": sensitivity,
        "float_layers": _float_layers(model, result, chosen.candidate, spec, builder.ops(chosen.candidate) if chosen.candidate.family.startswith("int8") else []),
        "transformer_fusion": builder.fusions if kinds else None,
        "warnings": warnings,
        "ops_before": _op_counts(model),
        "ops_after": _op_counts(result),
        **chosen.details,
    }
    return StepResult(model=result, report=report)


def _reason(chosen: Measured, spec: QuantizeStep, target_met: bool, measured: list[Measured]) -> str:
    best_at = (f"smallest of the fastest (a larger candidate kept only when {selection.SIZE_TRADE - 1:.0%} or more faster than every "
               "smaller one kept, close calls timed head to head; geometric mean over batch sizes; among those of one size and "
               f"within {selection.LATENCY_NOISE - 1:.0%} of its fastest, the most faithful)"
               if spec.objective == "latency" else "smallest")
    met = sum(1 for c in measured if c.meets(spec.target))
    if not target_met:
        return f"none of the {len(measured)} candidates measured met the target; kept the most faithful"
    return f"the {best_at} of the {met} candidate{'s' if met != 1 else ''} that met the target ({len(measured)} measured)"


def apply(model: onnx.ModelProto, spec: QuantizeStep, data: StepData, ctx: StepContext) -> StepResult:
    if spec.mode == "binary":
        ctx.progress(0.0, "quantizing (binary)")
        result, details = quantize_lowbit.binary(model, spec, data, ctx)
        ctx.progress(1.0, "quantized (binary)", milestone=True)
        return StepResult(model=result, report={"mode": "binary", "ops_before": _op_counts(model), "ops_after": _op_counts(result), **details})
    try:
        return _quantize_measured(model, spec, data, ctx)
    except JobFailure:  # our own failures and cancellation pass through unchanged
        raise
    except Exception as exc:
        raise CompressionFailed(f"ONNX Runtime could not quantize the model ({spec.mode}): {(str(exc).splitlines() or [type(exc).__name__])[0][:300]}") from exc
