"""The worker's Celery app: the shared configuration plus this package's tasks.

Run: celery -A workers.celery_app worker (or `modelshrink worker`). Torch and ONNX Runtime are
imported inside tasks, i.e. in the prefork child, never in the parent that forks it.
"""

import logging
import threading
from typing import Any

from celery.signals import worker_ready, worker_shutting_down

from service.core.artifacts import remove_older_than
from service.core.queue import make_celery
from service.core.routing import job_queues
from workers.presence import announce
from service.core.settings import get_settings

app = make_celery(get_settings())
app.conf.imports = ("workers.tasks",)


_stop_announcing = threading.Event()


@worker_ready.connect
def _announce(sender: Any = None, **_: object) -> None:
    # Job workers (not the webhook deliverer) say which device they train on, so training jobs are
    # routed to GPU workers. The sender is the worker's consumer.
    consumed = set(sender.app.amqp.queues.consume_from) if sender is not None else set()
    if consumed & set(job_queues(get_settings())):
        announce(get_settings(), str(sender.hostname), _stop_announcing)


@worker_shutting_down.connect
def _stop(**_: object) -> None:
    _stop_announcing.set()


@worker_ready.connect
def _remove_stale_work_dirs(**_: object) -> None:
    # Work directories of jobs whose worker was killed. No job outlives its time limit, so one older
    # than that is nobody's, even with other workers sharing this data directory.
    settings = get_settings()
    removed = remove_older_than(settings.resolved_work_dir, "modelshrink-*", settings.job_time_limit_s + 600)
    if removed:
        logging.getLogger(__name__).warning("removed %d work directories left by killed jobs", removed)
