"""Readiness, checked in the background so `/readyz` answers at once from the last result.

Probing on every request let a burst of probes exhaust the broker connection pool and wedge the API
(every request thread waiting on it); a probe also took over a second (the worker ping), longer than
Kubernetes' default probe timeout. Here one thread checks the database, the broker and the workers
every `readiness_interval_s`, each with its own timeout, and requests only read the result.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from sqlalchemy import text

from service.core.db import session_scope
from service.core.events import redis_url
from service.core.queue import ping_workers
from service.core.settings import Settings

log = logging.getLogger(__name__)


class ReadinessMonitor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="readiness")
        self._result: dict[str, Any] = {"ready": False, "checks": {"startup": {"ok": False, "message": "first check not finished"}}, "checked_at": None}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def snapshot(self) -> dict[str, Any]:
        result = dict(self._result)
        if result["checked_at"] is not None:
            result["age_s"] = round(time.monotonic() - result.pop("checked_at"), 3)
        else:
            result.pop("checked_at")
        return result

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._result = {**self.check(), "checked_at": time.monotonic()}
            self._stop.wait(self.settings.readiness_interval_s)

    def check(self) -> dict[str, Any]:
        checks: dict[str, dict[str, Any]] = {}

        def database() -> None:
            with session_scope(self.settings.resolved_database_url) as session:
                session.execute(text("SELECT 1"))

        def broker() -> None:
            client = redis.Redis.from_url(redis_url(self.settings), socket_timeout=1, socket_connect_timeout=1)
            try:
                client.ping()
            finally:
                client.close()

        for name, probe in (("database", database), ("broker", broker)):
            try:
                probe()
                checks[name] = {"ok": True}
            except Exception as exc:  # noqa: BLE001 - any failing dependency is reported as not ready, by name
                checks[name] = {"ok": False, "message": type(exc).__name__}
        workers = 0
        if checks["broker"]["ok"]:
            try:
                workers = ping_workers(self.settings, 1.0)
            except Exception:
                log.warning("worker ping failed", exc_info=True)
        checks["workers"] = {"ok": workers > 0, "count": workers}
        return {"ready": all(c["ok"] for c in checks.values()), "checks": checks}
