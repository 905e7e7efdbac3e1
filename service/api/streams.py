"""Caps on open event streams (SSE), overall and per tenant, so followers cannot starve other requests."""

from __future__ import annotations

import threading
from collections import Counter

from service.core.errors import ApiError


class TooManyStreams(ApiError):
    status = 429
    code = "too_many_streams"


class StreamSlot:
    """One open stream's place; releasing twice is harmless (the generator and the response both try)."""

    def __init__(self, limiter: "StreamLimiter", tenant_id: str) -> None:
        self.limiter, self.tenant_id, self.released = limiter, tenant_id, False

    def release(self) -> None:
        self.limiter._release(self)


class StreamLimiter:
    def __init__(self, total: int, per_tenant: int) -> None:
        self.total, self.per_tenant = total, per_tenant
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, tenant_id: str) -> StreamSlot:
        with self._lock:
            if self._open[tenant_id] >= self.per_tenant:
                raise TooManyStreams(f"this API key's tenant already follows {self.per_tenant} event streams; close one, or poll GET /v1/jobs/{{id}}")
            if sum(self._open.values()) >= self.total:
                raise TooManyStreams("the service is at its limit of open event streams; retry shortly, or poll GET /v1/jobs/{id}")
            self._open[tenant_id] += 1
        return StreamSlot(self, tenant_id)

    def _release(self, slot: StreamSlot) -> None:
        with self._lock:
            if not slot.released:
                slot.released = True
                self._open[slot.tenant_id] -= 1
                if self._open[slot.tenant_id] <= 0:
                    del self._open[slot.tenant_id]

    def open_count(self) -> int:
        with self._lock:
            return sum(self._open.values())
