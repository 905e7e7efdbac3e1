"""GPU routing: jobs that train go to GPU workers while any are running; everything else, and
training when no GPU worker runs, goes to the shared queue every worker takes.

Two Celery queues per deployment: `<queue_name>` and `<queue_name>.cuda`. A CPU worker consumes the
first; a CUDA worker (one process per GPU, CUDA_VISIBLE_DEVICES) consumes both, so a GPU machine is
never idle while CPU work waits, and with prefetch 1 a training job waits behind at most one job per
GPU worker. Workers announce themselves in one Redis sorted set, an entry per process that lapses unless renewed
(workers.presence); dispatch reads them when it routes a job. A training job routed to the CUDA queue
whose GPU workers then all stop is not lost: the reconciler finds it without a consumer and routes
it again (see service.core.reconciler).
"""

from __future__ import annotations

import time
from typing import Any

from service.core.db import session_scope
from service.core.events import redis_client
from service.core.queue import enqueue_job
from service.core.settings import Settings
from service.core.specs import step_adapter
from service.core.tables import Job



def cuda_queue(settings: Settings) -> str:
    return f"{settings.queue_name}.cuda"


def job_queues(settings: Settings) -> list[str]:
    return [settings.queue_name, cuda_queue(settings)]


def registry(settings: Settings) -> str:
    # One sorted set per deployment: member "<device> <celery node>", score the time it lapses. Read
    # with one range query on every routed dispatch (a SCAN over the keyspace would grow with Redis).
    return f"modelshrink:{settings.queue_name}:workers"


def announced(settings: Settings) -> list[tuple[str, str]]:
    """(device, Celery node name) of every job worker whose announcement has not lapsed."""
    members: list[bytes] = redis_client(settings).zrangebyscore(registry(settings), time.time(), "+inf")  # type: ignore[assignment]
    pairs = [m.decode().split(" ", 1) for m in members]
    return [(device, node) for device, node in pairs]


def workers_by_device(settings: Settings) -> dict[str, int]:
    counts: dict[str, int] = {"cpu": 0, "cuda": 0}
    for device, _node in announced(settings):
        counts[device] = counts.get(device, 0) + 1
    return counts


def trains(steps: list[dict[str, Any]], has_dataset: bool) -> bool:
    return any(step_adapter.validate_python(step).trains(has_dataset) for step in steps)


def queue_for(settings: Settings, job: Job) -> str:
    if trains(job.steps, job.dataset_id is not None) and workers_by_device(settings)["cuda"] > 0:
        return cuda_queue(settings)
    return settings.queue_name


def enqueue_routed(settings: Settings, job_id: str, countdown: float | None = None) -> str:
    """Enqueue a job on the queue its steps call for; returns that queue."""
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, job_id)
        queue = queue_for(settings, job) if job is not None else settings.queue_name
    enqueue_job(settings, job_id, countdown=countdown, queue=queue)
    return queue
