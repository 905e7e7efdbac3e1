"""Job results count against the tenant's storage and do not pile up: retention, a finished search
keeping its best candidates' artifacts, and DELETE /v1/jobs/{id}/artifacts. Real SQLite, real files;
jobs are finished through the job store as a worker finishes them."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import update

from service.core.artifacts import open_store
from service.core.db import session_scope
from service.core.jobstore import finish
from service.core.reconciler import reconcile
from service.core.settings import Settings
from service.core.tables import Job, Search, utcnow
from tests.builders import mlp

RESULT = b"x" * 50_000


@pytest.fixture
def settings(settings: Settings) -> Iterator[Settings]:
    """The app's own reconciler would sweep within a second of a job being backdated and take the
    removal these tests ask their explicit pass for; an hour's interval leaves the pass to the test."""
    settings.reconcile_interval_s = 3600.0
    yield settings


def _model(client) -> str:
    response = client.post("/v1/models", files={"file": ("m.onnx", mlp().SerializeToString())})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _finished_job(client, settings, model_id: str, ended_days_ago: float = 0.0, search_id: str | None = None) -> str:
    job = client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"method": "quantize", "mode": "fp16"}]}).json()
    store = open_store(settings)
    with session_scope(settings.resolved_database_url) as session:
        row = session.get(Job, job["id"])
        tenant_id = row.tenant_id
        stored = store.put_bytes(f"jobs/{tenant_id}/{row.id}/model.onnx", RESULT)
        assert finish(session, row.id, "succeeded", artifacts=[{"name": "model.onnx", "size_bytes": stored.size_bytes, "sha256": stored.sha256}])
        session.execute(update(Job).where(Job.id == row.id).values(finished_at=utcnow() - timedelta(days=ended_days_ago), search_id=search_id))
        session.commit()
    return job["id"]


def _job_dir(settings, job_id: str):
    with session_scope(settings.resolved_database_url) as session:
        row = session.get(Job, job_id)
        return open_store(settings).local_path(f"jobs/{row.tenant_id}/{job_id}")


def test_results_count_against_the_storage_quota_and_deleting_them_frees_it(client, settings) -> None:
    model_id = _model(client)
    job_id = _finished_job(client, settings, model_id)
    model_bytes = client.get(f"/v1/models/{model_id}").json()["size_bytes"]
    client.app.state.settings.tenant_max_stored_bytes = model_bytes + len(RESULT)  # exactly full
    refused = client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"method": "quantize", "mode": "fp16"}]})
    assert refused.status_code == 507 and refused.json()["error"]["code"] == "storage_quota_exceeded"
    assert "job results" in refused.json()["error"]["message"] and "/v1/jobs/{id}/artifacts" in refused.json()["error"]["message"]

    assert client.delete(f"/v1/jobs/{job_id}/artifacts").status_code == 204
    assert not _job_dir(settings, job_id).exists()
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["artifacts"] == [] and job["artifacts_removed"]["reason"] == "deleted by the user" and job["status"] == "succeeded"
    gone = client.get(f"/v1/jobs/{job_id}/artifacts/model.onnx")
    assert gone.status_code == 404 and "removed on" in gone.json()["error"]["message"]
    assert client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"method": "quantize", "mode": "fp16"}]}).status_code == 202


def test_a_running_jobs_artifacts_cannot_be_deleted(client) -> None:
    job = client.post("/v1/jobs", json={"model_id": _model(client), "steps": [{"method": "quantize", "mode": "fp16"}]}).json()
    response = client.delete(f"/v1/jobs/{job['id']}/artifacts")
    assert response.status_code == 409 and "once it ends" in response.json()["error"]["message"]


def test_retention_removes_old_results_and_keeps_recent_ones(client, settings) -> None:
    model_id = _model(client)
    old, recent = _finished_job(client, settings, model_id, ended_days_ago=31), _finished_job(client, settings, model_id, ended_days_ago=29)
    done = reconcile(settings)
    assert done["artifacts_removed"] == [old]
    assert not _job_dir(settings, old).exists() and _job_dir(settings, recent).exists()
    removed = client.get(f"/v1/jobs/{old}").json()["artifacts_removed"]
    assert removed["reason"].startswith("retention: results are kept 30 days")
    assert client.get(f"/v1/jobs/{recent}").json()["artifacts_removed"] is None
    assert reconcile(settings)["artifacts_removed"] == []  # idempotent


def test_a_finished_search_keeps_only_its_best_candidates_artifacts(client, settings) -> None:
    model_id = _model(client)
    search_id = "srch_retention"
    best, loser = (_finished_job(client, settings, model_id, search_id=search_id) for _ in range(2))
    with session_scope(settings.resolved_database_url) as session:
        tenant_id = session.get(Job, best).tenant_id
        session.add(Search(id=search_id, tenant_id=tenant_id, model_id=model_id, request={"objective": "size", "min_fidelity": 0.99}, status="succeeded",
                           result={"best": best, "closest": []}, deadline_at=utcnow(), finished_at=utcnow()))
        session.commit()
    assert reconcile(settings)["artifacts_removed"] == [loser]
    assert _job_dir(settings, best).exists() and not _job_dir(settings, loser).exists()
    assert "only its best, Pareto and closest" in client.get(f"/v1/jobs/{loser}").json()["artifacts_removed"]["reason"]
