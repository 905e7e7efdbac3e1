"""Alembic environment: runs on the connection that service.core.db.migrate hands over."""

from alembic import context
from sqlalchemy import create_engine

from service.core.tables import Base

config = context.config
connection = config.attributes.get("connection")

if connection is None:  # `alembic` CLI use: open our own connection
    connection = create_engine(config.get_main_option("sqlalchemy.url") or "").connect()

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
