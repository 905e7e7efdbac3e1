"""Finds jobs that the queue forgot and puts them back on it, or ends them.

A job can lose its broker message without anyone noticing: the database was unavailable when a
worker took the message (the task failed and the message was acknowledged), the broker lost it, or
the API died between writing the row and enqueueing. A job can also be left `running` with no live
lease: its worker died after the user cancelled. Every `reconcile_interval_s`, one API process (a
Redis lock elects it) looks for

- `queued` jobs, untouched for `reconcile_grace_s`, with no message in the queue or in flight: re-queued;
- `running` jobs whose lease expired over `reconcile_grace_s` ago with no message: re-queued, so a
  worker takes them over (counting the attempt; max_attempts still ends a job that keeps killing workers);
- either kind with a cancel requested and no live lease: ended as `cancelled`;
- tenants with jobs waiting their turn (service.core.dispatch): dispatched up to their allowance;
- searches not yet ended: advanced (service.core.search_driver), which enforces their deadlines;
- jobs in the GPU queue when no GPU worker runs any more: moved to the shared queue (service.core.routing).

A message counts when it sits in the queue list or in kombu's `unacked` hash (delivered, not yet
acknowledged, including retries waiting on a countdown). A duplicate message is harmless: deliveries
take a lease, and one that finds the job ended or leased does nothing lasting.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, or_, select

from service.core.artifacts import open_store
from service.core.retention import sweep
from service.core.db import session_scope
from service.core.dispatch import dispatch, waiting_tenants
from service.core.events import publish, redis_client
from service.core.jobstore import finish
from service.core.queue import RUN_JOB_TASK
from service.core.routing import cuda_queue, enqueue_routed, workers_by_device
from service.core.search_driver import active_searches, advance
from service.core.settings import Settings
from service.core.tables import Job, utcnow

log = logging.getLogger(__name__)
UNACKED_KEY = "unacked"  # kombu's default for the Redis transport


def _job_id_of(envelope: dict[str, Any]) -> str | None:
    headers = envelope.get("headers") or {}
    if headers.get("task") != RUN_JOB_TASK:
        return None
    try:
        body = envelope["body"]
        if (envelope.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if args else None
    except (KeyError, ValueError, IndexError, TypeError):
        return None


def jobs_with_messages(settings: Settings) -> set[str]:
    client = redis_client(settings)
    found = set()
    for raw in client.lrange(settings.queue_name, 0, -1) + client.lrange(cuda_queue(settings), 0, -1):
        job_id = _job_id_of(json.loads(raw))
        if job_id:
            found.add(job_id)
    for raw in client.hvals(UNACKED_KEY):
        try:
            envelope = json.loads(raw)[0]
        except (ValueError, IndexError):
            continue
        job_id = _job_id_of(envelope)
        if job_id:
            found.add(job_id)
    return found


def reroute_without_gpu_workers(settings: Settings) -> list[str]:
    """Jobs waiting in the GPU queue when no GPU worker runs any more go to the shared queue, in order
    (newest first to its consuming end, so the oldest ends up first in line)."""
    client = redis_client(settings)
    moved: list[str] = []
    if workers_by_device(settings)["cuda"] > 0:
        return moved
    while (raw := client.lmove(cuda_queue(settings), settings.queue_name, "LEFT", "RIGHT")) is not None:
        moved.append(_job_id_of(json.loads(raw)) or "?")
    if moved:
        log.warning("no GPU worker runs: moved %d job(s) from the GPU queue to the shared one", len(moved))
    return moved


def reconcile(settings: Settings) -> dict[str, list[str]]:
    """One pass; returns what it did (job ids by action)."""
    now = utcnow()
    before = now - timedelta(seconds=settings.reconcile_grace_s)
    with session_scope(settings.resolved_database_url) as session:
        rows = session.execute(
            select(Job.id, Job.status, Job.cancel_requested).where(
                or_(
                    # Dispatched (or cancelled while waiting): it should have a message by now.
                    and_(Job.status == "queued", Job.updated_at < before, or_(Job.dispatched_at.is_not(None), Job.cancel_requested.is_(True))),
                    and_(Job.status == "running", or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < before)),
                )
            ).limit(1000)
        ).all()
    done: dict[str, list[str]] = {"requeued": [], "cancelled": [], "dispatched": [], "searches": [], "rerouted": [], "artifacts_removed": []}
    try:
        done["rerouted"] = reroute_without_gpu_workers(settings)
    except Exception:  # the rest of the pass (stranded jobs, dispatch) matters more
        log.warning("rerouting the GPU queue failed", exc_info=True)
    for tenant_id in waiting_tenants(settings):
        done["dispatched"] += dispatch(settings, tenant_id)
    # Searches move on when a candidate ends; this pass catches a deadline with nothing running and a
    # call that was lost (a worker dying between finishing a candidate and advancing its search).
    for search_id in active_searches(settings):
        try:
            advance(settings, search_id)
            done["searches"].append(search_id)
        except Exception:  # one search that cannot move must not stop the others or this pass
            log.warning("search %s could not be advanced", search_id, exc_info=True)
    try:
        done["artifacts_removed"] = sweep(settings, open_store(settings))
    except Exception:  # removal waits for the next pass; stranded jobs matter more
        log.warning("removing expired job artifacts failed", exc_info=True)
    if not rows:
        return done
    present = jobs_with_messages(settings)
    for job_id, _status, cancel in rows:
        if cancel:
            with session_scope(settings.resolved_database_url) as session:
                ended = finish(session, job_id, "cancelled", error={"code": "cancelled", "message": "cancelled by the user"},
                               progress={"fraction": 0.0, "step": None, "message": "cancelled"})
            if ended:
                publish(settings, job_id, {"status": "cancelled", "progress": {"fraction": 0.0, "step": None, "message": "cancelled"}})
                done["cancelled"].append(job_id)
        elif job_id not in present:
            enqueue_routed(settings, job_id)
            done["requeued"].append(job_id)
    for action in ("requeued", "cancelled"):
        if done[action]:
            log.warning("reconciler %s %d job(s) that had no broker message: %s", action, len(done[action]), ", ".join(done[action][:20]))
    return done


class Reconciler:
    """Runs `reconcile` every interval in a background thread; one API process at a time does the work."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="reconciler")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        interval = self.settings.reconcile_interval_s
        lock = f"modelshrink:reconciler:{self.settings.queue_name}"
        while not self._stop.wait(interval):
            try:
                if redis_client(self.settings).set(lock, "1", nx=True, ex=max(1, int(interval * 0.9))):
                    reconcile(self.settings)
            except Exception:  # the database or broker is down: the next pass tries again
                log.warning("reconciler pass failed", exc_info=True)
