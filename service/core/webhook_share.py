"""A per-tenant share of the webhook deliverer's threads: one tenant's slow or dead endpoints (each
attempt may take WEBHOOK_TIMEOUT_S) must not hold every thread while other tenants' notifications
wait behind them. A Redis counter per tenant holds its deliveries in flight across every deliverer
process; a delivery over the share is sent back to the queue for a moment (not counted as a retry)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from service.core.events import redis_client
from service.core.settings import Settings

WAIT_S = 1.0  # how long a delivery over its tenant's share waits before it looks again


def _key(settings: Settings, tenant_id: str) -> str:
    return f"modelshrink:webhooks-in-flight:{settings.queue_name}:{tenant_id}"


@contextmanager
def tenant_slot(settings: Settings, tenant_id: str) -> Iterator[bool]:
    """Yields True with a slot held for the delivery, False when the tenant's share is taken."""
    client, key = redis_client(settings), _key(settings, tenant_id)
    held = int(client.incr(key)) <= settings.webhook_max_per_tenant
    # A deliverer killed mid-delivery must not leak its slot for ever: the count expires after the
    # longest a delivery can take, renewed by every delivery that starts.
    client.expire(key, int(settings.webhook_timeout_s * 2) + 5)
    try:
        yield held
    finally:
        client.decr(key)
