"""Idempotency-Key replays, one rule for jobs and searches: the same key with the same body returns
what the first request created; with another body it answers 409, whether the first request
finished long ago or won a race against this one by milliseconds (searches used to answer 202 with
the winner's search in that race)."""

from __future__ import annotations

from service.core.errors import Conflict


def check_replay(stored_fingerprint: str | None, fingerprint: str) -> None:
    if stored_fingerprint != fingerprint:
        raise Conflict("this Idempotency-Key was already used for a different request", code="idempotency_key_reused")
