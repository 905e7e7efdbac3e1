"""Every /v1 request needs a key; a tenant sees only its own resources."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.core.settings import Settings
from tests.builders import mlp, to_bytes
from tests.conftest import new_key


def test_missing_and_wrong_keys_are_401(client: TestClient) -> None:
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer msk_not-a-key"}, {"Authorization": "Basic abc"}):
        response = client.get("/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"


def test_keys_are_stored_hashed(client: TestClient, settings: Settings) -> None:
    from sqlalchemy import select

    from service.core.db import session_scope
    from service.core.tables import ApiKey

    key = client.headers["Authorization"].removeprefix("Bearer ")
    with session_scope(settings.resolved_database_url) as session:
        hashes = session.scalars(select(ApiKey.key_hash)).all()
    assert key not in hashes and all(len(h) == 64 for h in hashes)


def test_another_tenants_ids_answer_404(client: TestClient, settings: Settings) -> None:
    model_id = client.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp()))}).json()["id"]
    other = {"Authorization": f"Bearer {new_key(settings, tenant='globex')}"}
    assert client.get(f"/v1/models/{model_id}", headers=other).status_code == 404
    assert client.delete(f"/v1/models/{model_id}", headers=other).status_code == 404
    assert client.get("/v1/models", headers=other).json()["count"] == 0
    response = client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"method": "quantize"}]}, headers=other)
    assert response.status_code == 404
    assert client.get(f"/v1/models/{model_id}").status_code == 200


def test_unknown_ids_answer_404(client: TestClient) -> None:
    for path in ("/v1/models/mdl_x", "/v1/datasets/ds_x", "/v1/jobs/job_x", "/v1/jobs/job_x/artifacts/model.onnx"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"
    assert client.post("/v1/jobs/job_x/cancel").status_code == 404


def test_health_needs_no_key(client: TestClient) -> None:
    assert client.get("/healthz", headers={"Authorization": ""}).json() == {"status": "ok"}
