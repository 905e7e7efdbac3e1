"""Quotas that hold under concurrency: a check and the insert it allows happen under one lock on
the tenant's row, so twelve uploads or searches at once cannot each see the same free room (they
did: 276 MB stored against a 200 MB quota, 71 queued jobs against 50).

The lock is a no-op UPDATE of the tenant's row: a row lock on PostgreSQL, the database's write lock
on SQLite, held until the transaction commits or rolls back; other tenants wait only on SQLite
(which has no row locks), for the few milliseconds of a check and an insert."""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from service.core.tables import Tenant


def lock_tenant(session: Session, tenant_id: str) -> None:
    session.execute(update(Tenant).where(Tenant.id == tenant_id).values(name=Tenant.name))
