"""Job-finished webhooks, guarded against SSRF.

A webhook URL is accepted only if its host is on the operator's allow-list
(MODELSHRINK_WEBHOOK_ALLOWED_HOSTS; "*.example.com" allows subdomains), and a delivery is made only
if every address the host resolves to is public, unless MODELSHRINK_WEBHOOK_ALLOW_PRIVATE is set.
The body is signed: X-Modelshrink-Signature: sha256=HMAC(secret, timestamp + "." + body).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import asyncio
import json
import secrets
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from service.core.errors import InvalidInput
from service.core.settings import Settings

SIGNATURE_HEADER = "X-Modelshrink-Signature"
TIMESTAMP_HEADER = "X-Modelshrink-Timestamp"


class WebhookRefused(Exception):
    """The destination is not allowed (permanent: not retried)."""


def _host_allowed(host: str, allowed: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for pattern in allowed:
        if pattern == host or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


def check_webhook_url(url: str, settings: Settings) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("webhook_url must be an absolute http(s) URL", code="invalid_webhook")
    if parts.username or parts.password:
        raise InvalidInput("webhook_url must not carry credentials", code="invalid_webhook")
    if not _host_allowed(parts.hostname, settings.webhook_allowed_hosts):
        raise InvalidInput(
            f"webhook host '{parts.hostname}' is not allowed; the operator lists allowed hosts in "
            "MODELSHRINK_WEBHOOK_ALLOWED_HOSTS",
            code="webhook_host_not_allowed",
        )


def _check_addresses(host: str, port: int, settings: Settings) -> None:
    if settings.webhook_allow_private:
        return
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ConnectionError(f"cannot resolve {host}") from exc
    for info in infos:
        addr = ipaddress.ip_address(info[4][0])
        if not addr.is_global:
            raise WebhookRefused(f"{host} resolves to a non-public address")


def webhook_secret(settings: Settings) -> str:
    if settings.webhook_secret:
        return settings.webhook_secret
    # Single-machine default: a secret generated once and kept in the data directory.
    path = settings.data_dir / "webhook_secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


def sign(body: bytes, timestamp: str, secret: str) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def deliver(url: str, payload: dict[str, Any], settings: Settings) -> int:
    """POST once within `webhook_timeout_s` in all (connect, send, every read together: an endpoint
    that trickles its answer cannot hold a delivery worker); raise WebhookRefused (permanent) or an
    httpx/OS/timeout error (retryable)."""
    check_webhook_url(url, settings)
    parts = urlsplit(url)
    _check_addresses(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80), settings)
    body = json.dumps(payload, default=str, sort_keys=True).encode()
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(body, timestamp, webhook_secret(settings)),
    }
    timeout = settings.webhook_timeout_s

    async def post() -> httpx.Response:
        # No redirects: a redirect could point at a host the allow-list never saw.
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            return await client.post(url, content=body, headers=headers)

    async def post_by_deadline() -> httpx.Response:
        return await asyncio.wait_for(post(), timeout)

    try:
        response = asyncio.run(post_by_deadline())
    except asyncio.TimeoutError as exc:
        raise TimeoutError(f"the webhook endpoint did not answer within {timeout:.0f} s") from exc
    if response.status_code >= 500 or response.status_code == 429:
        raise ConnectionError(f"webhook answered {response.status_code}")
    return response.status_code
