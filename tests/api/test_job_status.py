"""GET /v1/jobs/{id} sends the stored metrics as they are (they were checked when written): the body
must be what the documented model gives, key for key, for a finished job with real metrics; stored
NaN (older versions wrote it) still answers valid JSON."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import make_url

from service.api.job_status import SqliteStatusReader, _body, status_body
from service.api.schemas import JobPublic
from service.core.db import engine_of, session_scope
from service.core.errors import NotFound
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


def _submitted(client, settings) -> str:  # type: ignore[no-untyped-def]
    model_id = client.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp()))}).json()["id"]
    return client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"method": "quantize", "mode": "fp16"}]}).json()["id"]


def test_the_sqlite_read_on_the_loop_gives_what_the_core_query_gives(tmp_path: Path) -> None:
    # Every column through SQLAlchemy's processors on one side and the Core query on the other,
    # timestamps (naive in SQLite) and the removed-artifacts note included.
    settings = fast_settings(tmp_path)
    with authed_client(settings) as client:
        job_id = _submitted(client, settings)
        with session_scope(settings.resolved_database_url) as session:
            job = session.get(Job, job_id)
            job.status, job.metrics, job.artifacts = "succeeded", stored(checked(METRICS, strict=True)), [{"name": "model.onnx", "size_bytes": 12, "sha256": "0" * 64}]
            job.started_at, job.finished_at = datetime(2026, 12, 6, 10, 0, 1, 250000, tzinfo=timezone.utc), datetime(2026, 12, 6, 10, 0, 9, tzinfo=timezone.utc)
            job.artifacts_removed_at, job.artifacts_removed_reason = datetime(2026, 12, 7, tzinfo=timezone.utc), "retention"
        tenant_id = job.tenant_id
        reader = SqliteStatusReader(str(make_url(settings.resolved_database_url).database), engine_of(settings.resolved_database_url).dialect)
        try:
            on_loop = _body(reader.row(job_id), tenant_id, job_id)
        finally:
            reader.close()
        with engine_of(settings.resolved_database_url).connect() as connection:
            assert on_loop == status_body(connection, tenant_id, job_id)
        assert client.get(f"/v1/jobs/{job_id}").content == on_loop
        assert json.loads(on_loop)["started_at"].startswith("2026-12-06T10:00:01.25")
        with pytest.raises(NotFound):  # another tenant's job is not found, on this path too
            _body(reader_row(settings, job_id), "ten_other", job_id)


def reader_row(settings, job_id: str):  # type: ignore[no-untyped-def]
    reader = SqliteStatusReader(str(make_url(settings.resolved_database_url).database), engine_of(settings.resolved_database_url).dialect)
    try:
        return reader.row(job_id)
    finally:
        reader.close()


def test_a_writer_holding_the_database_neither_blocks_nor_stales_the_status(tmp_path: Path) -> None:
    # The read on the loop never waits: with a writer's transaction open the last committed state
    # answers at once, and the next poll after its commit sees the new one (no snapshot kept).
    settings = fast_settings(tmp_path)
    with authed_client(settings) as client:
        job_id = _submitted(client, settings)
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
        writer = sqlite3.connect(str(make_url(settings.resolved_database_url).database), isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("UPDATE jobs SET status = 'running' WHERE id = ?", (job_id,))
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
            writer.execute("COMMIT")
        finally:
            writer.close()
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"


def test_a_failing_sqlite_read_falls_back_to_the_threads(tmp_path: Path) -> None:
    settings = fast_settings(tmp_path)
    with authed_client(settings) as client:
        job_id = _submitted(client, settings)
        expected = client.get(f"/v1/jobs/{job_id}").content
        reader = client.app.state.status_reader  # type: ignore[attr-defined]
        assert isinstance(reader, SqliteStatusReader)
        reader.close()  # every read on it now raises sqlite3.ProgrammingError
        assert client.get(f"/v1/jobs/{job_id}").content == expected
        assert client.get("/v1/jobs/job_missing").status_code == 404
