"""Dependencies shared by the routers, as Annotated aliases (SessionDep, CurrentTenant, ...)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.core.artifacts import ArtifactStore
from service.core.db import get_sessionmaker
from service.core.errors import Unauthorized
from service.core.keys import hash_key, tenant_for_key
from service.core.settings import Settings
from service.core.tables import Tenant

bearer = HTTPBearer(auto_error=False, description="An API key from `modelshrink keys create --tenant NAME`.")


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    session = get_sessionmaker(settings.resolved_database_url)()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


StoreDep = Annotated[ArtifactStore, Depends(get_store)]


# Recently verified keys (by hash) -> tenant, so a polling client costs one query, not three.
# A revoked key keeps working for at most KEY_CACHE_TTL_S on an API replica that cached it.
KEY_CACHE_TTL_S = 30.0
_verified: dict[str, tuple[float, Tenant]] = {}


def current_tenant(session: SessionDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Tenant:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
    digest = hash_key(credentials.credentials)
    cached = _verified.get(digest)
    if cached and time.monotonic() - cached[0] < KEY_CACHE_TTL_S:
        return cached[1]
    tenant = tenant_for_key(session, credentials.credentials)
    if tenant is None:
        raise Unauthorized("the API key is not valid for this server: it is not in the database this server uses (a key belongs to one "
                           "data directory or database: create it with `modelshrink keys create --tenant NAME` using the server's "
                           "MODELSHRINK_DATA_DIR or MODELSHRINK_DATABASE_URL), or it was mistyped")
    session.expunge(tenant)
    if len(_verified) > 10_000:
        _verified.clear()
    _verified[digest] = (time.monotonic(), tenant)
    return tenant


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]
