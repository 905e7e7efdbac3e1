"""Short-lived links to one tenant's report page or artifact that work without the API key: a
report opened in a new browser tab, or passed to a colleague, for a while.

The token is the link's claims (tenant, kind, id, what, expiry) in base64url and an HMAC-SHA256 of
them with the service's signing secret: nothing is stored, a changed claim breaks the signature,
and an expired link answers 404 like an unknown one. Every API process must share the secret
(MODELSHRINK_SIGNING_SECRET); without it, one is made on first use and kept in the data directory
(one machine). Written by hand: it is twenty lines of the standard library (hmac, base64), where a
JWT library would bring algorithms and headers this does not need."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from service.core.settings import Settings

KINDS = ("job", "search")


@dataclass(frozen=True)
class Link:
    tenant_id: str
    kind: str
    resource_id: str
    what: str
    expires_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def signing_secret(settings: Settings) -> bytes:
    if settings.signing_secret:
        return settings.signing_secret.encode()
    path = Path(settings.data_dir) / "signing.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # exclusive create: two processes starting together agree on the first one's secret
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def sign(settings: Settings, link: Link) -> str:
    claims = _b64(json.dumps([link.tenant_id, link.kind, link.resource_id, link.what, link.expires_at], separators=(",", ":")).encode())
    mac = hmac.new(signing_secret(settings), claims.encode(), hashlib.sha256).digest()
    return f"{claims}.{_b64(mac)}"


def verify(settings: Settings, token: str, now: float | None = None) -> Link | None:
    """The link a token stands for, or None (forged, altered, malformed or expired)."""
    try:
        claims, mac = token.split(".", 1)
        expected = hmac.new(signing_secret(settings), claims.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(mac)):
            return None
        tenant_id, kind, resource_id, what, expires_at = json.loads(_unb64(claims))
        link = Link(str(tenant_id), str(kind), str(resource_id), str(what), int(expires_at))
    except (ValueError, TypeError, json.JSONDecodeError):
        return None
    if link.kind not in KINDS or link.expires_at < (now if now is not None else time.time()):
        return None
    return link
