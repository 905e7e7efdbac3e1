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
