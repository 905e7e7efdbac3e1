"""GET /v1/jobs/{id}'s body, built for the rate pipelines poll at: one Core query, and the metrics
sent as the text stored with the job.

The metrics were checked against the schema when the worker wrote them (service.core.job_metrics),
and stored as the model's whole dump (service.core.job_metrics.stored): parsing them, validating
them again and serializing them back on every poll bought nothing and cost most of the request (the
ORM load, the JSON decode, pydantic's validation and dump of the whole metrics tree). The rest of the
job goes through JobPublic as before. Metrics stored by a version before 2026-12-03 hold only the
keys their worker wrote: their optional fields that were unset are absent rather than null."""

from __future__ import annotations

import json

from fastapi import Request
from sqlalchemy import Text, bindparam, cast, select
from sqlalchemy.engine import Connection

from service.api.own_threads import on_own_threads
from service.api.schemas import JobPublic
from service.core.db import engine_of
from service.core.errors import NotFound
from service.core.settings import Settings
from service.core.jobstore import job_public
from service.core.tables import Job

_TABLE = Job.__table__
# Built once: constructing the select and its cache key was a tenth of the request.
_QUERY = select(*[c for c in _TABLE.columns if c.name != "metrics"], cast(_TABLE.c.metrics, Text).label("metrics")).where(_TABLE.c.id == bindparam("job_id"))
# Stored by an older version, metrics may hold NaN or Infinity (json.dumps writes them; they are not
# JSON): such a body is built through the model, which writes null.
_NOT_JSON = ("NaN", "Infinity")


def status_body(connection: Connection, tenant_id: str, job_id: str) -> bytes:
    row = connection.execute(_QUERY, {"job_id": job_id}).one_or_none()
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"job {job_id} not found")
    raw = row.metrics  # the stored JSON text
    public = job_public(row)  # reads the columns by name; metrics is replaced below
    if raw is not None and raw != "null" and any(token in raw for token in _NOT_JSON):
        public["metrics"] = json.loads(raw)
        return JobPublic.model_validate(public).model_dump_json().encode()
    public["metrics"] = None
    body = JobPublic.model_validate(public).model_dump_json(exclude={"metrics"}).encode()
    return body[:-1] + b',"metrics":' + (raw.encode() if raw is not None else b"null") + b"}"


def _status(url: str, tenant_id: str, job_id: str) -> bytes:
    # A Core connection, not an ORM session: nothing here needs the identity map.
    with engine_of(url).connect() as connection:
        return status_body(connection, tenant_id, job_id)


async def status_in_thread(request: Request, settings: Settings, tenant_id: str, job_id: str) -> bytes:
    """The body, built on settings.status_threads threads of its own (why: Settings)."""
    return await on_own_threads(request, "status", settings.status_threads, _status, settings.resolved_database_url, tenant_id, job_id)
