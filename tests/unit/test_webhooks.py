"""Webhooks: allow-list, no private addresses unless allowed, a verifiable signature."""

from __future__ import annotations

import json

import pytest

from service.core.errors import InvalidInput
from service.core.settings import Settings
from tests.webhook_receiver import webhook_receiver
from service.core.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookRefused, check_webhook_url, deliver, sign


def settings(**kw: object) -> Settings:
    return Settings(**{"webhook_secret": "s3cret", **kw})


@pytest.mark.parametrize(
    "url", ["ftp://hooks.example.com/x", "http://evil.example.org/x", "http://user:pw@hooks.example.com/x", "/relative"]
)
def test_urls_outside_the_allow_list_are_refused(url: str) -> None:
    with pytest.raises(InvalidInput):
        check_webhook_url(url, settings(webhook_allowed_hosts=["hooks.example.com"]))


def test_wildcard_allows_subdomains_only() -> None:
    s = settings(webhook_allowed_hosts=["*.example.com"])
    check_webhook_url("https://ci.example.com/hook", s)
    with pytest.raises(InvalidInput):
        check_webhook_url("https://example.com.evil.org/hook", s)


def test_allowed_host_resolving_to_loopback_is_refused() -> None:
    with pytest.raises(WebhookRefused):
        deliver("http://localhost:9/hook", {"id": "job_1"}, settings(webhook_allowed_hosts=["localhost"]))


def test_delivery_is_signed() -> None:
    s = settings(webhook_allowed_hosts=["127.0.0.1"], webhook_allow_private=True)
    with webhook_receiver(status=204) as hook:
        status = deliver(hook.url, {"id": "job_1", "status": "succeeded"}, s)
    assert status == 204
    assert json.loads(hook.body) == {"id": "job_1", "status": "succeeded"}
    assert hook.headers[SIGNATURE_HEADER] == sign(hook.body, hook.headers[TIMESTAMP_HEADER], "s3cret")


def test_an_endpoint_that_trickles_its_answer_is_cut_off_at_the_total_deadline() -> None:
    import socket
    import threading
    import time

    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:  # reads the request, then answers one byte every half second, for ever
        conn, _ = server.accept()
        conn.recv(65536)
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100000:
            if stop.wait(0.5):
                break
            try:
                conn.send(bytes([byte]))
            except OSError:
                break
        conn.close()

    threading.Thread(target=trickle, daemon=True).start()
    s = settings(webhook_allowed_hosts=["127.0.0.1"], webhook_allow_private=True, webhook_timeout_s=2)
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match="did not answer within 2 s"):
            deliver(f"http://127.0.0.1:{server.getsockname()[1]}/hook", {"id": "job_1"}, s)
        assert time.monotonic() - started < 3.5  # each read was well inside httpx's per-read timeout
    finally:
        stop.set()
        server.close()


def test_webhooks_have_their_own_queue_and_thread_pool_worker() -> None:
    from service.core.queue import webhook_queue
    from service.processes import worker_command

    s = settings(queue_name="q")
    command = worker_command(s, role="webhooks")
    assert webhook_queue(s) == "q.webhooks" and command[command.index("--queues") + 1] == "q.webhooks"
    assert command[command.index("--pool") + 1] == "threads"
    assert worker_command(s)[worker_command(s).index("--queues") + 1] == "q"
