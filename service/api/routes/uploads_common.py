"""What the model and dataset upload routes share: receive the stream, check it, move it into place."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from service.core.artifacts import ArtifactStore
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


async def accept_upload(
    request: Request, settings: Settings, store: ArtifactStore, check: Callable[[Path], dict[str, Any]]
) -> tuple[ReceivedUpload, dict[str, Any]]:
    """Stream the upload to a temp file and run `check` on it off the event loop; no file survives a failure."""
    upload = await receive_upload(request, store.temp_dir(), settings.max_upload_bytes)
    try:
        description = await run_in_threadpool(check, upload.path)
    except BaseException:
        upload.path.unlink(missing_ok=True)
        raise
    return upload, description


def move_into_store(upload: ReceivedUpload, store: ArtifactStore, key: str) -> None:
    target = store.path(key)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(upload.path, target)
