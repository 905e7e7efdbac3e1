"""Blocking work on a few threads kept for one kind of request, instead of the threadpool every
other route shares: a burst of that kind then queues behind itself, and other requests do not wait
behind it (event streams' ownership checks and snapshots; status polling). The pools' sizes are
settings (service.core.settings: stream_threads, status_threads)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from fastapi import Request

T = TypeVar("T")


async def on_own_threads(request: Request, pool: str, size: int, work: Callable[..., T], *args: Any) -> T:
    """`work(*args)` on the `size` threads of `pool`, one set of limiters per app (made on the event
    loop that uses them, the first time each pool is asked for)."""
    pools: dict[str, anyio.CapacityLimiter] | None = getattr(request.app.state, "own_thread_pools", None)
    if pools is None:
        pools = request.app.state.own_thread_pools = {}
    limiter = pools.get(pool)
    if limiter is None:
        limiter = pools[pool] = anyio.CapacityLimiter(size)
    return await anyio.to_thread.run_sync(work, *args, limiter=limiter)
