"""The worker's Celery app: the shared configuration plus this package's tasks.

Run: celery -A workers.celery_app worker (or `modelshrink worker`). Torch and ONNX Runtime are
imported inside tasks, i.e. in the prefork child, never in the parent that forks it.
"""

from service.core.queue import make_celery
from service.core.settings import get_settings

app = make_celery(get_settings())
app.conf.imports = ("workers.tasks",)
