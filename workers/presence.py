"""A job worker's side of GPU routing: which device it has, which queues it takes, its
announcement in the deployment's registry (read by dispatch: service.core.routing), and its share of
the machine's cores."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

from service.core.events import redis_client
from service.core.routing import announced, job_queues, registry
from service.core.settings import Settings

log = logging.getLogger(__name__)
ANNOUNCE_TTL_S = 30
ANNOUNCE_EVERY_S = 10.0


def worker_device(settings: Settings) -> str:
    if settings.worker_device != "auto":
        return settings.worker_device
    # Looked up without touching CUDA: the worker's parent process forks the pool and must not hold a context.
    return "cuda" if Path("/dev/nvidia0").exists() or any(Path("/proc/driver/nvidia/gpus").glob("*")) else "cpu"


def consumed_queues(settings: Settings) -> list[str]:
    return job_queues(settings)[::-1] if worker_device(settings) == "cuda" else [settings.queue_name]


def announce(settings: Settings, hostname: str, stop: threading.Event) -> threading.Thread:
    """Keep this worker announced until `stop` is set (a daemon thread in the worker's parent)."""
    member = f"{worker_device(settings)} {hostname}"

    def loop() -> None:
        while True:
            try:
                now = time.time()
                redis_client(settings).zadd(registry(settings), {member: now + ANNOUNCE_TTL_S})
                # Entries of workers that died without leaving lapse; any live worker sweeps them.
                redis_client(settings).zremrangebyscore(registry(settings), "-inf", now)
            except Exception:  # the broker blinked; the next beat announces again
                log.warning("could not announce worker %s", hostname, exc_info=True)
            if stop.wait(ANNOUNCE_EVERY_S):
                break
        try:
            redis_client(settings).zrem(registry(settings), member)
        except Exception:  # noqa: BLE001 - the announcement lapses on its own
            pass

    thread = threading.Thread(target=loop, daemon=True, name="announce")
    thread.start()
    return thread


def job_workers_on_this_machine(settings: Settings) -> int:
    """Job workers announced from this machine (Celery node names end with @<host>)."""
    host = socket.gethostname()
    return sum(1 for _device, node in announced(settings) if node.rsplit("@", 1)[-1] == host)


def job_threads(settings: Settings) -> int:
    """CPU threads a job may use: MODELSHRINK_JOB_THREADS, else this machine's cores shared evenly by
    the job workers running on it."""
    if settings.job_threads:
        return settings.job_threads
    try:
        workers = job_workers_on_this_machine(settings)
    except Exception:  # noqa: BLE001 - the broker blinked: assume this worker is alone
        workers = 1
    return max(1, (os.cpu_count() or 1) // max(1, workers))
