"""Request and response bodies (the families of full-stack-fastapi-template: XCreate, XPublic, XsPublic)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.core.specs import MeasureSpec, StepSpec

# Far beyond any real listing, and inside every database's 64-bit OFFSET.
MAX_OFFSET = 2**31 - 1

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. invalid_model, not_found.")
    message: str = Field(description="What went wrong, in words a user can act on.")


class ErrorResponse(BaseModel):
    error: ErrorBody


# Documented on every /v1 route: what a client meets before its request reaches the handler.
AUTH_RESPONSES: dict[int | str, dict] = {
    401: {"model": ErrorResponse, "description": "Missing or unknown API key (`unauthorized`)."},
    413: {"model": ErrorResponse, "description": "Request body over the limit (`payload_too_large`)."},
}
# A 422 is either the body failing its schema (FastAPI's shape, `detail`) or a semantic check (ours).
INVALID_RESPONSE: dict = {
    "description": "The request is well-formed but invalid: `detail` lists schema violations; `error` names a semantic one (e.g. `invalid_model`).",
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
    format: str
    size_bytes: int
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parameters: int
    opset: int | None
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


class JobPublic(BaseModel):
    id: str
    status: JobStatus
    model_id: str
    dataset_id: str | None
    eval_dataset_id: str | None
    steps: list[dict[str, Any]]
    options: dict[str, Any]
    progress: Progress
    metrics: dict[str, Any] | None
    artifacts: list[ArtifactPublic]
    error: ErrorBody | None
    attempts: int
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
