"""GET /v1/jobs/{id}'s body, built for the rate pipelines poll at: one query, and the metrics sent
as the text stored with the job.

The metrics were checked against the schema when the worker wrote them (service.core.job_metrics),
and stored as the model's whole dump (service.core.job_metrics.stored): parsing them, validating
them again and serializing them back on every poll bought nothing and cost most of the request (the
ORM load, the JSON decode, pydantic's validation and dump of the whole metrics tree). The rest of the
job goes through JobPublic as before. Metrics stored by a version before 2026-12-03 hold only the
keys their worker wrote: their optional fields that were unset are absent rather than null.

On SQLite (the embedded default) the row is read on the event loop, not on a thread: a point read by
primary key under WAL does not wait for writers and takes tens of microseconds, while the thread hop
around it (a limiter, a queue, a wake-up of the loop, the GIL handed between 50 polling clients'
threads) cost more than the query. That read uses a DB-API connection of its own that never waits
(busy_timeout 0, query_only, autocommit so no snapshot outlives a request) and SQLAlchemy's result
processors for the columns, so the values are those the Core query gives. A busy answer, or any
other database error, falls back to the threads, where the error is raised and answered as before.
On PostgreSQL the query runs on the threads."""

from __future__ import annotations

import json
import sqlite3
from collections import namedtuple
from typing import Any, Callable

from fastapi import Request
from sqlalchemy import Text, bindparam, cast, make_url, select
from sqlalchemy.engine import Connection, Dialect

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
_Row = namedtuple("_Row", [c.name for c in _QUERY.selected_columns])  # type: ignore[misc]


def _body(row: Any, tenant_id: str, job_id: str) -> bytes:
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


def status_body(connection: Connection, tenant_id: str, job_id: str) -> bytes:
    return _body(connection.execute(_QUERY, {"job_id": job_id}).one_or_none(), tenant_id, job_id)


def _status(url: str, tenant_id: str, job_id: str) -> bytes:
    # A Core connection, not an ORM session: nothing here needs the identity map.
    with engine_of(url).connect() as connection:
        return status_body(connection, tenant_id, job_id)


class SqliteStatusReader:
    """The job row read straight from the SQLite file, on the caller's thread, never waiting."""

    def __init__(self, path: str, dialect: Dialect) -> None:
        compiled = _QUERY.compile(dialect=dialect)
        self._sql = str(compiled)
        processors: list[Callable[[Any], Any] | None] = [c.type.dialect_impl(dialect).result_processor(dialect, None)
                                                        for c in _QUERY.selected_columns]
        self._processors = [(i, p) for i, p in enumerate(processors) if p is not None]
        self._connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._connection.execute("PRAGMA busy_timeout=0")
        self._connection.execute("PRAGMA query_only=1")

    def row(self, job_id: str) -> Any:
        values = self._connection.execute(self._sql, (job_id,)).fetchone()
        if values is None:
            return None
        values = list(values)
        for index, process in self._processors:
            values[index] = process(values[index])
        return _Row(*values)

    def close(self) -> None:
        self._connection.close()


def _sqlite_reader(request: Request, settings: Settings) -> SqliteStatusReader | None:
    """The app's reader when its database is an SQLite file, else None; opened on first use (in the
    serving process, after any fork) and closed with the app (close_sqlite_reader)."""
    state = request.app.state
    if not hasattr(state, "status_reader"):
        url = make_url(settings.resolved_database_url)
        file_backed = url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
        state.status_reader = SqliteStatusReader(str(url.database), engine_of(settings.resolved_database_url).dialect) if file_backed else None
    return state.status_reader


def close_sqlite_reader(app: Any) -> None:
    reader = getattr(app.state, "status_reader", None)
    if reader is not None:
        reader.close()
        app.state.status_reader = None


async def status_in_thread(request: Request, settings: Settings, tenant_id: str, job_id: str) -> bytes:
    """The body: read on the event loop from SQLite, else built on settings.status_threads threads of
    its own (why: Settings)."""
    reader = _sqlite_reader(request, settings)
    if reader is not None:
        try:
            row = reader.row(job_id)
        except sqlite3.Error:
            pass  # busy, or anything else: the threads read it the usual way, and raise what they raise
        else:
            return _body(row, tenant_id, job_id)
    return await on_own_threads(request, "status", settings.status_threads, _status, settings.resolved_database_url, tenant_id, job_id)
