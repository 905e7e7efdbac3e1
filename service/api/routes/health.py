"""Liveness, readiness and Prometheus metrics (no API key: these are for the orchestrator)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from service.api.deps import SettingsDep
from service.core.db import session_scope
from service.core.queue import ping_workers, queue_depth

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    """The API process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "A dependency is not reachable."}})
async def readyz(settings: SettingsDep) -> JSONResponse:
    """Ready when the database and the broker answer and at least one worker replies to a ping."""
    checks: dict[str, dict] = {}

    def database() -> None:
        with session_scope(settings.resolved_database_url) as session:
            session.execute(text("SELECT 1"))

    for name, probe in (("database", database), ("broker", lambda: queue_depth(settings))):
        try:
            await run_in_threadpool(probe)
            checks[name] = {"ok": True}
        except Exception as exc:
            checks[name] = {"ok": False, "message": type(exc).__name__}
    try:
        workers = await run_in_threadpool(ping_workers, settings, 1.0) if checks["broker"]["ok"] else 0
    except Exception:
        workers = 0
    checks["workers"] = {"ok": workers > 0, "count": workers}
    ready = all(c["ok"] for c in checks.values())
    return JSONResponse(status_code=200 if ready else 503, content={"status": "ready" if ready else "not_ready", "checks": checks})


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus exposition: requests, jobs by status, job durations, queue depth."""
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
