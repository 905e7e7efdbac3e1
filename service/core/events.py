"""Live job progress over Redis pub/sub: workers publish every milestone (each epoch, round, step),
the SSE endpoint forwards them as they happen. The job store stays the source of truth; a lost
message only delays an update until the endpoint's next look at the job row."""

from __future__ import annotations

import json
from typing import Any

import redis

from service.core.settings import Settings

_clients: dict[str, redis.Redis] = {}


def redis_url(settings: Settings) -> str:
    # Celery/kombu spell a unix socket "redis+socket:///path"; redis-py spells it "unix:///path".
    url = settings.resolved_broker_url
    return "unix://" + url.removeprefix("redis+socket://") if url.startswith("redis+socket://") else url


def redis_client(settings: Settings) -> redis.Redis:
    """A shared client (its own growing connection pool, short timeouts) for quick reads and publishes."""
    url = redis_url(settings)
    return _clients.get(url) or _clients.setdefault(url, redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2))


def channel(job_id: str) -> str:
    return f"modelshrink:job:{job_id}"


def publish(settings: Settings, job_id: str, payload: dict[str, Any]) -> None:
    """Best effort: progress must never fail a job because the broker blinked."""
    try:
        redis_client(settings).publish(channel(job_id), json.dumps(payload, default=str))
    except redis.RedisError:
        pass
