"""What follows a job's end, whoever saw it end: the worker that ran it or the cancel route that
stopped a queued one. One home so both do the same things in the same order."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from service.core.dispatch import dispatch
from service.core.queue import enqueue_webhook
from service.core.search_driver import advance
from service.core.settings import Settings
from service.core.tables import Job

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EndedJob:
    """What the follow-ups need of the job, read while its session was open."""

    job_id: str
    tenant_id: str
    search_id: str | None
    webhook_url: str | None

    @classmethod
    def of(cls, job: Job) -> EndedJob:
        return cls(job.id, job.tenant_id, job.search_id, job.webhook_url)


def on_job_ended(settings: Settings, ended: EndedJob) -> None:
    """The job's webhook, then its search's judgement (which may start the next rung), then the
    tenant's next waiting job into the freed place. Each is independent: one failing (the broker or
    the database briefly out) does not skip the others, and the reconciler redoes the search and
    dispatch steps later; the job's own end is already recorded."""
    if ended.webhook_url:
        try:
            enqueue_webhook(settings, ended.job_id)
        except Exception:  # a lost notification must not undo the job's end
            log.warning("webhook for %s not queued", ended.job_id, exc_info=True)
    if ended.search_id is not None:
        try:
            advance(settings, ended.search_id)  # the search judges this candidate, maybe starts the next rung
        except Exception:  # the reconciler advances searches whose candidates have ended
            log.warning("search %s not advanced after %s ended", ended.search_id, ended.job_id, exc_info=True)
    try:
        dispatch(settings, ended.tenant_id)  # this tenant's next waiting job takes the freed place
    except Exception:  # the reconciler dispatches it later
        log.warning("tenant %s's next job not dispatched", ended.tenant_id, exc_info=True)
