"""GPU routing with real workers: a training job goes to the worker that announced a GPU, other jobs
to any worker; with no GPU worker running, training runs on the CPU workers, and a job left in the
GPU queue by a GPU worker that stopped is moved back by the reconciler.

No GPU here: the "GPU" worker is a real worker started with MODELSHRINK_WORKER_DEVICE=cuda (its
training falls back to the CPU, as torch finds no CUDA device); what is under test is the routing."""

from __future__ import annotations

import pytest

from service.core.events import redis_client
from service.core.reconciler import reconcile
from service.core.routing import cuda_queue, workers_by_device
from service.core.settings import Settings
from tests.builders import mlp
from tests.conftest import authed_client, wait_for
from tests.integration.test_job_lifecycle import QUICK_MEASURE, follow, upload

pytestmark = pytest.mark.integration
TRAIN = {"method": "prune", "amount": 0.5, "finetune_epochs": 1}
NO_TRAINING = {"method": "quantize", "mode": "fp16"}


def test_training_goes_to_the_gpu_worker_and_the_rest_anywhere(settings: Settings, start_worker) -> None:
    cpu = start_worker(settings.model_copy(update={"worker_device": "cpu"}))
    gpu = start_worker(settings.model_copy(update={"worker_device": "cuda"}))
    wait_for(lambda: workers_by_device(settings) == {"cpu": 1, "cuda": 1}, timeout=30)
    with authed_client(settings) as client:
        model_id, dataset_id = upload(client, mlp())
        trained = [client.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "steps": [TRAIN], "measure": QUICK_MEASURE}).json()["id"]
                   for _ in range(3)]
        plain = client.post("/v1/jobs", json={"model_id": model_id, "steps": [NO_TRAINING], "measure": QUICK_MEASURE}).json()["id"]
        finished = {job_id: follow(client, job_id)[0] for job_id in trained + [plain]}
    assert all(job["status"] == "succeeded" for job in finished.values())
    for job_id in trained:
        assert finished[job_id]["worker"].startswith(gpu.node), finished[job_id]["worker"]
    assert finished[plain]["worker"].startswith((cpu.node, gpu.node))


def test_without_a_gpu_worker_training_runs_on_cpu_and_stranded_jobs_come_back(settings: Settings, start_worker) -> None:
    gpu = start_worker(settings.model_copy(update={"worker_device": "cuda"}))
    wait_for(lambda: workers_by_device(settings)["cuda"] == 1, timeout=30)
    gpu.stop()  # a clean stop takes its announcement down with it
    wait_for(lambda: workers_by_device(settings)["cuda"] == 0, timeout=30)
    # The app's own reconciler (every second under test settings) would reroute the stranded job
    # before this test's explicit pass could report it: an hour's interval leaves the pass to the test.
    with authed_client(settings.model_copy(update={"reconcile_interval_s": 3600.0})) as client:
        model_id, dataset_id = upload(client, mlp())
        # A job a GPU worker would have taken, stranded in the GPU queue: put there by hand, as a
        # dispatch just before the GPU worker stopped would have.
        stranded = client.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "steps": [TRAIN], "measure": QUICK_MEASURE}).json()["id"]
        queued = redis_client(settings).lrange(settings.queue_name, 0, -1)
        assert len(queued) == 1  # routed to the shared queue: no GPU worker runs
        redis_client(settings).lmove(settings.queue_name, cuda_queue(settings), "LEFT", "LEFT")
        assert reconcile(settings)["rerouted"] == [stranded]
        cpu = start_worker(settings.model_copy(update={"worker_device": "cpu"}))
        job, _ = follow(client, stranded)
    assert job["status"] == "succeeded" and job["worker"].startswith(cpu.node)
