"""Job state transitions in the job store, shared by the API (create, cancel) and workers (lease, progress, finish).

Every transition is a single conditional UPDATE, so two processes racing on one job (a redelivered
message, a cancel during start) cannot both win.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from service.core.db import rowcount
from service.core.tables import TERMINAL_STATUSES, Job, utcnow


def aware(dt: datetime | None) -> datetime | None:
    # SQLite hands datetimes back naive; they were written in UTC.
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt


def job_public(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status,
        "model_id": job.model_id,
        "dataset_id": job.dataset_id,
        "eval_dataset_id": job.eval_dataset_id,
        "steps": job.steps,
        "options": job.options,
        "progress": job.progress or {"fraction": 0.0, "step": None, "message": "queued"},
        "metrics": job.metrics,
        "artifacts": job.artifacts or [],
        "artifacts_removed": ({"at": aware(job.artifacts_removed_at), "reason": job.artifacts_removed_reason}
                              if job.artifacts_removed_at is not None else None),
        "error": job.error,
        "attempts": job.attempts,
        "worker": job.worker,
        "cancel_requested": job.cancel_requested,
        "webhook_url": job.webhook_url,
        "created_at": aware(job.created_at),
        "started_at": aware(job.started_at),
        "finished_at": aware(job.finished_at),
    }


@dataclass(frozen=True)
class LeaseResult:
    acquired: bool
    job: Job | None
    retry_after_s: float = 0.0
    held_by_other: bool = False  # another delivery holds a live lease


def take_lease(session: Session, job_id: str, owner: str, ttl_s: float, worker: str | None = None) -> LeaseResult:
    """Start (or take over) a job whose lease is free or expired; count the attempt."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status.in_(("queued", "running")),
            Job.cancel_requested.is_(False),
            or_(Job.lease_owner.is_(None), Job.lease_expires_at < now),
        )
        .values(
            lease_owner=owner,
            worker=worker or owner,
            lease_expires_at=now + timedelta(seconds=ttl_s),
            attempts=Job.attempts + 1,
            status="running",
            started_at=func.coalesce(Job.started_at, now),
            progress={"fraction": 0.0, "step": None, "message": "started"},
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    job = session.get(Job, job_id, populate_existing=True)
    if rowcount(result) == 1:
        return LeaseResult(True, job)
    retry, held = 0.0, False
    if job is not None and job.status == "running" and job.lease_expires_at is not None:
        expires = aware(job.lease_expires_at)
        assert expires is not None
        remaining = (expires - now).total_seconds()
        retry, held = max(1.0, remaining + 0.5), remaining > 0
    return LeaseResult(False, job, retry, held)


def renew_lease(session: Session, job_id: str, owner: str, ttl_s: float) -> bool:
    """Extend our lease; False if we lost it (another worker took the job over)."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running")
        .values(lease_expires_at=utcnow() + timedelta(seconds=ttl_s))
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return rowcount(result) == 1


def set_progress(session: Session, job_id: str, owner: str, progress: dict[str, Any]) -> str:
    """Record progress. Returns "ok", "cancel" (the user asked to stop) or "lost" (our lease is gone:
    another delivery took the job over, or the job was ended by someone else)."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running")
        .values(progress=progress)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    if rowcount(result) != 1:
        return "lost"
    return "cancel" if cancel_requested(session, job_id) else "ok"


def cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def finish(
    session: Session,
    job_id: str,
    status: str,
    *,
    owner: str | None = None,
    metrics: dict[str, Any] | None = None,
    artifacts: list[dict[str, Any]] | None = None,
    error: dict[str, str] | None = None,
    progress: dict[str, Any] | None = None,
) -> bool:
    """Move a non-terminal job to a terminal status (only its lease holder may, when owner is given)."""
    assert status in TERMINAL_STATUSES
    conditions = [Job.id == job_id, Job.status.in_(("queued", "running"))]
    if owner is not None:
        conditions.append(Job.lease_owner == owner)
    values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "lease_owner": None, "lease_expires_at": None}
    if metrics is not None:
        values["metrics"] = metrics
    if artifacts is not None:
        values["artifacts"] = artifacts
        values["artifact_bytes"] = sum(int(a.get("size_bytes") or 0) for a in artifacts)
    if error is not None:
        values["error"] = error
    if progress is not None:
        values["progress"] = progress
    result = session.execute(update(Job).where(*conditions).values(**values).execution_options(synchronize_session=False))
    session.commit()
    return rowcount(result) == 1


def request_cancel(session: Session, job: Job) -> str:
    """Cancel a queued job at once; flag a running one to stop at its next boundary. Returns the new status."""
    queued = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == "queued", Job.lease_owner.is_(None))
        .values(
            status="cancelled",
            cancel_requested=True,
            finished_at=utcnow(),
            error={"code": "cancelled", "message": "cancelled by the user before it started"},
            progress={"fraction": 0.0, "step": None, "message": "cancelled"},
        )
        .execution_options(synchronize_session=False)
    )
    if rowcount(queued) == 0:
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status.in_(("queued", "running")))
            .values(cancel_requested=True)
            .execution_options(synchronize_session=False)
        )
    session.commit()
    session.refresh(job)
    return job.status
