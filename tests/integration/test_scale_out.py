"""Two worker processes against the scale-out configuration (PostgreSQL on 5432, Redis on 6379, one
artifact store): jobs spread over both, each job says which worker ran it, and a worker killed
mid-job loses nothing: the other finishes it, and no job runs twice."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from service.core.settings import Settings
from tests.builders import mlp, to_bytes
from tests.conftest import authed_client, wait_for
from tests.integration.test_job_lifecycle import backend_settings, follow, job_state

# A few seconds per job: long enough that both workers are busy at once.
MEASURE = {"warmup": 0, "runs": 4000, "batch_sizes": [1]}


@pytest.fixture
def scale_out(tmp_path: Path) -> Settings:
    return backend_settings("postgres+redis", tmp_path, None)


def _node(worker: str) -> str:
    return worker.split(" pid ")[0]


def test_jobs_spread_over_two_workers_and_each_runs_once(scale_out: Settings, start_worker) -> None:
    start_worker(scale_out)
    start_worker(scale_out)
    with authed_client(scale_out, tenant=f"t-{uuid.uuid4().hex[:8]}") as client:
        model_id = client.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp()))}).json()["id"]
        body = {"model_id": model_id, "steps": [{"method": "quantize", "mode": "fp16"}], "measure": MEASURE}
        job_ids = [client.post("/v1/jobs", json=body).json()["id"] for _ in range(2)]
        # The tenant's fair-dispatch cap is 2 in flight: with two idle workers both start at once.
        wait_for(lambda: all(job_state(client, j)["status"] == "running" for j in job_ids), timeout=60)
        jobs = [follow(client, j)[0] for j in job_ids]
    assert all(j["status"] == "succeeded" and j["attempts"] == 1 for j in jobs)
    assert len({_node(j["worker"]) for j in jobs}) == 2, [j["worker"] for j in jobs]


def test_a_worker_killed_mid_job_loses_nothing(scale_out: Settings, start_worker) -> None:
    workers = [start_worker(scale_out), start_worker(scale_out)]
    with authed_client(scale_out, tenant=f"t-{uuid.uuid4().hex[:8]}") as client:
        model_id = client.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp()))}).json()["id"]
        body = {"model_id": model_id, "steps": [{"method": "quantize", "mode": "int8_dynamic"}], "measure": {**MEASURE, "runs": 30000}}
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        running = wait_for(lambda: (lambda j: j if j["status"] == "running" and j["worker"] else None)(job_state(client, job_id)))
        victim = next(w for w in workers if w.node in running["worker"])
        victim.kill()
        job, _ = follow(client, job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2  # the killed delivery and the one that finished it
    assert _node(job["worker"]) != _node(running["worker"])
