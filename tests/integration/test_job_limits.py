"""A job cannot take the worker with it: memory and time limits, and a cancel that stops a job stuck
inside one ONNX Runtime call. Real worker process, real Redis, hostile but tiny models."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.builders import mlp, to_bytes
from tests.conftest import authed_client, fast_settings, wait_for
from tests.hostile_models import memory_bomb, time_bomb, trigger_npz
from tests.integration.test_job_lifecycle import QUICK_MEASURE, follow, job_state

pytestmark = pytest.mark.integration
STEP = {"method": "quantize", "mode": "int8_dynamic"}


def _submit_hostile(client, model, trigger: float, **extra) -> str:
    model_id = client.post("/v1/models", files={"file": ("hostile.onnx", to_bytes(model))}).json()["id"]
    dataset = client.post("/v1/datasets", files={"file": ("trigger.npz", trigger_npz(trigger))})
    assert dataset.status_code == 201, dataset.text
    body = {"model_id": model_id, "dataset_id": dataset.json()["id"], "steps": [STEP], "measure": QUICK_MEASURE, **extra}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _another_tenant_job_succeeds(settings) -> None:
    with authed_client(settings, tenant=f"other-{uuid.uuid4().hex[:6]}") as other:
        model_id = other.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp()))}).json()["id"]
        job_id = other.post("/v1/jobs", json={"model_id": model_id, "steps": [STEP], "measure": QUICK_MEASURE}).json()["id"]
        job, _ = follow(other, job_id)
        assert job["status"] == "succeeded", job["error"]


def test_memory_bomb_fails_with_resource_limit_and_the_worker_carries_on(tmp_path: Path, start_worker) -> None:
    settings = fast_settings(tmp_path, job_memory_limit_bytes=1536 * 1024**2)
    start_worker(settings)
    with authed_client(settings) as client:
        # 3e9 floats = 12 GB if nothing stopped it.
        job, _ = follow(client, _submit_hostile(client, memory_bomb(), 3e9))
    assert job["status"] == "failed"
    assert job["error"]["code"] == "resource_limit" and "1536 MiB" in job["error"]["message"]
    _another_tenant_job_succeeds(settings)


def test_time_limit_set_by_the_job_stops_a_runaway_loop(tmp_path: Path, start_worker) -> None:
    settings = fast_settings(tmp_path)
    start_worker(settings)
    with authed_client(settings) as client:
        job_id = _submit_hostile(client, time_bomb(), 1e15, limits={"time_limit_s": 15})
        job, _ = follow(client, job_id)
    assert job["status"] == "failed"
    assert job["error"] == {"code": "timed_out", "message": "the job ran longer than its time limit of 15 s and was stopped"}
    _another_tenant_job_succeeds(settings)


def test_cancel_stops_a_job_stuck_inside_onnx_runtime(tmp_path: Path, start_worker) -> None:
    settings = fast_settings(tmp_path, cancel_grace_s=1.0)
    start_worker(settings)
    with authed_client(settings) as client:
        job_id = _submit_hostile(client, time_bomb(), 1e15)
        # The next thing it does is run the original model on the data, which never returns: quantize
        # measures its candidates against the original (or, for other steps, the final measurement does).
        def inside_the_original() -> bool:
            progress = job_state(client, job_id)["progress"]
            return progress["step"] in ("validate", "measure") or "measuring the original" in (progress["message"] or "")

        wait_for(inside_the_original, timeout=90)
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        job, _ = follow(client, job_id)
    assert job["status"] == "cancelled" and job["error"]["code"] == "cancelled"
    _another_tenant_job_succeeds(settings)


def test_limits_above_the_operators_caps_are_refused(tmp_path: Path) -> None:
    settings = fast_settings(tmp_path, job_time_limit_s=60, job_memory_limit_bytes=1024**3)
    with authed_client(settings) as client:
        model_id = client.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp()))}).json()["id"]
        for limits, field in (({"time_limit_s": 61}, "time_limit_s"), ({"memory_limit_mb": 1025}, "memory_limit_mb")):
            response = client.post("/v1/jobs", json={"model_id": model_id, "steps": [STEP], "limits": limits})
            assert response.status_code == 422
            assert response.json()["error"]["code"] == "limit_too_high" and field in response.json()["error"]["message"]
