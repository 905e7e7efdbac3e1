"""GET /v1/jobs/{id} sends the stored metrics as they are (they were checked when written): the body
must be what the documented model gives, key for key, for a finished job with real metrics; stored
NaN (older versions wrote it) still answers valid JSON."""

from __future__ import annotations

import json
from pathlib import Path

from service.api.schemas import JobPublic
from service.core.db import session_scope
from service.core.job_metrics import checked, stored
from service.core.jobstore import job_public
from service.core.tables import Job
from tests.builders import mlp, to_bytes
from tests.conftest import authed_client, fast_settings

METRICS = {
    "original": {"size_bytes": 4_000, "parameters": 1_000, "latency_ms": {"p50": 1.0, "p95": 1.2, "batch": 1},
                 "latency_by_batch": [{"batch": 1, "p50": 1.0, "p95": 1.2, "runs": 20}]},
    "compressed": {"size_bytes": 1_000, "parameters": 1_000, "latency_ms": {"p50": 0.5, "p95": 0.6, "batch": 1},
                   "latency_by_batch": [{"batch": 1, "p50": 0.5, "p95": 0.6, "runs": 20}], "fidelity": {"cosine": 0.999, "top1_agreement": 1.0}},
    "compression_ratio": 4.0, "speedup": 2.0, "warnings": ["a \"quoted\" warning"],
    "step_reports": [{"index": 0, "method": "quantize", "chosen": "int8_dynamic/per-channel/matmul", "candidates": [
        {"candidate": "int8_dynamic/per-channel/matmul", "status": "measured", "compression_ratio": 4.0, "speedup_by_batch": {"1": 2.0}}]}],
}


def _finished_job(tmp_path: Path, metrics_json: str) -> tuple[dict, dict]:
    settings = fast_settings(tmp_path)
    with authed_client(settings) as client:
        model_id = client.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp()))}).json()["id"]
        job_id = client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"method": "quantize", "mode": "fp16"}]}).json()["id"]
        with session_scope(settings.resolved_database_url) as session:
            job = session.get(Job, job_id)
            job.status = "succeeded"
            job.metrics = json.loads(metrics_json)
        with session_scope(settings.resolved_database_url) as session:
            expected = json.loads(JobPublic.model_validate(job_public(session.get(Job, job_id))).model_dump_json())
        response = client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200 and response.headers["content-type"] == "application/json"
        return response.json(), expected


def test_the_polled_body_is_the_documented_model_key_for_key(tmp_path: Path) -> None:
    body, expected = _finished_job(tmp_path, json.dumps(stored(checked(METRICS, strict=True))))
    assert body == expected
    assert body["metrics"]["step_reports"][0]["chosen"] == "int8_dynamic/per-channel/matmul"


def test_stored_nan_still_answers_json(tmp_path: Path) -> None:
    metrics = json.loads(json.dumps(METRICS))
    metrics["compressed"]["accuracy"] = float("nan")
    body, expected = _finished_job(tmp_path, json.dumps(metrics))
    assert body["metrics"]["compressed"]["accuracy"] is None and body == expected
