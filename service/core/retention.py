"""Job results do not pile up: a finished job's artifacts are removed after the retention period, a
finished search keeps only its best, Pareto and closest candidates' artifacts, and a user may remove
a job's artifacts at once. The job row stays (metrics, report page, step reports); `artifacts_removed`
says when and why, and the bytes stop counting against the tenant's storage quota.

The reconciler runs `sweep` on every pass (one API process at a time), so removal needs no cron."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.core.artifacts import ArtifactStore
from service.core.db import session_scope
from service.core.search_driver import points_of
from service.core.search_select import pareto
from service.core.settings import Settings
from service.core.tables import TERMINAL_STATUSES, Job, Search, utcnow

log = logging.getLogger(__name__)
BATCH = 200  # jobs per pass: a backlog drains over a few passes without one long transaction


def remove_artifacts(session: Session, store: ArtifactStore, job: Job, reason: str) -> bool:
    """Delete the job's stored files and mark it; False when it still runs (its files are being written)."""
    if job.status not in TERMINAL_STATUSES:
        return False
    store.delete_prefix(f"jobs/{job.tenant_id}/{job.id}")
    marked = session.execute(update(Job).where(Job.id == job.id, Job.status.in_(TERMINAL_STATUSES))
                             .values(artifacts=[], artifact_bytes=0, artifacts_removed_at=utcnow(), artifacts_removed_reason=reason)
                             .execution_options(synchronize_session=False))
    session.commit()
    return bool(marked.rowcount)  # type: ignore[attr-defined]


def _kept_by(search: Search, jobs: list[Job]) -> set[str]:
    """The candidates a user of the search's answer downloads: its best, the Pareto front, the closest misses."""
    result = search.result or {}
    kept = {result.get("best"), *(result.get("closest") or []), *(p.job_id for p in pareto(points_of(search, jobs)))}
    return {k for k in kept if k}


def sweep(settings: Settings, store: ArtifactStore) -> list[str]:
    """One pass; returns the ids of the jobs whose artifacts were removed."""
    removed: list[str] = []
    with session_scope(settings.resolved_database_url) as session:
        if settings.job_artifact_retention_days > 0:
            before = utcnow() - timedelta(days=settings.job_artifact_retention_days)
            expired = session.scalars(select(Job).where(Job.status.in_(TERMINAL_STATUSES), Job.finished_at < before,
                                                        Job.artifacts_removed_at.is_(None)).limit(BATCH)).all()
            reason = f"retention: results are kept {settings.job_artifact_retention_days:g} days after a job ends"
            removed += [job.id for job in expired if remove_artifacts(session, store, job, reason)]
        if not settings.search_keep_all_artifacts:
            # Searches that ended recently (each pass sees a search's end within seconds; older ones
            # were swept then, and retention takes the rest), with candidates still holding artifacts.
            recent = utcnow() - timedelta(days=1)
            ended = session.scalars(select(Search).join(Job, Job.search_id == Search.id)
                                    .where(Search.status.in_(TERMINAL_STATUSES), Search.finished_at > recent,
                                           Job.artifacts_removed_at.is_(None), Job.artifact_bytes > 0).distinct()).all()
            for search in ended:
                jobs = list(session.scalars(select(Job).where(Job.search_id == search.id)))
                kept = _kept_by(search, jobs)
                reason = f"search {search.id} ended: only its best, Pareto and closest candidates keep their artifacts"
                removed += [job.id for job in jobs if job.id not in kept and job.artifacts_removed_at is None and job.artifact_bytes > 0
                            and remove_artifacts(session, store, job, reason)]
    if removed:
        log.info("removed the artifacts of %d finished job(s)", len(removed))
    return removed
