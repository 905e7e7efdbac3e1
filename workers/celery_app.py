"""The worker's Celery app: the shared configuration plus this package's tasks.

Run: celery -A workers.celery_app worker (or `modelshrink worker`). Torch and ONNX Runtime are
imported inside tasks, i.e. in the prefork child, never in the parent that forks it.
"""

import logging

from celery.signals import worker_ready

from service.core.artifacts import remove_older_than
from service.core.queue import make_celery
from service.core.settings import get_settings

app = make_celery(get_settings())
app.conf.imports = ("workers.tasks",)


@worker_ready.connect
def _remove_stale_work_dirs(**_: object) -> None:
    # Work directories of jobs whose worker was killed. No job outlives its time limit, so one older
    # than that is nobody's, even with other workers sharing this data directory.
    settings = get_settings()
    removed = remove_older_than(settings.resolved_work_dir, "modelshrink-*", settings.job_time_limit_s + 600)
    if removed:
        logging.getLogger(__name__).warning("removed %d work directories left by killed jobs", removed)
