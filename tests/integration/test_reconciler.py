"""Jobs the queue forgot are found and finished: a job whose broker message was lost is re-queued;
a cancelled job whose worker died ends as cancelled and frees its model. Real worker, real Redis."""

from __future__ import annotations

import redis

from service.core.settings import Settings
from tests.builders import mlp, to_bytes
from tests.conftest import authed_client, wait_for
from tests.integration.test_job_lifecycle import QUICK_MEASURE, SLOW_MEASURE, follow, job_state
import pytest

pytestmark = pytest.mark.integration


def test_a_job_whose_message_was_lost_is_requeued_and_runs(settings: Settings, start_worker) -> None:
    with authed_client(settings) as client:
        model_id = client.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp()))}).json()["id"]
        job_id = client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"method": "quantize", "mode": "fp16"}], "measure": QUICK_MEASURE}).json()["id"]
        # As when a worker took the message while the database was down and the task failed: the
        # message is gone, the row still says queued.
        assert redis.Redis.from_url(settings.resolved_broker_url).delete(settings.queue_name) == 1
        start_worker(settings)
        job, _ = follow(client, job_id)
        assert job["status"] == "succeeded", job["error"]
        assert job["attempts"] == 1


def test_a_cancelled_job_whose_worker_died_ends_cancelled_and_frees_its_model(settings: Settings, start_worker) -> None:
    worker = start_worker(settings)
    with authed_client(settings) as client:
        model_id = client.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp()))}).json()["id"]
        job_id = client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"method": "quantize", "mode": "int8_dynamic"}], "measure": SLOW_MEASURE}).json()["id"]
        wait_for(lambda: job_state(client, job_id)["status"] == "running")
        worker.kill()
        assert client.post(f"/v1/jobs/{job_id}/cancel").json()["cancel_requested"] is True
        # No worker is left to see the cancel: the reconciler ends the job once its lease has lapsed.
        job, _ = follow(client, job_id)
        assert job["status"] == "cancelled" and job["error"]["code"] == "cancelled"
        assert client.delete(f"/v1/models/{model_id}").status_code == 204


def test_a_model_used_as_a_student_by_a_queued_job_cannot_be_deleted(settings: Settings) -> None:
    from tests.builders import dataset_npz

    with authed_client(settings) as client:
        teacher = client.post("/v1/models", files={"file": ("t.onnx", to_bytes(mlp(hidden=64)))}).json()["id"]
        student = client.post("/v1/models", files={"file": ("s.onnx", to_bytes(mlp(hidden=16)))}).json()["id"]
        dataset = client.post("/v1/datasets", files={"file": ("d.npz", dataset_npz(mlp(hidden=64)))}).json()["id"]
        step = {"method": "distill", "student_model_id": student, "epochs": 1}
        response = client.post("/v1/jobs", json={"model_id": teacher, "dataset_id": dataset, "steps": [step]})
        assert response.status_code == 202, response.text
        refused = client.delete(f"/v1/models/{student}")
        assert refused.status_code == 409 and "1 queued or running job" in refused.json()["error"]["message"]
        client.post(f"/v1/jobs/{response.json()['id']}/cancel")
        assert client.delete(f"/v1/models/{student}").status_code == 204


def test_a_job_started_while_the_database_is_locked_runs_once_it_is_free(tmp_path, start_worker) -> None:
    import sqlite3

    from tests.conftest import fast_settings

    db = tmp_path / "locked.db"
    settings = fast_settings(tmp_path, database_url=f"sqlite:///{db}?timeout=0.5")
    with authed_client(settings) as client:
        model_id = client.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp()))}).json()["id"]
        job_id = client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"method": "quantize", "mode": "fp16"}], "measure": QUICK_MEASURE}).json()["id"]
        lock = sqlite3.connect(db, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")  # every writer now fails after its 0.5 s busy timeout
        worker = start_worker(settings)
        log = tmp_path / "worker0.log"
        try:
            # Unavailable for two tries in a row: the job must survive more than one.
            wait_for(lambda: log.read_bytes().count(b"job store unavailable") >= 2, timeout=60)
        finally:
            lock.execute("COMMIT")
            lock.close()
        job, _ = follow(client, job_id)
        assert job["status"] == "succeeded", job["error"]
        assert job["attempts"] == 1
        worker.stop()
