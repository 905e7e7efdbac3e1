"""Quotas that hold under concurrency: a check and the insert it allows happen under one lock on
the tenant's row, so twelve uploads or searches at once cannot each see the same free room (they
did: 276 MB stored against a 200 MB quota, 71 queued jobs against 50).

The lock is a no-op UPDATE of the tenant's row: a row lock on PostgreSQL, the database's write lock
on SQLite, held until the transaction commits or rolls back; other tenants wait only on SQLite
(which has no row locks), for the few milliseconds of a check and an insert."""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.core.errors import StorageQuotaExceeded
from service.core.settings import Settings
from service.core.tables import TERMINAL_STATUSES, Job, Search, StoredDataset, StoredModel, Tenant


def lock_tenant(session: Session, tenant_id: str) -> None:
    session.execute(update(Tenant).where(Tenant.id == tenant_id).values(name=Tenant.name))


def active_jobs(session: Session, tenant_id: str) -> int:
    """What the active-job quota counts: the tenant's queued and running jobs (search candidates
    included), and the first-rung candidates of its accepted searches whose jobs are not written yet."""
    queued = int(session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.status.in_(("queued", "running")))) or 0)
    return queued + _unwritten_first_rungs(session, tenant_id)


def _unwritten_first_rungs(session: Session, tenant_id: str) -> int:
    # A search's first-rung jobs are written by the driver after the search's own row commits, so
    # twelve searches submitted at once each counted the others' candidates as absent (tested:
    # service/api/routes/searches.py's check would let all of them in).
    from service.core.search_driver import search_recipes  # the driver imports this module

    has_jobs = select(Job.id).where(Job.search_id == Search.id).exists()
    waiting = session.scalars(select(Search).where(Search.tenant_id == tenant_id, Search.status.not_in(TERMINAL_STATUSES), ~has_jobs)).all()
    return sum(len(search_recipes(search)) for search in waiting)


def stored_bytes(session: Session, tenant_id: str) -> int:
    """What the tenant keeps: its models, datasets and the results of its jobs (every search
    candidate's too) until they are deleted or their retention ends."""
    total = 0
    for column, owner in ((StoredModel.size_bytes, StoredModel.tenant_id), (StoredDataset.size_bytes, StoredDataset.tenant_id),
                          (Job.artifact_bytes, Job.tenant_id)):
        total += int(session.scalar(select(func.coalesce(func.sum(column), 0)).where(owner == tenant_id)) or 0)
    return total


def storage_quota_exceeded(used: int, settings: Settings) -> StorageQuotaExceeded:
    return StorageQuotaExceeded(
        f"this tenant stores {used} bytes of models, datasets and job results; its quota is {settings.tenant_max_stored_bytes}: "
        "delete some first (DELETE /v1/models/{id}, /v1/datasets/{id}, /v1/jobs/{id}/artifacts)"
    )


def check_room_for_results(session: Session, tenant_id: str, settings: Settings) -> None:
    """A job (or search) writes results: refuse it while the tenant is already at its storage quota."""
    used = stored_bytes(session, tenant_id)
    if used >= settings.tenant_max_stored_bytes:
        raise storage_quota_exceeded(used, settings)
