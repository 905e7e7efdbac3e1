"""SQLAlchemy tables of the job store (the source of truth for jobs; Celery's result backend is unused)."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, ForeignKey, Integer, String, TypeDecorator, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id(prefix: str) -> str:
    # Typed prefixes make ids self-describing in logs and support tickets.
    return f"{prefix}_{uuid.uuid4().hex}"


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps always come back timezone-aware in UTC (SQLite would hand them back naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime}


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("ten"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class StoredModel(Base):
    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("mdl"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(32))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    artifact_key: Mapped[str] = mapped_column(String(512))
    inputs: Mapped[list[Any]] = mapped_column(default=list)
    outputs: Mapped[list[Any]] = mapped_column(default=list)
    parameters: Mapped[int] = mapped_column(BigInteger, default=0)
    opset: Mapped[int | None] = mapped_column(Integer, default=None)
    # A Hugging Face causal-LM checkpoint (format hf_causal_lm): architecture, layers, heads, vocabulary...
    llm: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class StoredDataset(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("ds"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    artifact_key: Mapped[str] = mapped_column(String(512))
    arrays: Mapped[dict[str, Any]] = mapped_column(default=dict)
    samples: Mapped[int] = mapped_column(Integer)
    has_labels: Mapped[bool] = mapped_column(Boolean, default=False)
    # arrays (.npz, one array per model input) or text (UTF-8 .txt / .jsonl, for LLM checkpoints)
    kind: Mapped[str] = mapped_column(String(16), default="arrays", server_default="arrays")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("job"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    model_id: Mapped[str] = mapped_column(String(64))
    dataset_id: Mapped[str | None] = mapped_column(String(64), default=None)
    eval_dataset_id: Mapped[str | None] = mapped_column(String(64), default=None)
    # The search this job is a candidate of (service.core.search_driver), if any.
    search_id: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    steps: Mapped[list[Any]] = mapped_column(default=list)
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    artifacts: Mapped[list[Any]] = mapped_column(default=list)
    # The artifacts' bytes while they are stored (they count against the tenant's storage quota), and
    # when and why they were removed (service.core.retention): the job's metrics and report stay.
    artifact_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    artifacts_removed_at: Mapped[datetime | None] = mapped_column(default=None)
    artifacts_removed_reason: Mapped[str | None] = mapped_column(String(255), default=None)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    webhook_url: Mapped[str | None] = mapped_column(String(2048), default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # When the job was handed to the broker; None while it waits its tenant's turn (service.core.dispatch).
    dispatched_at: Mapped[datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(255), default=None)
    # Which worker ran the job (the last one, when it was redelivered): "<celery node> pid <n>".
    worker: Mapped[str | None] = mapped_column(String(255), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Search(Base):
    """A search across methods to a target: its candidates are ordinary jobs (Job.search_id)."""

    __tablename__ = "searches"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key", name="uq_searches_tenant_idempotency"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("srch"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    model_id: Mapped[str] = mapped_column(String(64))
    dataset_id: Mapped[str | None] = mapped_column(String(64), default=None)
    eval_dataset_id: Mapped[str | None] = mapped_column(String(64), default=None)
    request: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # What the planner knows of the model and data (transformer, convolutions, labels): fixed at creation.
    facts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default="running", index=True)
    rung: Mapped[int] = mapped_column(Integer, default=0)
    # Optimistic lock: every advance of the search is one UPDATE ... WHERE version = seen.
    version: Mapped[int] = mapped_column(Integer, default=0)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    webhook_url: Mapped[str | None] = mapped_column(String(2048), default=None)
    deadline_at: Mapped[datetime] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
