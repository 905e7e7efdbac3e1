"""The Celery app as the API sees it: configuration and enqueue-by-name, no task code, no torch.

Workers import the same `make_celery` so producer and consumer agree on broker options.
"""

from __future__ import annotations

from celery import Celery

from service.core.events import redis_client
from service.core.settings import Settings

RUN_JOB_TASK = "modelshrink.run_job"
DELIVER_WEBHOOK_TASK = "modelshrink.deliver_webhook"


def make_celery(settings: Settings) -> Celery:
    app = Celery("modelshrink", broker=settings.resolved_broker_url)
    app.conf.update(
        task_default_queue=settings.queue_name,
        task_serializer="json",
        accept_content=["json"],
        # The job store is the source of truth; results in Redis would only go stale.
        task_ignore_result=True,
        result_backend=None,
        # A job is acknowledged only when it ends, so a worker that dies mid-job gets it redelivered.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_concurrency,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": settings.unacked_restore_interval_s,
            # Scan for orphaned jobs on every interval rather than every 10th.
            "unacked_restore_throttle": 1,
        },
    )
    return app


_producers: dict[str, Celery] = {}


def _producer(settings: Settings) -> Celery:
    # One Celery app (and connection pool) per distinct configuration; Settings is not hashable.
    key = settings.model_dump_json()
    if key not in _producers:
        _producers[key] = make_celery(settings)
    return _producers[key]


def enqueue_job(settings: Settings, job_id: str, countdown: float | None = None, queue: str | None = None) -> None:
    """On `queue` (default: the shared one); service.core.routing.enqueue_routed picks it by the job's steps."""
    _producer(settings).send_task(RUN_JOB_TASK, args=[job_id], queue=queue or settings.queue_name, countdown=countdown)


def webhook_queue(settings: Settings) -> str:
    return f"{settings.queue_name}.webhooks"


def enqueue_webhook(settings: Settings, job_id: str, countdown: float | None = None) -> None:
    # Its own queue, consumed by a thread-pool worker: a slow endpoint never holds a job worker.
    _producer(settings).send_task(DELIVER_WEBHOOK_TASK, args=[job_id], queue=webhook_queue(settings), countdown=countdown)


def queue_depth(settings: Settings) -> int:
    # redis-py directly, not kombu's bounded connection pool: a burst of scrapes must not queue up on it.
    # Both job queues: the shared one and the GPU one (service.core.routing).
    client = redis_client(settings)
    return int(client.llen(settings.queue_name)) + int(client.llen(f"{settings.queue_name}.cuda"))


def ping_workers(settings: Settings, timeout: float = 1.0) -> int:
    replies = _producer(settings).control.ping(timeout=timeout) or []
    return len(replies)
