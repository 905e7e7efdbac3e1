"""Engine, sessions and migrations of the job store (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

from sqlalchemy import create_engine, event, make_url, text
from sqlalchemy.engine import CursorResult, Engine
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def rowcount(result: Any) -> int:
    """Rows an UPDATE or DELETE touched (session.execute returns a CursorResult for those; typed as Result)."""
    return int(cast("CursorResult[Any]", result).rowcount)


def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1].split("?", 1)[0]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # `?timeout=SECONDS` in the URL sets how long a writer waits for a lock (default 30 s).
        timeout = make_url(url).query.get("timeout", "30")
        busy_s = float(timeout if isinstance(timeout, str) else timeout[0])
        # Pooled as for PostgreSQL, one connection per threadpool thread: with SQLAlchemy's default 5 (+10
        # overflow, closed on return) every request beyond 15 at once opened a connection and ran the
        # pragmas below, a third of a polled GET /v1/jobs/{id}'s server time under 50 clients.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": busy_s}, pool_size=40, max_overflow=10, pool_timeout=5)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the API read while a worker writes progress; busy_timeout waits out writers.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={int(busy_s * 1000)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # As many connections as the API's threadpool has threads (AnyIO's default 40), so a thread never
    # waits on the pool; and a short wait when it would, answered 503 (the default 30 s looked like a hang).
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=30, pool_timeout=5)


@lru_cache(maxsize=8)
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


def engine_of(url: str) -> Engine:
    """The engine (and its connection pool) that this process's sessions for `url` use."""
    return cast(Engine, get_sessionmaker(url).kw["bind"])


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def migrate(url: str) -> None:
    """Bring the schema to the newest revision; safe when several processes start at once."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    engine = get_engine(url)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # API and workers may start together against one database: serialise their upgrades.
            conn.execute(text("SELECT pg_advisory_xact_lock(7424651)"))
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
