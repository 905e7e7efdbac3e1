"""The Alembic migrations build exactly the tables the code declares (a column added to tables.py
without a migration would break every existing deployment's database)."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from service.core import db
from service.core.tables import Base


def test_migrations_match_the_declared_tables(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/store.db"
    db.migrate(url)
    with db.get_engine(url).connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
