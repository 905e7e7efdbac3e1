"""One tenant's slow webhook endpoints hold at most its share of the deliverer's threads: another
tenant's notification goes out at once (a real webhook worker, real Redis, real HTTP endpoints)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service.core.db import session_scope
from service.core.keys import tenant_for_key
from service.core.queue import enqueue_webhook
from service.core.settings import Settings
from service.core.tables import Job
from tests.conftest import new_key

pytestmark = pytest.mark.integration
SLOW_S = 4.0


class Endpoint:
    """Records, per path, when each delivery arrived and the most in flight at once; /slow answers late."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = self.most = 0
        self.fast_arrived = threading.Event()
        self.slow_done = 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/fast":
                    endpoint.fast_arrived.set()
                else:
                    with endpoint.lock:
                        endpoint.in_flight += 1
                        endpoint.most = max(endpoint.most, endpoint.in_flight)
                    time.sleep(SLOW_S)
                    with endpoint.lock:
                        endpoint.in_flight -= 1
                        endpoint.slow_done += 1
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _job_with_webhook(settings: Settings, tenant: str, url: str) -> str:
    key = new_key(settings, tenant)
    with session_scope(settings.resolved_database_url) as session:
        job = Job(tenant_id=tenant_for_key(session, key).id, model_id="m", status="succeeded", webhook_url=url)
        session.add(job)
        session.commit()
        return job.id


def test_a_tenants_slow_endpoints_leave_threads_for_the_others(settings: Settings, start_worker) -> None:
    settings = settings.model_copy(update={"webhook_concurrency": 4, "webhook_max_per_tenant": 2, "webhook_timeout_s": 10.0})
    endpoint = Endpoint()
    try:
        slow = [_job_with_webhook(settings, "noisy", f"{endpoint.url}/slow") for _ in range(4)]
        fast = _job_with_webhook(settings, "quiet", f"{endpoint.url}/fast")
        start_worker(settings, role="webhooks")
        for job_id in slow:
            enqueue_webhook(settings, job_id)
        deadline = time.monotonic() + 30
        while endpoint.in_flight < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert endpoint.in_flight == 2  # the noisy tenant's share is busy
        sent = time.monotonic()
        enqueue_webhook(settings, fast)
        assert endpoint.fast_arrived.wait(SLOW_S), "the quiet tenant's webhook waited behind the noisy tenant's"
        assert time.monotonic() - sent < SLOW_S and endpoint.slow_done == 0
        deadline = time.monotonic() + 4 * SLOW_S + 20
        while endpoint.slow_done < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert endpoint.slow_done == 4 and endpoint.most == 2  # all delivered, never more than the share at once
    finally:
        endpoint.server.shutdown()
