"""Dependencies shared by the routers, as Annotated aliases (SessionDep, CurrentTenant, ...)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.core.artifacts import ArtifactStore
from service.core.db import get_sessionmaker
from service.core.errors import Unauthorized
from service.core.keys import hash_key, tenant_for_key
from service.core.settings import Settings
from service.core.tables import Tenant

bearer = HTTPBearer(auto_error=False, description="An API key from `modelshrink keys create --tenant NAME`.")


# Dependencies that do no I/O are `async def`: FastAPI runs a plain `def` dependency in the
# threadpool, and every request paid four thread hops before its handler ran (status polling is
# what every pipeline does: bench/status_load.py).
async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


async def get_session(settings: SettingsDep) -> AsyncIterator[Session]:
    # Making a session touches no database; closing one that checked out a connection does (a
    # rollback as it goes back to the pool), so only then off the event loop.
    session = get_sessionmaker(settings.resolved_database_url)()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


SessionDep = Annotated[Session, Depends(get_session)]


async def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


StoreDep = Annotated[ArtifactStore, Depends(get_store)]


# Recently verified keys (by hash) -> tenant, so a polling client costs one query, not three.
# A revoked key keeps working for at most KEY_CACHE_TTL_S on an API replica that cached it.
KEY_CACHE_TTL_S = 30.0
_verified: dict[str, tuple[float, Tenant]] = {}


# Key lookups in flight, by hash: a burst of one tenant's requests (60 event-stream followers opened
# at once) costs one query and one thread, not one each queued ahead of every other tenant's requests.
_in_flight: dict[str, asyncio.Future] = {}
_LOOKUP_FAILED = object()


def _lookup(session: Session, key: str) -> Tenant | None:
    tenant = tenant_for_key(session, key)
    if tenant is not None:
        session.expunge(tenant)
    return tenant


async def _tenant_once(session: Session, key: str, digest: str) -> Tenant | None:
    loop = asyncio.get_running_loop()
    pending = _in_flight.get(digest)
    if pending is not None and pending.get_loop() is loop:
        shared = await asyncio.shield(pending)
        if shared is not _LOOKUP_FAILED:
            return shared
        return await run_in_threadpool(_lookup, session, key)  # the first lookup failed: this request tries its own
    future = loop.create_future()
    _in_flight[digest] = future
    result: Any = _LOOKUP_FAILED
    try:
        result = await run_in_threadpool(_lookup, session, key)
        return result
    finally:
        future.set_result(result)
        if _in_flight.get(digest) is future:
            del _in_flight[digest]


async def current_tenant(session: SessionDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Tenant:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
    digest = hash_key(credentials.credentials)
    cached = _verified.get(digest)
    if cached and time.monotonic() - cached[0] < KEY_CACHE_TTL_S:
        return cached[1]
    tenant = await _tenant_once(session, credentials.credentials, digest)
    if tenant is None:
        raise Unauthorized("the API key is not valid for this server: it is not in the database this server uses (a key belongs to one "
                           "data directory or database: create it with `modelshrink keys create --tenant NAME` using the server's "
                           "MODELSHRINK_DATA_DIR or MODELSHRINK_DATABASE_URL), or it was mistyped")
    if len(_verified) > 10_000:
        _verified.clear()
    _verified[digest] = (time.monotonic(), tenant)
    return tenant


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]
