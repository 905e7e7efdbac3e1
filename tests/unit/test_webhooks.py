"""Webhooks: allow-list, no private addresses unless allowed, a verifiable signature."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from service.core.errors import InvalidInput
from service.core.settings import Settings
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
    received = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            received["body"] = self.rfile.read(int(self.headers["Content-Length"]))
            received["headers"] = dict(self.headers)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.handle_request, daemon=True).start()
    s = settings(webhook_allowed_hosts=["127.0.0.1"], webhook_allow_private=True)
    status = deliver(f"http://127.0.0.1:{server.server_port}/hook", {"id": "job_1", "status": "succeeded"}, s)
    server.server_close()
    assert status == 204
    assert json.loads(received["body"]) == {"id": "job_1", "status": "succeeded"}
    assert received["headers"][SIGNATURE_HEADER] == sign(received["body"], received["headers"][TIMESTAMP_HEADER], "s3cret")
