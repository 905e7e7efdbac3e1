"""Server-sent events for anything with a status and progress (a job, a search): `progress` events as
they are published on Redis, then one `end` event with the final object."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from fastapi import Request
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask

from service.api.own_threads import on_own_threads
from service.core.events import channel, redis_url
from service.core.settings import Settings
from service.core.tables import TERMINAL_STATUSES

# Terminal states are published; the row is re-read only this often as a fallback.
RECHECK_INTERVAL_S = 10.0


async def in_stream_thread(request: Request, settings: Settings, work: Callable[[], Any]) -> Any:
    """`work` on the event streams' own threads (settings.stream_threads), not the shared pool: a burst
    of followers then queues behind itself, and another tenant's request does not wait behind 60
    ownership checks and first snapshots (1.07 s on CI's two cores, against a one-second goal)."""
    return await on_own_threads(request, "streams", settings.stream_threads, work)


async def checked_stream_slot(request: Request, settings: Settings, tenant_id: str, session: Any, check: Callable[[], Any]) -> Any:
    """A stream slot for this tenant, taken before the database is touched (followers beyond the caps
    get 429 at no cost), then `check` (the ownership lookup) and the session's close in one thread
    call: a request never holds a pooled connection while it waits for a thread (60 followers at
    once exhausted the pool and answered 500 while another tenant's request waited 31 s)."""
    slot = request.app.state.streams.acquire(tenant_id)

    def check_and_release() -> None:
        try:
            check()
        finally:
            session.close()

    try:
        await in_stream_thread(request, settings, check_and_release)
    except BaseException:
        slot.release()
        raise
    return slot


def follow(request: Request, settings: Settings, tenant_id: str, object_id: str, snapshot: Callable[[], dict[str, Any]], slot: Any = None) -> EventSourceResponse:
    """`snapshot` reads the object fresh from the store (in a thread: it opens its own session).
    The caller has checked ownership and closed its pooled session: a stream may stay open for hours."""
    slot = slot or request.app.state.streams.acquire(tenant_id)

    async def stream():
        client = aioredis.Redis.from_url(redis_url(settings))
        pubsub = client.pubsub()
        try:
            # Subscribe before reading the row, so nothing between the two is missed.
            await pubsub.subscribe(channel(object_id))
            current = await in_stream_thread(request, settings, snapshot)
            last = (current["status"], current["progress"])
            yield {"event": "progress", "data": json.dumps({"status": current["status"], "progress": current["progress"]})}
            while current["status"] not in TERMINAL_STATUSES and not await request.is_disconnected():
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=RECHECK_INTERVAL_S)
                if message is not None:
                    update = json.loads(message["data"])
                    if (update["status"], update["progress"]) != last and update["status"] not in TERMINAL_STATUSES:
                        last = (update["status"], update["progress"])
                        yield {"event": "progress", "data": json.dumps(update)}
                    if update["status"] not in TERMINAL_STATUSES:
                        continue
                # A terminal message, or quiet for a while: the row decides (it also catches changes
                # nobody published).
                current = await in_stream_thread(request, settings, snapshot)
            if current["status"] in TERMINAL_STATUSES:
                yield {"event": "progress", "data": json.dumps({"status": current["status"], "progress": current["progress"]})}
                yield {"event": "end", "data": json.dumps(current)}
        finally:
            slot.release()
            await pubsub.aclose()
            await client.aclose()

    # The background task releases the slot too, in case the client left before the stream started.
    return EventSourceResponse(stream(), ping=15, background=BackgroundTask(slot.release))
