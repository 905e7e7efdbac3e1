"""Liveness, readiness and Prometheus metrics (no API key: these are for the orchestrator)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    """The API process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "A dependency is not reachable, or the first check has not finished."}})
def readyz(request: Request) -> JSONResponse:
    """Ready when the database and the broker answer and at least one worker replied to a ping. The
    checks run in the background every few seconds (`age_s` says how old this answer is), so a probe
    answers at once and a burst of probes costs nothing."""
    result = request.app.state.readiness.snapshot()
    ready = result.pop("ready")
    return JSONResponse(status_code=200 if ready else 503, content={"status": "ready" if ready else "not_ready", **result})


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus exposition: requests, jobs by status, job durations, queue depth."""
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
