"""Job submission over HTTP (no worker running: jobs stay queued)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.builders import cnn, dataset_npz, mlp, to_bytes
from tests.conftest import authed_client, fast_settings


@pytest.fixture
def model_id(client: TestClient) -> str:
    return client.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp()))}).json()["id"]


def test_submit_answers_202_with_location(client: TestClient, model_id: str) -> None:
    response = client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"method": "quantize", "mode": "fp16"}]})
    assert response.status_code == 202
    job = response.json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["progress"]["fraction"] == 0.0
    assert job["steps"][0]["method"] == "quantize" and job["steps"][0]["mode"] == "fp16"
    assert job["metrics"] is None and job["artifacts"] == [] and job["error"] is None
    assert client.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
    assert client.get("/v1/jobs", params={"status": "queued"}).json()["count"] == 1
    assert client.get("/v1/jobs", params={"status": "running"}).json()["count"] == 0


@pytest.mark.parametrize(
    ("step", "fragment"),
    [
        ({"method": "sharpen"}, "sharpen"),
        ({"method": "quantize", "mode": "int3"}, "mode"),
        ({"method": "quantize", "colour": "blue"}, "colour"),
        ({"method": "quantize", "calibration": {"method": "entropy", "num_bins": 128}}, "num_bins"),
        ({"method": "quantize", "mode": "int4_weight_only", "int4_algorithm": "awq"}, "awq is for LLM checkpoints"),
        ({"method": "quantize", "mode": "int8_weight_only"}, "int8_weight_only is for LLM checkpoints"),
    ],
)
def test_bad_specs_are_422(client: TestClient, model_id: str, step: dict, fragment: str) -> None:
    response = client.post("/v1/jobs", json={"model_id": model_id, "steps": [step]})
    assert response.status_code == 422
    assert fragment in response.text


def test_no_steps_is_422(client: TestClient, model_id: str) -> None:
    assert client.post("/v1/jobs", json={"model_id": model_id, "steps": []}).status_code == 422


def test_static_quantization_without_dataset_is_422(client: TestClient, model_id: str) -> None:
    response = client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"method": "quantize", "mode": "int8_static"}]})
    assert response.status_code == 422
    assert "set dataset_id" in response.json()["error"]["message"]
    finetune = {"method": "prune", "amount": 0.5, "finetune_epochs": 1}
    response = client.post("/v1/jobs", json={"model_id": model_id, "steps": [finetune]})
    assert response.status_code == 422 and "steps[0] (prune)" in response.json()["error"]["message"]


def test_dataset_that_does_not_fit_the_model_is_422_naming_the_input(client: TestClient, model_id: str) -> None:
    dataset_id = client.post("/v1/datasets", files={"file": ("d.npz", dataset_npz(cnn(), samples=4))}).json()["id"]
    response = client.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "steps": [{"method": "quantize"}]})
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "model input 'x'" in message and "['N', 16]" in message


def test_webhook_to_a_host_not_allowed_is_422(client: TestClient, model_id: str) -> None:
    body = {"model_id": model_id, "steps": [{"method": "quantize"}], "webhook_url": "http://169.254.169.254/latest/meta-data"}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "webhook_host_not_allowed"


def test_same_idempotency_key_gives_one_job(client: TestClient, model_id: str) -> None:
    body = {"model_id": model_id, "steps": [{"method": "quantize"}]}
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc-1"})
    second = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc-1"})
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert client.get("/v1/jobs").json()["count"] == 1
    changed = client.post("/v1/jobs", json={**body, "steps": [{"method": "quantize", "mode": "fp16"}]}, headers={"Idempotency-Key": "abc-1"})
    assert changed.status_code == 409 and changed.json()["error"]["code"] == "idempotency_key_reused"


def test_cancel_queued_job(client: TestClient, model_id: str) -> None:
    job_id = client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"method": "quantize"}]}).json()["id"]
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202
    job = response.json()
    assert job["status"] == "cancelled" and job["error"]["code"] == "cancelled" and job["finished_at"]
    again = client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409


def test_model_in_use_cannot_be_deleted(client: TestClient, model_id: str) -> None:
    client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"method": "quantize"}]})
    assert client.delete(f"/v1/models/{model_id}").status_code == 409


def test_broker_down_is_503_and_leaves_no_job(tmp_path: Path) -> None:
    settings = fast_settings(tmp_path, broker_url="redis://127.0.0.1:1/0")
    with authed_client(settings) as client:
        model_id = client.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp()))}).json()["id"]
        response = client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"method": "quantize"}]})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "broker_unavailable"
        assert client.get("/v1/jobs").json()["count"] == 0
        assert client.get("/readyz").status_code == 503


def test_methods_are_listed_with_their_schema(client: TestClient) -> None:
    body = client.get("/v1/methods").json()
    quantize = next(m for m in body["data"] if m["name"] == "quantize")
    assert set(quantize["schema"]["properties"]["mode"]["enum"]) == {"auto", "int8_dynamic", "int8_static", "fp16", "int4_weight_only", "int8_weight_only", "binary"}
    from service.core.specs import STEP_TYPES

    listed = [m["name"] for m in body["data"]]
    assert listed == [spec.model_fields["method"].default for spec in STEP_TYPES]  # every discovered method, in listing order
    assert {"quantize", "prune", "distill", "cluster", "huffman", "deep_compression", "low_rank"} <= set(listed)


def test_prometheus_metrics(client: TestClient, model_id: str) -> None:
    client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"method": "quantize"}]})
    text = client.get("/metrics").text
    assert 'modelshrink_jobs{status="queued"} 1.0' in text
    assert "modelshrink_queue_depth 1.0" in text
    assert 'modelshrink_http_requests_total{method="POST",route="/v1/jobs",status="202"}' in text
    assert "modelshrink_job_duration_seconds_bucket" in text


def test_distill_specs_are_checked_at_submit(client: TestClient, model_id: str) -> None:
    unlabelled = client.post("/v1/datasets", files={"file": ("d.npz", dataset_npz(mlp(), samples=8, labels=False))}).json()["id"]
    cases = [
        ({"steps": [{"method": "distill", "temperature": 0}]}, "temperature"),
        ({"steps": [{"method": "distill"}]}, "set dataset_id"),
        ({"dataset_id": unlabelled, "steps": [{"method": "distill", "compare_baseline": True}]}, "labels"),
    ]
    other = client.post("/v1/models", files={"file": ("s.onnx", to_bytes(mlp(in_features=16, classes=3)))}).json()["id"]
    cases.append(({"dataset_id": unlabelled, "steps": [{"method": "distill", "student_model_id": other}]}, "output shape"))
    cases.append(({"dataset_id": unlabelled, "steps": [{"method": "distill", "student_model_id": "mdl_nope"}]}, "not found"))
    for extra, fragment in cases:
        response = client.post("/v1/jobs", json={"model_id": model_id, **extra})
        assert response.status_code in (404, 422), response.text
        assert fragment in response.text, (fragment, response.text)


def test_bundle_steps_must_come_last(client: TestClient, model_id: str) -> None:
    response = client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"method": "huffman"}, {"method": "quantize", "mode": "fp16"}]})
    assert response.status_code == 422 and "must be the last step" in response.json()["error"]["message"]


def test_a_jobs_report_page_is_html_and_only_its_tenants(client: TestClient, model_id: str, settings) -> None:
    from tests.conftest import new_key

    job_id = client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"method": "quantize"}]}).json()["id"]
    page = client.get(f"/v1/jobs/{job_id}/report.html")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert job_id in page.text and "queued" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"] and page.headers["x-content-type-options"] == "nosniff"
    other = {"Authorization": f"Bearer {new_key(settings, tenant='globex')}"}
    assert client.get(f"/v1/jobs/{job_id}/report.html", headers=other).status_code == 404
