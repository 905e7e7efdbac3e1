"""Shared fixtures: real Redis (the embedded one, or the running one on 6379), real SQLite and
PostgreSQL job stores, real Celery worker processes, real files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from service.core.db import get_engine, migrate, session_scope
from service.core.keys import create_key
from service.core.queue import ping_workers
from service.core.settings import Settings
from service.processes import embedded_redis_command, wait_for_redis, worker_command

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SYSTEM_REDIS = os.environ.get("MODELSHRINK_TEST_REDIS", "redis://127.0.0.1:6379/0")
POSTGRES = os.environ.get("MODELSHRINK_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def env_of(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process (worker) see exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSHRINK_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, list):
            value = ",".join(value)
        env[f"MODELSHRINK_{name.upper()}"] = str(value)
    env["MODELSHRINK_DATABASE_URL"] = settings.resolved_database_url
    env["MODELSHRINK_BROKER_URL"] = settings.resolved_broker_url
    env["PYTHONPATH"] = str(ROOT)
    return env


def fast_settings(tmp: Path, **overrides: object) -> Settings:
    """Settings tuned so that failure handling (lease expiry, redelivery) takes seconds, not minutes."""
    values = dict(
        data_dir=tmp,
        broker_url=SYSTEM_REDIS,
        queue_name=f"test-{uuid.uuid4().hex[:10]}",
        lease_ttl_s=2.0,
        visibility_timeout_s=3.0,
        unacked_restore_interval_s=1.0,
        probe_memory_bytes=4 * 1024**3,
        webhook_allowed_hosts=["127.0.0.1", "localhost"],
        webhook_allow_private=True,
        webhook_secret="test-secret",
        webhook_max_retries=2,
        readiness_interval_s=0.5,
        reconcile_interval_s=1.0,
        reconcile_grace_s=3.0,
    )
    values.update(overrides)
    return Settings(**values)


def system_redis_available() -> bool:
    try:
        return bool(redis.Redis.from_url(SYSTEM_REDIS, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def postgres_available() -> bool:
    try:
        with get_engine(POSTGRES).connect():
            return True
    except Exception:  # noqa: BLE001 - any failure to reach it means it is not up
        return False


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    s = fast_settings(tmp_path)
    yield s
    # Leave the shared Redis as we found it: the queue and kombu's bindings for it.
    queues = (s.queue_name, f"{s.queue_name}.webhooks")
    redis.Redis.from_url(SYSTEM_REDIS).delete(*queues, *(f"_kombu.binding{kind}.{q}" for q in queues for kind in ("", "_permanent")))


def make_client(settings: Settings) -> TestClient:
    from service.api.app import create_app

    return TestClient(create_app(settings))


def new_key(settings: Settings, tenant: str = "acme") -> str:
    migrate(settings.resolved_database_url)
    with session_scope(settings.resolved_database_url) as session:
        return create_key(session, tenant)


@contextmanager
def authed_client(settings: Settings, tenant: str = "acme") -> Iterator[TestClient]:
    """An in-process API client carrying a new key of `tenant`."""
    with make_client(settings) as c:
        c.headers["Authorization"] = f"Bearer {new_key(settings, tenant=tenant)}"
        yield c


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with authed_client(settings) as c:
        yield c


class WorkerProcess:
    """A real `celery worker` process (prefork, concurrency 1) with the given settings."""

    def __init__(self, settings: Settings, log_path: Path, role: str = "jobs") -> None:
        self.settings = settings
        self.log = open(log_path, "ab")
        self.node = f"w{uuid.uuid4().hex[:6]}@"  # the Celery node name starts so (%h adds the host)
        self.proc = subprocess.Popen(
            worker_command(settings, hostname=f"{self.node}%h", role=role),
            env=env_of(settings), stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}; see {self.log.name}")
            if ping_workers(self.settings, timeout=0.5) > 0:
                return
        raise RuntimeError("worker did not answer a ping in time")

    def kill(self) -> None:
        """SIGKILL the whole worker (parent and pool child), as a crashed machine would."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator:
    workers: list[WorkerProcess] = []

    def start(settings: Settings, role: str = "jobs") -> WorkerProcess:
        worker = WorkerProcess(settings, tmp_path / f"worker{len(workers)}.log", role)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


@pytest.fixture
def embedded_redis(tmp_path: Path) -> Iterator[Settings]:
    """Settings using the service's own embedded redis-server (unix socket in the data dir)."""
    s = fast_settings(tmp_path, broker_url=None)
    proc = subprocess.Popen(embedded_redis_command(s), start_new_session=True)
    try:
        wait_for_redis(s.embedded_redis_socket)
        yield s
    finally:
        proc.terminate()
        proc.wait(10)


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05):
    """Poll a condition on state owned by another process (the job store) until it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")
