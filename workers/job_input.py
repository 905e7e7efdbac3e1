"""What a job process needs to know about its job, read from the job store by the runner (kept free of
heavy imports: the Celery worker builds it without loading torch or ONNX)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class JobInput:
    job_id: str
    tenant_id: str
    model: dict[str, Any]  # artifact_key, inputs, outputs, name
    dataset: dict[str, Any] | None  # artifact_key, arrays
    eval_dataset: dict[str, Any] | None
    steps: list[dict[str, Any]]
    options: dict[str, Any]
    referenced_models: dict[str, str] = field(default_factory=dict)  # model id -> artifact key (e.g. students)
