"""Celery tasks: thin wrappers that hand a job id to the runner. All state lives in the job store."""

from __future__ import annotations

import logging

from sqlalchemy.exc import DBAPIError

from service.core.db import session_scope
from service.core.jobstore import job_public
from service.core.job_end import EndedJob, on_job_ended
from service.core.search_view import candidate_jobs, search_public
from service.core.queue import DELIVER_WEBHOOK_TASK, RUN_JOB_TASK, enqueue_webhook
from service.core.routing import enqueue_routed
from service.core.settings import get_settings
from service.core.webhook_share import WAIT_S, tenant_slot
from service.core.tables import Job, Search
from workers.celery_app import app

log = logging.getLogger(__name__)
DB_RETRY_S = 5.0


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self, job_id: str) -> None:  # bound: self.request names the worker node
    from workers.runner import run_job as run  # heavy imports stay in the worker child

    settings = get_settings()
    try:
        outcome = run(job_id, settings, node=self.request.hostname)
    except DBAPIError:
        # The job store is unavailable: put the job back rather than let this message be
        # acknowledged as failed and the job sit queued forever (the reconciler is the backstop
        # when the broker is out too).
        log.warning("job store unavailable while starting %s; re-queued in %.0f s", job_id, DB_RETRY_S, exc_info=True)
        enqueue_routed(settings, job_id, countdown=DB_RETRY_S)
        return
    if outcome.retry_after_s:
        # Another worker holds a live lease: look again once it would have expired, so the job is
        # never left without a message in the queue if that worker dies.
        enqueue_routed(settings, job_id, countdown=outcome.retry_after_s)
    if outcome.finished:
        with session_scope(settings.resolved_database_url) as session:
            job = session.get(Job, job_id)
            ended = EndedJob.of(job) if job is not None else None
        if ended is not None:
            on_job_ended(settings, ended)

class WebhookRetry(Exception):
    pass


@app.task(
    name=DELIVER_WEBHOOK_TASK,
    bind=True,
    autoretry_for=(WebhookRetry,),
    retry_backoff=2,
    retry_backoff_max=600,
    retry_jitter=True,
    max_retries=get_settings().webhook_max_retries,
)
def deliver_webhook(self, job_id: str) -> None:
    """`job_id` names a job or a search (ids carry their kind's prefix)."""
    from service.core.webhooks import WebhookRefused, deliver

    settings = get_settings()
    with session_scope(settings.resolved_database_url) as session:
        row: Job | Search | None = session.get(Search if job_id.startswith("srch_") else Job, job_id)
        if row is None or not row.webhook_url:
            return
        payload = search_public(row, candidate_jobs(session, row.id)) if isinstance(row, Search) else job_public(row)
        url, tenant_id = row.webhook_url, row.tenant_id
    with tenant_slot(settings, tenant_id) as held:
        if not held:  # the tenant's share of the threads is busy: wait in the queue, not in a thread
            enqueue_webhook(settings, job_id, countdown=WAIT_S)
            return
        try:
            status = deliver(url, payload, settings)
            log.info("webhook for %s answered %s", job_id, status)
        except WebhookRefused as exc:
            log.warning("webhook for %s refused: %s", job_id, exc)
        except Exception as exc:
            log.info("webhook for %s failed (%s); retrying", job_id, exc)
            raise WebhookRetry(str(exc)) from exc
