"""A job's metrics as the worker writes them and the API answers them: both models measured on the
same data, the comparison, the warnings and each step's typed report. The worker builds and checks
them here (`checked`), readers (search selection, report pages, the CLI) take the models."""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field

from service.core.llm import LlmMeasurement
from service.core.reported import STRICT, Reported
from service.core.specs import STEP_TYPES


class Tolerant(Reported):
    # Metrics are stored with the job: a field added later must not make older jobs unreadable.
    pass


class LatencyAtBatch(Tolerant):
    batch: int
    p50: float = Field(description="Median milliseconds per run.")
    p95: float
    runs: int


class Latency(Tolerant):
    p50: float = Field(description="Median milliseconds per run at `batch` (the first measured batch size).")
    p95: float
    batch: int


class Fidelity(Tolerant):
    cosine: float = Field(description="Mean cosine similarity of the compressed model's first output to the original's, per sample.")
    top1_agreement: float | None = Field(None, description="Share of samples (of positions, for a language model) with the same argmax; null when the output is an embedding or hidden states, whose argmax means nothing.")
    max_abs_diff: float | None = None


class ModelMeasurement(Tolerant):
    size_bytes: int = Field(description="Bytes of what ships (for a .msz bundle: the bundle).")
    parameters: int | None = Field(None, description="Stored weights, each tensor once (tied weights once; int4 counted as weights).")
    nonzero_parameters: int | None = None
    quantization_parameters: int = Field(0, description="Quantization scales and zero points, counted apart from `parameters`.")
    macs: int | None = Field(None, description="Multiply-accumulates per sample (None when the graph's shapes cannot be inferred).")
    accuracy: float | None = Field(None, description="With labels in the evaluation data.")
    latency_ms: Latency | None = None
    latency_by_batch: list[LatencyAtBatch] = Field(default_factory=list)
    fidelity: Fidelity | None = Field(None, description="Compressed model only.")
    onnx_size_bytes: int | None = Field(None, description="Compressed model only: the ONNX file (differs from size_bytes for a bundle).")
    llm: LlmMeasurement | None = Field(None, description="LLM jobs: perplexity, agreement with the original, prefill and decode speed, memory.")


class EvaluationInfo(Tolerant):
    data: str = Field(description="dataset, eval_dataset or synthetic.")
    synthetic: str | None = Field(None, description="How synthetic inputs were drawn, when they were.")
    samples: int
    fixed_batch: int | None = Field(None, description="The model's batch axis is fixed at this size (exported without dynamic axes): every run used batches of it.")
    positions: str | None = Field(None, description="For per-token outputs: which positions were compared (those the attention mask marks as real tokens; padding is left out).")
    labels: bool
    runtime: str
    threads: int
    window: int | None = Field(None, description="LLM jobs: tokens per evaluation window (each from an empty KV cache).")
    tokens: int | None = Field(None, description="LLM jobs: evaluation tokens in all.")


class LayerSensitivity(Tolerant):
    layer: str
    cosine: float = Field(description="Output cosine to the original with only this layer compressed.")
    drop: float
    tensor: str | None = Field(None, description="The weight's initializer name in the ONNX graph.")


# What each step did, typed per method (each method's report model, from its spec module).
StepReport = Annotated[Union[tuple(spec.report_model for spec in STEP_TYPES)], Field(discriminator="method")]  # type: ignore[valid-type]


class JobMetrics(Tolerant):
    original: ModelMeasurement
    compressed: ModelMeasurement
    compression_ratio: float = Field(description="original size_bytes / compressed size_bytes.")
    speedup: float = Field(description="original p50 / compressed p50 at the first measured batch size.")
    evaluation: EvaluationInfo | None = None
    warnings: list[str] = Field(default_factory=list, description="Each way the result is worse than the original (accuracy, fidelity, speed, size), in words, with where.")
    sensitivity: list[LayerSensitivity] | None = Field(None, description="Layers most responsible for a quality loss, when attribution was possible.")
    step_reports: list[StepReport] = Field(default_factory=list)  # type: ignore[valid-type]


def checked(raw: dict[str, Any], strict: bool = False) -> JobMetrics:
    """The worker's metrics as the schema's model: a value of the wrong type raises; with `strict`
    (the tests of every method on real exports) so does a key the schema does not declare, which is
    how a misspelt metric or report key is caught before a user reads its absence."""
    return JobMetrics.model_validate(raw, context=STRICT if strict else None)


def _plain(value: Any) -> Any:
    # Undeclared values (extras) come as the worker made them: numpy scalars and arrays become
    # numbers and lists (no numpy import: the API loads this module), anything else its text.
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def stored(metrics: JobMetrics) -> dict[str, Any]:
    """As stored with the job and answered by the API as stored (service.api.job_status): the
    model's whole dump, defaults included, in JSON types."""
    return metrics.model_dump(mode="json", fallback=_plain)
