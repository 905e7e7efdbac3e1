"""Request and response bodies (the families of full-stack-fastapi-template: XCreate, XPublic, XsPublic)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.core.error_codes import all_codes
from service.core.job_metrics import JobMetrics
from service.core.search_select import CandidatePoint
from service.core.llm import LlmInfo
from service.core.specs import STEP_TYPES, MeasureSpec, StepSpec

# Far beyond any real listing, and inside every database's 64-bit OFFSET.
MAX_OFFSET = 2**31 - 1

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


ERROR_CODES = all_codes([spec.model_fields["method"].default for spec in STEP_TYPES])


class ErrorBody(BaseModel):
    # Documented as an enum (every code the service can answer with, service/core/error_codes.py) but
    # parsed as a string: a client built from this schema should still read a code added later.
    code: str = Field(
        description="Stable machine-readable code: "
        + "; ".join(f"`{code}`: {meaning}" for code, meaning in sorted(ERROR_CODES.items())),
        json_schema_extra={"enum": sorted(ERROR_CODES)},
    )
    message: str = Field(description="What went wrong, in words a user can act on.")


class ErrorResponse(BaseModel):
    error: ErrorBody


# Documented on every /v1 route: what a client meets before its request reaches the handler.
AUTH_RESPONSES: dict[int | str, dict] = {
    401: {"model": ErrorResponse, "description": "Missing or unknown API key (`unauthorized`)."},
    413: {"model": ErrorResponse, "description": "Request body over the limit (`payload_too_large`)."},
}
# A 422 is either the body failing its schema (`invalid_request`, with pydantic's list in `detail`) or a semantic check (ours).
INVALID_RESPONSE: dict = {
    "description": "The request is well-formed but invalid: `error.message` summarises it; for a schema violation (`invalid_request`) `detail` lists each one.",
    "content": {"application/json": {"schema": {"anyOf": [
        {"$ref": "#/components/schemas/ErrorResponse"}, {"$ref": "#/components/schemas/HTTPValidationError"},
    ]}}},
}
ITEM_RESPONSES: dict[int | str, dict] = {404: {"model": ErrorResponse, "description": "No such id for this tenant (`not_found`)."}}


class TensorSpec(BaseModel):
    name: str
    dtype: str
    shape: list[int | str | None] = Field(description="Dimensions; a string or null is a dynamic axis.")


class ModelPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    format: str = Field(description="How the model is stored: `onnx` (one self-contained file), `onnx_zip` (over 2 GB: `model.onnx` with its external data, kept as one .zip), "
                        "or `hf_causal_lm` (a Hugging Face decoder checkpoint, kept as uploaded; exported to ONNX Runtime GenAI by its jobs).")
    size_bytes: int = Field(description="Bytes stored: the .onnx, or the .zip for `onnx_zip`.")
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parameters: int
    opset: int | None
    llm: LlmInfo | None = Field(None, description="format hf_causal_lm: what the checkpoint holds.")
    created_at: datetime


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int


class ArraySpec(BaseModel):
    dtype: str
    shape: list[int]
    min: int | None = Field(None, description="labels: the smallest class index.")
    max: int | None = Field(None, description="labels: the largest class index.")


class DatasetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    size_bytes: int
    sha256: str
    kind: str = Field("arrays", description="arrays (.npz) or text (.txt / .jsonl, for LLM checkpoints; `samples` counts documents).")
    arrays: dict[str, ArraySpec]
    samples: int
    has_labels: bool
    created_at: datetime


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int


class JobLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    time_limit_s: int | None = Field(None, ge=1, le=30 * 24 * 3600, description="Wall-clock limit; default and maximum: the operator's MODELSHRINK_JOB_TIME_LIMIT_S.")
    memory_limit_mb: int | None = Field(None, ge=64, le=1024**2, description="Resident memory limit of the job's process tree; default and maximum: the operator's MODELSHRINK_JOB_MEMORY_LIMIT_BYTES.")


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: str
    dataset_id: str | None = Field(None, description="Calibration / training data (.npz); also the evaluation data unless eval_dataset_id is given.")
    eval_dataset_id: str | None = Field(None, description="Held-out data for accuracy and fidelity.")
    steps: list[StepSpec] = Field(min_length=1, max_length=16, description="Applied in order.")
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    webhook_url: str | None = Field(None, max_length=2048, description="POSTed the final job JSON (signed) when the job ends.")
    limits: JobLimits = Field(default_factory=JobLimits, description="Stop the job (error `timed_out` / `resource_limit`) when it runs longer or uses more memory.")


class Progress(BaseModel):
    fraction: float
    step: str | None = None
    message: str = ""


class ArtifactPublic(BaseModel):
    name: str
    size_bytes: int
    sha256: str


class ArtifactsRemoved(BaseModel):
    at: datetime
    reason: str = Field(description="Why: the retention of finished jobs' results (`MODELSHRINK_JOB_ARTIFACT_RETENTION_DAYS`), "
                        "a search that kept only its best, Pareto and closest candidates, or a DELETE of the job's artifacts.")


class ArtifactUrl(BaseModel):
    url: str = Field(description="GET it without the API key (it is signed); it serves the file as an attachment.")
    expires_in_s: int
    sha256: str = Field(description="Check the download against it.")


class JobPublic(BaseModel):
    id: str
    status: JobStatus
    model_id: str
    dataset_id: str | None
    eval_dataset_id: str | None
    steps: list[dict[str, Any]]
    options: dict[str, Any]
    progress: Progress
    metrics: JobMetrics | None
    artifacts: list[ArtifactPublic]
    artifacts_removed: ArtifactsRemoved | None = Field(None, description="Set once the job's artifacts are removed; its metrics and report page stay.")
    error: ErrorBody | None
    attempts: int
    worker: str | None = Field(None, description="The worker that ran the job, or runs it now (the last one when it was redelivered): Celery node name and process id.")
    cancel_requested: bool
    webhook_url: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


class MethodPublic(BaseModel):
    name: str
    description: str
    json_schema: dict[str, Any] = Field(alias="schema")
    model_config = ConfigDict(populate_by_name=True)


class MethodsPublic(BaseModel):
    data: list[MethodPublic]
    count: int


SEARCH_METHODS = Literal["quantize", "prune", "distill", "cluster", "deep_compression", "low_rank"]


class SearchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: str
    dataset_id: str | None = Field(None, description="Fine-tuning / calibration data; without it only quantization is tried (on synthetic inputs).")
    eval_dataset_id: str | None = Field(None, description="Held-out data the constraint is judged on (e.g. the test split).")
    objective: Literal["size", "latency"] = Field(description="What `best` is best at among candidates meeting the constraint.")
    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description="Largest absolute accuracy loss (0.002 = 0.2 points); needs labels in the evaluation data.")
    min_fidelity: float | None = Field(None, ge=0, le=1, description="Smallest mean cosine of the candidate's outputs to the original's. Default when neither is given: 0.99.")
    max_perplexity_increase: float | None = Field(
        None, gt=0, le=10, description="LLM checkpoints (and only they): largest relative perplexity increase on the evaluation text (0.05 = +5%, the default there).")
    budget_minutes: float = Field(30.0, gt=0, le=7 * 24 * 60, description="Wall-clock budget: at the deadline unfinished candidates are cancelled and the best finished one is kept.")
    methods: list[SEARCH_METHODS] | None = Field(None, min_length=1, description="Only recipes made of these methods (default: all).")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of every candidate's training: the same search gives the same candidates.")
    measure: MeasureSpec = Field(default_factory=MeasureSpec, description="How every candidate's before/after metrics are measured.")
    webhook_url: str | None = Field(None, max_length=2048, description="POSTed the final search JSON (signed) when the search ends.")


class SearchCandidate(BaseModel):
    job_id: str
    recipe: str | None
    rung: int
    status: JobStatus
    steps: list[dict[str, Any]]
    metrics: CandidatePoint | None = Field(description="What the search compares, once the candidate succeeded (the job has the full metrics).")
    error: ErrorBody | None


SearchStatus = Literal["running", "succeeded", "failed", "cancelled"]


class SearchPublic(BaseModel):
    id: str
    status: SearchStatus
    model_id: str
    dataset_id: str | None
    eval_dataset_id: str | None
    request: dict[str, Any]
    rungs: int = Field(description="Successive-halving rungs: the first runs every recipe on a third of its fine-tuning budget, the next promotes the promising ones to the full budget.")
    rung: int
    progress: Progress
    candidates: list[SearchCandidate]
    pareto: list[str] = Field(description="Job ids of the candidates no other beats on size, speed and quality at once, smallest first.")
    best: str | None = Field(description="The candidate meeting the constraint with the best objective (so far, while running); null with `closest` when none does.")
    closest: list[str] = Field(description="When no candidate met the constraint: those that came nearest.")
    reason: str | None = Field(description="Why the search ended (all candidates finished, budget reached, cancelled).")
    error: ErrorBody | None
    cancel_requested: bool
    webhook_url: str | None
    deadline_at: datetime
    created_at: datetime
    finished_at: datetime | None


class SearchesPublic(BaseModel):
    data: list[SearchPublic]
    count: int
