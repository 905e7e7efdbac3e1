"""Runs a job's steps on its model and measures the result: the part of a job that knows about
models, not about queues or leases (those are in workers.runner)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import EncodeError

from service.core import job_metrics
from service.core.artifacts import ArtifactStore
from service.core.errors import CompressionFailed, InvalidInput, ModelshrinkError
from service.core.onnx_probe import probe_onnx
from service.core.settings import Settings
from service.core.specs import MeasureSpec, step_adapter
from workers import metrics as m
from workers import model_files, verdict
from workers.sensitivity import layer_sensitivity
from workers.data import load_step_data, synthetic_data, token_vocabularies
from workers.memory import release_freed_memory
from workers.evaluation import Comparison, ReferenceRun, compare
from workers.job_input import JobInput
from workers.output_kind import model_output_kind
from workers.methods import METHODS
from workers.steps import StepContext, StepData
from workers.constant_folding import fold

log = logging.getLogger(__name__)

# Share of the progress bar: the steps, then measuring both models.
STEPS_SHARE = 0.6

Progress = Callable[..., None]  # (fraction, step label, message, milestone=False)


def _load_data(job: JobInput, store: ArtifactStore, spec: MeasureSpec, original: Path) -> tuple[StepData, StepData, str]:
    inputs = job.model["inputs"]
    train = StepData()
    if job.dataset:
        train = load_step_data(store.path(job.dataset["artifact_key"]), job.dataset["arrays"], inputs, "dataset")
    if job.eval_dataset:
        return train, load_step_data(store.path(job.eval_dataset["artifact_key"]), job.eval_dataset["arrays"], inputs, "eval dataset"), "eval_dataset"
    if train.available:
        return train, train, "dataset"
    vocab = token_vocabularies(onnx.load_model(str(original)))
    synthetic, description = synthetic_data(inputs, min(spec.max_eval_samples, 64), seed=0, vocab=vocab)
    synthetic.description = description
    return train, synthetic, "synthetic"


def _describe(path: Path, spec: MeasureSpec) -> tuple[dict[str, Any], Any]:
    # Count parameters and MACs on the dense model a sparse-packed file stands for; size_bytes is the file.
    model = fold(onnx.load_model(str(path)))
    params, nonzero = m.parameter_counts(model)
    result = {
        "size_bytes": model_files.on_disk_bytes(path),
        "parameters": params,
        "nonzero_parameters": nonzero,
        "quantization_parameters": m.quantization_parameter_count(model),
        "macs": m.macs_per_sample(model),
    }
    return result, m.make_session(path, spec.threads)


def _with_latency(result: dict[str, Any], lat: list[dict[str, Any]]) -> None:
    result["latency_ms"] = {"p50": lat[0]["p50"], "p95": lat[0]["p95"], "batch": lat[0]["batch"]}
    result["latency_by_batch"] = lat


def _refuse_non_finite(comparison: Comparison) -> None:
    # A model that answers NaN or infinity where the original answered numbers is broken, whatever
    # the fidelity arithmetic would make of it (NaN norms used to read as cosine 1.0).
    if comparison.non_finite_samples:
        raise CompressionFailed(
            f"the compressed model produces non-finite outputs (NaN or infinity) on {comparison.non_finite_samples} evaluation sample(s) "
            "where the original's are finite; lower the learning rate or the loss weights",
            code="non_finite",
        )


def _apply_step(model: onnx.ModelProto, step: Any, index: int, train: StepData, ctx: StepContext, job_id: str) -> Any:
    """One step's method on the model, its failures turned into the step's own error codes."""
    try:
        return METHODS[step.method].apply(model, step, train, ctx)
    except ModelshrinkError:  # our own codes (and cancellation) pass through unchanged
        raise
    except MemoryError as exc:
        raise CompressionFailed(f"steps[{index}] ({step.method}) ran out of memory on this model", code="resource_limit") from exc
    except EncodeError as exc:  # a library serialized a model over protobuf's 2 GB limit whole
        raise CompressionFailed(
            f"steps[{index}] ({step.method}) cannot work on a model over 2 GB: it hands the whole model to a library as one protobuf "
            "message, which protobuf caps at 2 GB. quantize with mode int8_dynamic works on such models",
            code="too_large_for_method") from exc
    except Exception as exc:
        # Whatever torch, ONNX Runtime, onnx or a method's graph surgery raises while working on
        # the client's model (a shape it cannot handle, a graph pattern it does not expect) is
        # about that model: say so with the step's own code, never internal_error. The traceback
        # stays in the worker's log; host paths are cut from the message the client sees.
        log.warning("steps[%d] (%s) failed on job %s's model", index, step.method, job_id, exc_info=True)
        detail = re.sub(r"(/[\w.\-]+)+", "<path>", (str(exc).splitlines() or [type(exc).__name__])[0])[:300]
        raise CompressionFailed(f"steps[{index}] ({step.method}) could not process this model: {type(exc).__name__}: {detail}",
                                code=f"{step.method}_failed") from exc


def _run_steps(job: JobInput, store: ArtifactStore, model: onnx.ModelProto, train: StepData, spec: MeasureSpec, work_dir: Path,
               progress: Progress) -> tuple[onnx.ModelProto, list[dict[str, Any]], bytes | None]:
    """The job's steps in order: (the compressed model, each step's report, the last step's bundle)."""

    def load_referenced(model_id: str) -> onnx.ModelProto:
        if model_id not in job.referenced_models:
            raise CompressionFailed(f"model {model_id} not found", code="input_deleted")
        return onnx.load_model(str(model_files.local_graph(store.path(job.referenced_models[model_id]), work_dir / f"referenced-{model_id}")))

    reports = []
    final_bundle: bytes | None = None
    n = len(job.steps)
    for index, raw in enumerate(job.steps):
        step = step_adapter.validate_python(raw)
        label = f"{index + 1}/{n} {step.method}"

        def report(fraction: float, message: str, milestone: bool = False, index: int = index, label: str = label) -> None:
            progress(STEPS_SHARE * (index + fraction) / n, label, message, milestone)

        ctx = StepContext(work_dir=work_dir / f"step{index}", report_progress=report, seed=index, load_model=load_referenced, threads=spec.threads)
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        result = _apply_step(model, step, index, train, ctx, job.job_id)
        model = result.model
        final_bundle = result.bundle
        reports.append({"index": index, "method": step.method, **result.report})
    return model, reports, final_bundle


def _validate(compressed_path: Path, original_path: Path, settings: Settings, external: bool) -> None:
    try:
        # Scaled to the original's size: a compressed model rebuilds weights about that large at load.
        probe_onnx(compressed_path, timeout_s=settings.probe_timeout_s, memory_bytes=settings.probe_memory_bytes,
                   decoded_bytes=model_files.on_disk_bytes(original_path), external_ok=external)
    except InvalidInput as exc:
        raise CompressionFailed(f"the compressed model failed validation: {exc.message}", code="invalid_output") from exc


def _measure(original_path: Path, compressed_path: Path, evaluation: StepData, spec: MeasureSpec,
             progress: Progress) -> tuple[dict[str, Any], dict[str, Any], Comparison, list[str], list[dict[str, Any]] | None]:
    """Both models on the same data: (original, compressed, their comparison, quality warnings, the
    layers responsible when there are warnings)."""
    original, original_session = _describe(original_path, spec)
    compressed, compressed_session = _describe(compressed_path, spec)
    reference = ReferenceRun(original_session, evaluation, spec.max_eval_samples)
    kind = model_output_kind(onnx.load_model(str(original_path), load_external_data=False), reference.first_output, evaluation.labels is not None)
    comparison = compare(reference, compressed_session, kind)
    _refuse_non_finite(comparison)
    original["accuracy"], compressed["accuracy"] = comparison.reference_accuracy(), comparison.accuracy()
    compressed["fidelity"] = comparison.fidelity()
    timing = m.latency([original_session, compressed_session], evaluation, spec,
                       lambda f, msg: progress(STEPS_SHARE + f * (0.95 - STEPS_SHARE), "measure", f"both models, interleaved: {msg}"))
    _with_latency(original, timing[0])
    _with_latency(compressed, timing[1])
    warnings = verdict.quality_warnings(original, compressed)
    sensitivity = None
    if warnings:
        progress(0.96, "measure", "finding the layers responsible for the quality loss", True)
        del original_session, compressed_session, reference  # each holds a model's weights: the probes make their own
        release_freed_memory()
        sensitivity = layer_sensitivity(original_path, compressed_path, evaluation, spec.threads)
        warnings.append(verdict.attribution_note(sensitivity))
    return original, compressed, comparison, warnings, sensitivity


def _evaluation_note(evaluation: StepData, source: str, comparison: Comparison, spec: MeasureSpec) -> dict[str, Any]:
    import onnxruntime

    return {
        "data": source,
        "synthetic": evaluation.description,
        "samples": comparison.samples,
        "fixed_batch": evaluation.fixed_batch,
        "positions": comparison.positions_note(),
        "labels": evaluation.labels is not None,
        "runtime": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider",
        "threads": spec.threads,
    }


def _store(job: JobInput, store: ArtifactStore, report: dict[str, Any], final_bundle: bytes | None, compressed_file: Path,
           external: bool) -> list[dict[str, Any]]:
    """The job's artifacts under jobs/<tenant>/<job>/: the model (and its bundle) and report.json."""
    base = f"jobs/{job.tenant_id}/{job.job_id}"
    stored = [("model.msz", store.put_bytes(f"{base}/model.msz", final_bundle))] if final_bundle is not None else []
    name = "model.zip" if external else "model.onnx"
    stored += [
        (name, store.put_file(f"{base}/{name}", compressed_file)),
        ("report.json", store.put_bytes(f"{base}/report.json", json.dumps(report, indent=2, default=str).encode())),
    ]
    return [{"name": name, "size_bytes": f.size_bytes, "sha256": f.sha256} for name, f in stored]


def run_pipeline(job: JobInput, store: ArtifactStore, settings: Settings, work_dir: Path, progress: Progress) -> tuple[dict, list]:
    """steps -> validate -> measure -> store: (the job's metrics with its step reports, its artifacts)."""
    spec = MeasureSpec.model_validate(job.options.get("measure", {}))
    # A model over 2 GB is stored as a .zip with external data: unpacked here, loaded from the folder.
    original_path = model_files.local_graph(store.path(job.model["artifact_key"]), work_dir / "original")
    train, evaluation, source = _load_data(job, store, spec, original_path)
    if evaluation is not train and source != "synthetic":
        train.evaluation = evaluation
    if source == "synthetic":
        train.probe = evaluation
    model, reports, final_bundle = _run_steps(job, store, onnx.load_model(str(original_path)), train, spec, work_dir, progress)

    # Over 2 GB the result keeps its weights in external data and ships as model.zip.
    compressed_path, compressed_file = model_files.save(model, work_dir / "compressed", settings.single_file_limit_bytes)
    del model  # measured and checked from the saved file from here on: one graph fewer in memory
    external = compressed_file != compressed_path
    progress(STEPS_SHARE, "validate", "checking the compressed model with onnx.checker and ONNX Runtime", True)
    _validate(compressed_path, original_path, settings, external)

    release_freed_memory()  # what the steps built and dropped
    progress(STEPS_SHARE, "measure", "evaluating both models", True)
    original, compressed, comparison, warnings, sensitivity = _measure(original_path, compressed_path, evaluation, spec, progress)
    compressed["onnx_size_bytes"] = compressed["size_bytes"]
    if final_bundle is not None:
        # What ships is the bundle: its size is the compressed size (the ONNX inside is measured for speed).
        compressed["size_bytes"] = len(final_bundle)
    ratio = original["size_bytes"] / compressed["size_bytes"]
    raw = {
        "original": original,
        "compressed": compressed,
        "compression_ratio": ratio,
        "speedup": original["latency_ms"]["p50"] / compressed["latency_ms"]["p50"],
        "evaluation": _evaluation_note(evaluation, source, comparison, spec),
        "warnings": warnings + verdict.speed_and_size_warnings(original, compressed, ratio),
        "sensitivity": sensitivity,
        "step_reports": reports,
    }
    # Built as the schema declares or not at all: a value of the wrong type fails here, in the worker,
    # not when a client reads the job (the tests check undeclared keys too: job_metrics.checked).
    metrics = job_metrics.stored(job_metrics.checked(raw))
    report = {"job_id": job.job_id, "model": job.model.get("name"), "steps": metrics["step_reports"],
              "metrics": {k: v for k, v in metrics.items() if k != "step_reports"}}
    return metrics, _store(job, store, report, final_bundle, compressed_file, external)
