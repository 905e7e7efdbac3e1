"""What the model and dataset upload routes share: receive the stream, check it, move it into place."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.core.artifacts import ArtifactStore
from service.core.errors import ServiceUnavailable
from service.core.quota import lock_tenant, storage_quota_exceeded, stored_bytes
from service.core.settings import Settings
from service.core.uploads import ReceivedUpload, receive_upload


def multipart_body(description: str) -> dict[str, Any]:
    # The upload is parsed by hand (streaming), so its OpenAPI request body is declared here.
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary", "description": description},
                            "name": {"type": "string", "description": "Display name (default: the file name)."},
                        },
                    }
                }
            },
        }
    }


class CheckQueue:
    """At most `slots` upload checks run at once (each is a child process using CPU and memory);
    others wait their turn without holding a thread, up to `max_waiting`, beyond which the API
    answers 503 with Retry-After rather than let waits grow without bound. A check's time limit
    starts when it runs, not while it waits."""

    def __init__(self, slots: int, max_waiting: int) -> None:
        self.semaphore = asyncio.Semaphore(slots)
        self.max_waiting, self.waiting = max_waiting, 0

    async def run(self, check: Callable[[Path], dict[str, Any]], path: Path) -> dict[str, Any]:
        if self.semaphore.locked() and self.waiting >= self.max_waiting:
            raise ServiceUnavailable("too many uploads are waiting to be checked; retry shortly", code="check_queue_full", retry_after_s=30)
        self.waiting += 1
        try:
            await self.semaphore.acquire()
        finally:
            self.waiting -= 1
        try:
            return await run_in_threadpool(check, path)
        finally:
            self.semaphore.release()


async def accept_upload(
    request: Request, session: Session, tenant_id: str, settings: Settings, store: ArtifactStore, check: Callable[[Path, str], dict[str, Any]],
    same_as: Callable[[str], Any] | None = None,
) -> tuple[ReceivedUpload, dict[str, Any]]:
    """Stream the upload to a temp file and run `check` (path, file name) on it off the event loop; no file survives a failure.
    With `same_as` (sha256 -> a stored row of this tenant's, or None), identical bytes uploaded again
    are not stored twice: the description is {"existing": row}."""
    used = await run_in_threadpool(stored_bytes, session, tenant_id)
    if used >= settings.tenant_max_stored_bytes:
        raise storage_quota_exceeded(used, settings)
    # Streaming and checking can take minutes: hold no pooled database connection meanwhile.
    await run_in_threadpool(session.close)
    upload = await receive_upload(request, store.temp_dir(), settings.max_upload_bytes)
    if same_as is not None:
        existing = await run_in_threadpool(same_as, upload.sha256)
        if existing is not None:
            upload.path.unlink(missing_ok=True)
            return upload, {"existing": existing}
    try:
        if used + upload.size_bytes > settings.tenant_max_stored_bytes:
            raise storage_quota_exceeded(used + upload.size_bytes, settings)
        description = await request.app.state.checks.run(lambda path: check(path, upload.filename), upload.path)
    except BaseException:
        upload.path.unlink(missing_ok=True)
        raise
    return upload, description


def commit_within_quota(session: Session, row: Any, settings: Settings, store: ArtifactStore, key: str) -> None:
    """Insert an upload's row only if the tenant's stored bytes, counted under its lock, leave room;
    otherwise remove the stored file and refuse (507). Concurrent uploads each checked at start."""
    lock_tenant(session, row.tenant_id)
    used = stored_bytes(session, row.tenant_id)
    if used + row.size_bytes > settings.tenant_max_stored_bytes:
        session.rollback()
        store.delete_prefix(key.rsplit("/", 1)[0])
        raise storage_quota_exceeded(used + row.size_bytes, settings)
    session.add(row)
    session.commit()


def move_into_store(upload: ReceivedUpload, store: ArtifactStore, key: str) -> None:
    store.import_file(key, upload.path)
