"""One Settings object for every process (API, worker, CLI), read from MODELSHRINK_* variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_DATA_DIR = Path.home() / ".modelshrink"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELSHRINK_", extra="ignore")

    data_dir: Path = Field(DEFAULT_DATA_DIR, description="Root of the embedded defaults: SQLite file, artifacts, embedded Redis.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<data_dir>/modelshrink.db")
    broker_url: str | None = Field(None, description="Redis URL; default: the embedded redis-server's unix socket in data_dir")
    artifact_dir: Path | None = Field(None, description="Artifact store root (a shared filesystem when scaling out); default <data_dir>/artifacts. With artifact_url: this process's local cache")
    artifact_url: str | None = Field(None, description="s3://bucket/prefix: artifacts in S3-compatible object storage, so workers and API replicas need no shared disk")
    s3_endpoint_url: str | None = Field(None, description="The S3 endpoint for a non-AWS store (MinIO, Ceph radosgw), e.g. http://minio:9000")
    s3_public_endpoint_url: str | None = Field(None, description="The endpoint clients reach, for presigned download URLs, when it differs from s3_endpoint_url")
    presigned_url_ttl_s: int = Field(900, ge=1, le=7 * 24 * 3600, description="How long a presigned download URL stays valid")

    max_upload_bytes: int = 16 * 1024**3
    # protobuf caps one serialized ONNX model at 2 GB: a model whose weights exceed this keeps them in
    # external data files, stored and served as a .zip (model.onnx + its data). Lower only to test that path.
    single_file_limit_bytes: int = Field(2 * 1024**3 - 1, ge=1024, le=2 * 1024**3 - 1)
    # JSON bodies (job specs): uploads have their own limit above.
    max_request_body_bytes: int = Field(1024**2, ge=1024)
    # A dataset is loaded whole by the worker, so its decompressed size is capped separately.
    max_dataset_decompressed_bytes: int = 1024**3
    max_dataset_members: int = 64

    # Sandbox for checking untrusted ONNX uploads (child process limits).
    probe_timeout_s: float = 60.0
    probe_memory_bytes: int = 8 * 1024**3
    max_concurrent_checks: int = Field(2, ge=1)
    max_waiting_checks: int = Field(200, ge=0)

    # Per-tenant quotas: jobs queued or running (429 beyond), bytes of stored models and datasets (507 beyond).
    tenant_max_active_jobs: int = Field(50, ge=1)
    # Jobs of one tenant in the broker queue or running at once; the rest wait their turn (fair dispatch).
    tenant_max_dispatched: int = Field(2, ge=1)
    tenant_max_stored_bytes: int = Field(100 * 1024**3, ge=0)
    # Job results (models, bundles, reports) count against tenant_max_stored_bytes while they are kept:
    # removed this many days after the job ended (0 keeps them until deleted). A finished search keeps
    # the artifacts of its best, Pareto and closest candidates only, unless search_keep_all_artifacts.
    job_artifact_retention_days: float = Field(30.0, ge=0)
    search_keep_all_artifacts: bool = False

    # Reliability: a job's worker holds a lease it renews; a redelivered job whose lease expired is
    # taken over, and a job taken over more than max_attempts times fails.
    max_attempts: int = 3
    lease_ttl_s: float = 60.0
    # Kombu's Redis transport re-queues an unacked job (its worker died) after this long. Short is safe:
    # a redelivery that finds a live lease only re-schedules itself.
    visibility_timeout_s: float = 300.0
    unacked_restore_interval_s: float = 10.0

    # Every job runs in a child process of the worker, limited from outside: its resident memory
    # (whole process tree) and wall-clock time. A job may ask for less, never more.
    job_memory_limit_bytes: int = Field(8 * 1024**3, ge=64 * 1024**2)
    job_time_limit_s: float = Field(6 * 3600.0, gt=0)
    # A job's process runs this much nicer than the API and the worker (0 = the same priority).
    job_niceness: int = Field(10, ge=0, le=19)
    # After a cancel, how long a running job has to reach a step/epoch boundary before it is killed.
    cancel_grace_s: float = Field(10.0, ge=0)
    work_dir: Path | None = Field(None, description="Jobs' scratch directories; default <data_dir>/work")

    # Availability: readiness is checked in the background; a reconciler re-queues jobs that lost
    # their broker message (see service.core.reconciler).
    readiness_interval_s: float = Field(5.0, gt=0)
    max_event_streams: int = Field(1000, ge=1)
    max_event_streams_per_tenant: int = Field(50, ge=1)
    reconcile_interval_s: float = Field(30.0, gt=0)
    reconcile_grace_s: float = Field(60.0, ge=0)

    queue_name: str = "modelshrink"
    worker_concurrency: int = 1
    # What this worker process trains on: "cuda" workers also take the `<queue>.cuda` queue, where
    # training jobs go while any such worker runs (service.core.routing). "auto": cuda when the
    # machine shows an NVIDIA device.
    worker_device: Literal["auto", "cpu", "cuda"] = "auto"
    # CPU threads of one job (torch, OpenMP); default: the machine's cores over its job workers.
    job_threads: int | None = Field(None, ge=1, le=1024)

    # Webhooks: only hosts listed here, and never private/loopback addresses unless allowed.
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webhook_allow_private: bool = False
    webhook_secret: str | None = None
    # Signs shared links (service.core.signed_links); every API process of a deployment must have the same.
    signing_secret: str | None = None
    shared_link_max_s: int = Field(7 * 24 * 3600, ge=60, description="The longest a shared link may stay valid")
    webhook_max_retries: int = 5
    webhook_timeout_s: float = Field(10.0, gt=0, description="Total time for one delivery attempt.")
    # Webhooks are delivered by their own worker (threads), never by a job worker.
    webhook_concurrency: int = Field(4, ge=1)
    # At most this many of those threads deliver one tenant's webhooks at once (its slow endpoints cannot
    # hold every thread); its other deliveries wait their turn in the queue.
    webhook_max_per_tenant: int = Field(2, ge=1)
    # GET /v1/jobs/{id} runs on this many threads of its own, not the shared pool's 40: 50 polling
    # clients on 40 threads spent their time handing the GIL around (service/api/job_status.py).
    status_threads: int = Field(4, ge=1)
    # Event-stream followers check ownership and read snapshots on this many threads of their own: a
    # burst of one tenant's followers must not queue ahead of other tenants' requests (service/api/follow.py).
    stream_threads: int = Field(4, ge=1)

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> list[str]:
        # A comma-separated variable is easier to set in a unit file than a JSON list.
        if isinstance(value, str):
            return [h.strip().lower() for h in value.split(",") if h.strip()]
        return [str(h).lower() for h in (value if isinstance(value, (list, tuple, set)) else [])]

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'modelshrink.db'}"

    @property
    def resolved_artifact_dir(self) -> Path:
        return self.artifact_dir or self.data_dir / "artifacts"

    @property
    def resolved_work_dir(self) -> Path:
        path = self.work_dir or self.data_dir / "work"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def embedded_redis_socket(self) -> Path:
        return self.data_dir / "redis" / "redis.sock"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"redis+socket://{self.embedded_redis_socket}"

    @property
    def uses_embedded_redis(self) -> bool:
        return self.broker_url is None


@lru_cache
def get_settings() -> Settings:
    return Settings()
