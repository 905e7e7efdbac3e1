"""Fair dispatch: each tenant has at most `tenant_max_dispatched` jobs in the broker queue or running;
its other jobs wait `queued` in the job store and are handed over one by one as its jobs end.

The broker is one FIFO shared by every tenant. Without this, a tenant that submits a hundred jobs
puts a hundred messages ahead of everyone else; with it, another tenant's first job waits behind at
most `tenant_max_dispatched` jobs of each busy tenant, whatever their backlog. Called when a job is
submitted, when one ends (worker, cancel) and by the reconciler (which also recovers a dispatch that
was claimed but never enqueued).
"""

from __future__ import annotations

import logging

from sqlalchemy import func, select, update

from service.core.db import rowcount, session_scope
from service.core.routing import enqueue_routed
from service.core.settings import Settings
from service.core.tables import Job, utcnow

log = logging.getLogger(__name__)


def dispatch(settings: Settings, tenant_id: str) -> list[str]:
    """Hand this tenant's oldest waiting jobs to the broker, up to its allowance; returns their ids."""
    url = settings.resolved_database_url
    with session_scope(url) as session:
        in_flight = session.scalar(
            select(func.count()).select_from(Job).where(
                Job.tenant_id == tenant_id, Job.status.in_(("queued", "running")), Job.dispatched_at.is_not(None)
            )
        ) or 0
        room = settings.tenant_max_dispatched - in_flight
        if room <= 0:
            return []
        waiting = session.scalars(
            select(Job.id).where(Job.tenant_id == tenant_id, Job.status == "queued", Job.dispatched_at.is_(None))
            .order_by(Job.created_at).limit(room)
        ).all()
    sent = []
    for job_id in waiting:
        with session_scope(url) as session:
            # Claim it first: two dispatchers racing (API and worker) must not both enqueue it.
            claimed = rowcount(session.execute(
                update(Job).where(Job.id == job_id, Job.dispatched_at.is_(None), Job.status == "queued")
                .values(dispatched_at=utcnow()).execution_options(synchronize_session=False)
            ))
        if not claimed:
            continue
        try:
            enqueue_routed(settings, job_id)
        except Exception:
            with session_scope(url) as session:  # let the next dispatch (or the reconciler) try again
                session.execute(update(Job).where(Job.id == job_id).values(dispatched_at=None).execution_options(synchronize_session=False))
            raise
        sent.append(job_id)
    return sent


def waiting_tenants(settings: Settings) -> list[str]:
    with session_scope(settings.resolved_database_url) as session:
        return list(session.scalars(select(Job.tenant_id).where(Job.status == "queued", Job.dispatched_at.is_(None)).distinct()).all())
