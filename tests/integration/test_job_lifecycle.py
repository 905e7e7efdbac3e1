"""The whole job lifecycle on real pieces: a real Celery worker process, real Redis (embedded, and
the running server on 6379), the job store on SQLite and on PostgreSQL, real ONNX Runtime, real files."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from service.core.settings import Settings
from service.core.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from tests.builders import cnn, dataset_npz, mlp, to_bytes
from tests.webhook_receiver import webhook_receiver
from tests.conftest import POSTGRES, authed_client, fast_settings, make_client, postgres_available, system_redis_available, wait_for

pytestmark = pytest.mark.integration
QUICK_MEASURE = {"warmup": 1, "runs": 5, "batch_sizes": [1, 8]}
# Long enough to be caught mid-run: the measuring phase reports progress every 10 runs.
SLOW_MEASURE = {"warmup": 0, "runs": 30000, "batch_sizes": [1]}


def follow(client: TestClient, job_id: str, kind: str = "jobs") -> tuple[dict, list[dict]]:
    """Read a job's (kind="searches": a search's) server-sent events to the end; return the final
    object and the progress events."""
    events, final = [], None
    with client.stream("GET", f"/v1/{kind}/{job_id}/events") as response:
        assert response.status_code == 200
        event = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data = json.loads(line.split(":", 1)[1])
                if event == "end":
                    final = data
                    break
                events.append(data)
    return final, events


def upload(client: TestClient, model: onnx.ModelProto, samples: int = 64, labels: bool = True) -> tuple[str, str]:
    model_id = client.post("/v1/models", files={"file": ("model.onnx", to_bytes(model))}).json()["id"]
    dataset = client.post("/v1/datasets", files={"file": ("data.npz", dataset_npz(model, samples=samples, labels=labels))})
    assert dataset.status_code == 201, dataset.text
    return model_id, dataset.json()["id"]


def job_state(client: TestClient, job_id: str) -> dict:
    return client.get(f"/v1/jobs/{job_id}").json()


def backend_settings(name: str, tmp_path: Path, embedded: Settings | None) -> Settings:
    if name == "sqlite+embedded-redis":
        return embedded
    if not (postgres_available() and system_redis_available()):
        if os.environ.get("MODELSHRINK_TEST_REQUIRE_SERVICES"):
            pytest.fail("PostgreSQL on 5432 and Redis on 6379 must be running (scripts/ensure-services.sh)")
        pytest.skip("PostgreSQL on 5432 and Redis on 6379 are needed for the scale-out configuration")
    return fast_settings(tmp_path, database_url=POSTGRES)


@pytest.fixture(params=["sqlite+embedded-redis", "postgres+redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    embedded = request.getfixturevalue("embedded_redis") if request.param == "sqlite+embedded-redis" else None
    return backend_settings(request.param, tmp_path, embedded)


def test_int8_job_end_to_end(backend: Settings, start_worker) -> None:
    start_worker(backend)
    with authed_client(backend, tenant=f't-{uuid.uuid4().hex[:8]}') as client:
        model = mlp(in_features=32, hidden=128)
        model_id, dataset_id = upload(client, model, samples=128)
        body = {
            "model_id": model_id,
            "dataset_id": dataset_id,
            "steps": [{"method": "quantize", "mode": "int8_static", "calibration": {"method": "minmax", "max_samples": 64}}],
            "measure": QUICK_MEASURE,
        }
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        job, events = follow(client, job_id)

        assert job["status"] == "succeeded", job["error"]
        fractions = [e["progress"]["fraction"] for e in events]
        assert fractions == sorted(fractions) and len(events) >= 2
        assert {e["status"] for e in events} >= {"running"}
        metrics = job["metrics"]
        original, compressed = metrics["original"], metrics["compressed"]
        assert original["size_bytes"] == client.get(f"/v1/models/{model_id}").json()["size_bytes"]
        assert compressed["size_bytes"] < original["size_bytes"] / 2, metrics["step_reports"][0]
        assert metrics["compression_ratio"] == pytest.approx(original["size_bytes"] / compressed["size_bytes"])
        assert metrics["speedup"] == pytest.approx(original["latency_ms"]["p50"] / compressed["latency_ms"]["p50"])
        assert [b["batch"] for b in original["latency_by_batch"]] == [1, 8]
        assert original["accuracy"] == 1.0 and 0.8 <= compressed["accuracy"] <= 1.0
        assert compressed["fidelity"]["cosine"] > 0.98
        assert metrics["evaluation"]["data"] == "dataset" and metrics["evaluation"]["samples"] == 128
        assert metrics["step_reports"][0]["calibration"] == {"method": "minmax", "samples": 64}

        artifacts = {a["name"]: a for a in job["artifacts"]}
        assert set(artifacts) == {"model.onnx", "report.json"}
        download = client.get(f"/v1/jobs/{job_id}/artifacts/model.onnx")
        assert download.status_code == 200
        assert hashlib.sha256(download.content).hexdigest() == artifacts["model.onnx"]["sha256"]
        assert len(download.content) == compressed["size_bytes"]
        no_url = client.get(f"/v1/jobs/{job_id}/artifacts/model.onnx/url")  # files on disk: no presigned URL
        assert no_url.status_code == 409 and no_url.json()["error"]["code"] == "presigned_unavailable"
        onnx.checker.check_model(onnx.load_model_from_string(download.content))
        session = ort.InferenceSession(download.content, providers=["CPUExecutionProvider"])
        assert session.run(None, {"x": np.zeros((3, 32), np.float32)})[0].shape == (3, 4)
        report = client.get(f"/v1/jobs/{job_id}/artifacts/report.json").json()
        assert report["metrics"]["compressed"]["size_bytes"] == compressed["size_bytes"]

    # A restarted API (a new app on the same store) still has every job and artifact.
    with make_client(backend) as again:
        again.headers["Authorization"] = client.headers["Authorization"]
        assert again.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
        assert again.get(f"/v1/jobs/{job_id}/artifacts/model.onnx").content == download.content


def test_conv_net_job_without_dataset_uses_synthetic_data_and_flags_slowdowns(embedded_redis: Settings, start_worker) -> None:
    start_worker(embedded_redis)
    with authed_client(embedded_redis) as client:
        model_id = client.post("/v1/models", files={"file": ("cnn.onnx", to_bytes(cnn()))}).json()["id"]
        body = {"model_id": model_id, "steps": [{"method": "quantize", "mode": "int8_dynamic", "per_channel": False}], "measure": QUICK_MEASURE}
        job, _ = follow(client, client.post("/v1/jobs", json=body).json()["id"])
        assert job["status"] == "succeeded", job["error"]
        metrics = job["metrics"]
        assert metrics["evaluation"]["data"] == "synthetic" and metrics["compressed"]["accuracy"] is None
        # "Slower" only beyond the 5% that interleaved timing still wobbles by.
        slower = [b for o, b in zip(metrics["original"]["latency_by_batch"], metrics["compressed"]["latency_by_batch"]) if b["p50"] > 1.05 * o["p50"]]
        assert len([w for w in metrics["warnings"] if "slower" in w]) == len(slower)
        assert metrics["evaluation"]["synthetic"].startswith("no dataset: synthetic inputs (x: standard normal [1, 8, 8]")


def test_cancel_running_job(embedded_redis: Settings, start_worker) -> None:
    start_worker(embedded_redis)
    with authed_client(embedded_redis) as client:
        model_id = client.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp()))}).json()["id"]
        # Long enough that the cancel lands inside the measurement even on a loaded machine (30,000
        # runs of this MLP took under a second, and the poll could see the message late).
        body = {"model_id": model_id, "steps": [{"method": "quantize", "mode": "int8_dynamic"}], "measure": {**SLOW_MEASURE, "runs": 100_000}}
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        # The pipeline's own before/after timing (SLOW_MEASURE: long), not the quantize step's candidate timing.
        wait_for(lambda: "both models, interleaved" in (job_state(client, job_id)["progress"]["message"] or ""))
        response = client.post(f"/v1/jobs/{job_id}/cancel")
        assert response.status_code == 202 and response.json()["cancel_requested"] is True
        job, _ = follow(client, job_id)
        assert job["status"] == "cancelled" and job["error"]["code"] == "cancelled"
        assert job["artifacts"] == []


def test_cancelled_queued_job_never_starts(settings: Settings, start_worker) -> None:
    with authed_client(settings) as client:
        model_id = client.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp()))}).json()["id"]
        body = {"model_id": model_id, "steps": [{"method": "quantize", "mode": "fp16"}], "measure": QUICK_MEASURE}
        cancelled = client.post("/v1/jobs", json=body).json()["id"]
        assert client.post(f"/v1/jobs/{cancelled}/cancel").json()["status"] == "cancelled"
        later = client.post("/v1/jobs", json=body).json()["id"]
        start_worker(settings)  # consumes the queue in order: the cancelled job's message comes first
        assert follow(client, later)[0]["status"] == "succeeded"
        job = job_state(client, cancelled)
        assert job["status"] == "cancelled" and job["started_at"] is None and job["attempts"] == 0


def test_killed_worker_job_is_redelivered_and_succeeds(settings: Settings, start_worker) -> None:
    first = start_worker(settings)
    with authed_client(settings) as client:
        model_id = client.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp()))}).json()["id"]
        body = {"model_id": model_id, "steps": [{"method": "quantize", "mode": "int8_dynamic"}], "measure": {**SLOW_MEASURE, "runs": 6000}}
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        wait_for(lambda: job_state(client, job_id)["status"] == "running")
        first.kill()
        assert job_state(client, job_id)["status"] == "running"
        start_worker(settings)
        job, _ = follow(client, job_id)
        assert job["status"] == "succeeded", job["error"]
        assert job["attempts"] == 2


def test_job_fails_after_max_attempts_instead_of_hanging(tmp_path: Path, start_worker) -> None:
    settings = fast_settings(tmp_path, max_attempts=1)
    first = start_worker(settings)
    with authed_client(settings) as client:
        model_id = client.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp()))}).json()["id"]
        body = {"model_id": model_id, "steps": [{"method": "quantize", "mode": "int8_dynamic"}], "measure": SLOW_MEASURE}
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        wait_for(lambda: job_state(client, job_id)["status"] == "running")
        first.kill()
        start_worker(settings)
        job, _ = follow(client, job_id)
        assert job["status"] == "failed"
        assert job["error"]["code"] == "worker_lost" and "stopped 1 times" in job["error"]["message"]
    settings_redis = __import__("redis").Redis.from_url(settings.resolved_broker_url)
    settings_redis.delete(settings.queue_name)


def test_webhook_is_delivered_signed_when_the_job_ends(settings: Settings, start_worker) -> None:
    start_worker(settings)
    start_worker(settings, role="webhooks")
    with webhook_receiver(path="/hooks/modelshrink") as hook, authed_client(settings) as client:
        model_id = client.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp()))}).json()["id"]
        body = {"model_id": model_id, "steps": [{"method": "quantize", "mode": "fp16"}], "measure": QUICK_MEASURE, "webhook_url": hook.url}
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        assert hook.arrived.wait(90), "the webhook never arrived"
    payload = json.loads(hook.body)
    assert payload["id"] == job_id and payload["status"] == "succeeded"
    assert hook.headers[SIGNATURE_HEADER] == sign(hook.body, hook.headers[TIMESTAMP_HEADER], settings.webhook_secret)


def test_readyz_sees_the_worker(embedded_redis: Settings, start_worker) -> None:
    with make_client(embedded_redis) as client:
        wait_for(lambda: "workers" in client.get("/readyz").json()["checks"])
        response = client.get("/readyz")
        assert response.status_code == 503 and response.json()["checks"]["workers"] == {"ok": False, "count": 0}
        start_worker(embedded_redis)
        response = wait_for(lambda: (r := client.get("/readyz")).status_code == 200 and r)
        assert response.json()["checks"] == {"database": {"ok": True}, "broker": {"ok": True}, "workers": {"ok": True, "count": 1}}
        assert response.json()["age_s"] < 5


def test_prune_job_reports_epochs_and_honours_cancel(settings: Settings, start_worker) -> None:
    start_worker(settings)
    with authed_client(settings) as client:
        model = mlp(in_features=32, hidden=128)
        model_id, dataset_id = upload(client, model, samples=256)
        step = {"method": "prune", "kind": "unstructured", "amount": 0.8, "iterations": 2, "finetune_epochs": 2}
        body = {"model_id": model_id, "dataset_id": dataset_id, "steps": [step], "measure": QUICK_MEASURE}
        job, events = follow(client, client.post("/v1/jobs", json=body).json()["id"])
        assert job["status"] == "succeeded", job["error"]
        messages = [e["progress"]["message"] for e in events]
        assert any("round 2/2: fine-tuned epoch 2/2" in m for m in messages)
        original, compressed = job["metrics"]["original"], job["metrics"]["compressed"]
        assert compressed["parameters"] == original["parameters"]
        assert compressed["nonzero_parameters"] < 0.35 * original["nonzero_parameters"]
        assert compressed["size_bytes"] < original["size_bytes"] / 2
        assert job["metrics"]["step_reports"][0]["rounds"][1]["sparsity"] == pytest.approx(0.8, abs=0.01)

        long_step = {**step, "iterations": 1, "finetune_epochs": 1000}
        job_id = client.post("/v1/jobs", json={**body, "steps": [long_step]}).json()["id"]
        wait_for(lambda: "fine-tuned epoch" in (job_state(client, job_id)["progress"]["message"] or ""))
        client.post(f"/v1/jobs/{job_id}/cancel")
        job, _ = follow(client, job_id)
        assert job["status"] == "cancelled"


def test_distill_cnn_into_half_width_student_over_http(settings: Settings, start_worker) -> None:
    start_worker(settings)
    with authed_client(settings) as client:
        teacher = cnn(channels=16)
        model_id, dataset_id = upload(client, teacher, samples=256)
        step = {"method": "distill", "student": {"kind": "width", "width": 0.5}, "epochs": 3, "compare_baseline": True}
        job, events = follow(client, client.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "steps": [step], "measure": QUICK_MEASURE}).json()["id"])
        assert job["status"] == "succeeded", job["error"]
        assert sum("distilling: epoch" in e["progress"]["message"] for e in events) == 3
        report = job["metrics"]["step_reports"][0]
        assert report["student_parameters"] < report["teacher_parameters"] / 2
        assert "baseline_from_scratch" in report
        metrics = job["metrics"]
        assert metrics["compressed"]["parameters"] < metrics["original"]["parameters"] / 2
        assert metrics["compressed"]["fidelity"]["top1_agreement"] is not None


@pytest.mark.parametrize("step", [
    {"method": "quantize", "mode": "int4_weight_only"},
    {"method": "quantize", "mode": "binary", "binary_keep_first_last": False, "finetune_epochs": 1},
    {"method": "cluster", "bits": 4},
], ids=["int4", "binary", "cluster"])
def test_low_bit_steps_end_to_end(settings: Settings, start_worker, step: dict) -> None:
    start_worker(settings)
    with authed_client(settings) as client:
        model_id, dataset_id = upload(client, mlp(in_features=128, hidden=256), samples=128)
        body = {"model_id": model_id, "dataset_id": dataset_id, "steps": [step], "measure": QUICK_MEASURE}
        job, _ = follow(client, client.post("/v1/jobs", json=body).json()["id"])
        assert job["status"] == "succeeded", job["error"]
        metrics = job["metrics"]
        assert metrics["compression_ratio"] > 3
        assert metrics["compressed"]["accuracy"] is not None  # honest accuracy, whatever it is
        assert metrics["compressed"]["parameters"] >= 128 * 256  # counted on the dense weights the runtime uses
