"""/v1/jobs: submit, list, show, cancel, follow (SSE) and download the artifacts of compression jobs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sse_starlette.sse import EventSourceResponse

from service.api.follow import checked_stream_slot, follow
from service.api.deps import CurrentTenant, SessionDep, SettingsDep, StoreDep
from service.api.routes.datasets import owned_dataset
from service.api.routes.models import owned_model
from service.api.schemas import AUTH_RESPONSES, INVALID_RESPONSE, ITEM_RESPONSES, MAX_OFFSET, ErrorResponse, ArtifactUrl, JobCreate, JobPublic, JobsPublic, JobStatus
from service.api.idempotency import check_replay
from service.api.job_status import status_in_thread
from service.core.quota import active_jobs, check_room_for_results, lock_tenant
from service.api.page_headers import REPORT_PAGE_HEADERS
from service.core import report_html
from service.core.retention import remove_artifacts
from service.core.datasets import check_against_model, check_labels_fit
from service.core.db import session_scope
from service.core.events import publish
from service.core.errors import Conflict, InvalidInput, NotFound, QuotaExceeded, ServiceUnavailable
from service.core.jobstore import aware, job_public, request_cancel
from service.core.llm import LLM_FORMAT, check_llm_job
from service.core.dispatch import dispatch
from service.core.job_end import EndedJob, on_job_ended
from service.core.specs import StepCheck
from service.core.tables import TERMINAL_STATUSES, Job, new_id
from service.core.webhooks import check_webhook_url

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=AUTH_RESPONSES)


def owned_job(session, tenant_id: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"job {job_id} not found")
    return job


def _fingerprint(body: JobCreate) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _validate_inputs(session, tenant_id: str, body: JobCreate, settings) -> None:
    model = owned_model(session, tenant_id, body.model_id)
    datasets = {}
    for field, ds_id in (("dataset_id", body.dataset_id), ("eval_dataset_id", body.eval_dataset_id)):
        if ds_id is not None:
            datasets[field] = owned_dataset(session, tenant_id, ds_id)
    check_llm_job(model, body.steps, datasets)
    if model.format != LLM_FORMAT:  # a checkpoint's steps and text need no array or layer checks
        _check_onnx_job(session, tenant_id, body, model, datasets)
    if body.webhook_url:
        check_webhook_url(body.webhook_url, settings)
    _check_limits(body, settings)


def _check_onnx_job(session, tenant_id: str, body: JobCreate, model, datasets: dict) -> None:
    for field, dataset in datasets.items():
        check_against_model(dataset.arrays, model.inputs, what=f"{field} {dataset.id}")
        check_labels_fit(dataset.arrays, model.outputs, what=f"{field} {dataset.id}")
    dataset = datasets.get("dataset_id")
    for index, step in enumerate(body.steps):
        if step.needs_dataset() and body.dataset_id is None:
            raise InvalidInput(f"steps[{index}] ({step.method}) needs data (calibration, fine-tuning or importance): set dataset_id")
        step.check(StepCheck(index, model, dataset, lambda other_id: owned_model(session, tenant_id, other_id)))
        if step.writes_bundle and index != len(body.steps) - 1:
            raise InvalidInput(f"steps[{index}] ({step.method}) writes the final storage bundle, so it must be the last step")


def _check_limits(body: JobCreate, settings) -> None:
    limits = body.limits
    if limits.time_limit_s is not None and limits.time_limit_s > settings.job_time_limit_s:
        raise InvalidInput(f"limits.time_limit_s: at most {settings.job_time_limit_s:.0f} s on this service", code="limit_too_high")
    if limits.memory_limit_mb is not None and limits.memory_limit_mb * 1024**2 > settings.job_memory_limit_bytes:
        raise InvalidInput(f"limits.memory_limit_mb: at most {settings.job_memory_limit_bytes // 1024**2} MiB on this service", code="limit_too_high")


def _created(job: Job) -> JSONResponse:
    return JSONResponse(
        status_code=202, content=JobPublic.model_validate(job_public(job)).model_dump(mode="json"), headers={"Location": f"/v1/jobs/{job.id}"}
    )


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: INVALID_RESPONSE, 429: {"model": ErrorResponse},
               503: {"model": ErrorResponse}, 507: {"model": ErrorResponse, "description": "The tenant is at its storage quota (`storage_quota_exceeded`)."}},
)
def create_job(
    body: JobCreate,
    session: SessionDep,
    tenant: CurrentTenant,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(max_length=255, description="Retries with the same key return the same job.")] = None,
) -> JSONResponse:
    """Submit a compression job: an ordered list of steps applied to the model. Answers 202 with the
    queued job and `Location: /v1/jobs/{id}`."""
    fingerprint = _fingerprint(body)
    if idempotency_key:
        existing = session.scalar(select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == idempotency_key))
        if existing is not None:
            check_replay(existing.options.get("request_sha256"), fingerprint)
            return _created(existing)
    _validate_inputs(session, tenant.id, body, settings)
    lock_tenant(session, tenant.id)  # the count below and the insert are one step for this tenant
    check_room_for_results(session, tenant.id, settings)
    active = active_jobs(session, tenant.id)
    if active >= settings.tenant_max_active_jobs:
        # Also what keeps one tenant's backlog from starving the others in the shared FIFO queue.
        raise QuotaExceeded(
            f"this tenant has {active} queued or running jobs, its limit is {settings.tenant_max_active_jobs}; wait for some to finish",
            retry_after_s=30,
        )
    job = Job(
        id=new_id("job"),
        tenant_id=tenant.id,
        model_id=body.model_id,
        dataset_id=body.dataset_id,
        eval_dataset_id=body.eval_dataset_id,
        steps=[s.model_dump(mode="json") for s in body.steps],
        options={"measure": body.measure.model_dump(mode="json"), "limits": body.limits.model_dump(mode="json"), "request_sha256": fingerprint},
        idempotency_key=idempotency_key,
        webhook_url=body.webhook_url,
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:  # a concurrent request with the same Idempotency-Key won the race
        session.rollback()
        existing = session.scalar(select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == idempotency_key))
        if existing is None:
            raise
        check_replay(existing.options.get("request_sha256"), fingerprint)
        return _created(existing)
    try:
        # Straight to the broker unless this tenant already has its share there (service.core.dispatch).
        dispatch(settings, tenant.id)
    except Exception as exc:
        session.refresh(job)
        if job.dispatched_at is None:
            # Nothing was accepted: remove the row so a retry starts clean instead of a job that never runs.
            session.delete(job)
            session.commit()
            raise ServiceUnavailable("the job queue (Redis) is unreachable; try again shortly", code="broker_unavailable") from exc
    return _created(job)


@router.get("", response_model=JobsPublic)
def list_jobs(
    session: SessionDep,
    tenant: CurrentTenant,
    status: JobStatus | None = None,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> dict:
    conditions = [Job.tenant_id == tenant.id] + ([Job.status == status] if status else [])
    rows = session.scalars(select(Job).where(*conditions).order_by(Job.created_at.desc()).limit(limit).offset(offset)).all()
    count = session.scalar(select(func.count()).select_from(Job).where(*conditions))
    return {"data": [job_public(j) for j in rows], "count": count}


@router.get("/{job_id}", responses=ITEM_RESPONSES, response_model=JobPublic)
async def get_job(job_id: str, request: Request, tenant: CurrentTenant, settings: SettingsDep) -> Response:
    # What every pipeline polls: built in one thread hop by service.api.job_status (returned as a
    # dict, FastAPI would validate it again in a second hop), on a few threads of its own.
    body = await status_in_thread(request, settings, tenant.id, job_id)
    return Response(body, media_type="application/json")


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic, responses={**ITEM_RESPONSES, 409: {"model": ErrorResponse}})
def cancel_job(job_id: str, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep) -> dict:
    """A queued job is cancelled at once and never starts; a running one stops at its next step or
    epoch boundary (`cancel_requested` is true until then)."""
    job = owned_job(session, tenant.id, job_id)
    if job.status in TERMINAL_STATUSES:
        raise Conflict(f"job {job_id} already ended ({job.status})")
    status = request_cancel(session, job)
    publish(settings, job.id, {"status": status, "progress": job.progress or {}})
    if status == "cancelled":  # a queued job ended here; a running one ends in its worker, which does the same
        on_job_ended(settings, EndedJob.of(job))
    return job_public(job)


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}}, 404: {"model": ErrorResponse}, 429: {"model": ErrorResponse}},
)
async def job_events(job_id: str, request: Request, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep) -> EventSourceResponse:
    """Server-sent events: `progress` events as the worker reports them (every epoch, round and
    step), then one `end` event with the final job. Open streams are capped per tenant and overall
    (429 `too_many_streams`)."""
    # A stream may stay open for hours: it must not hold a pooled database connection while it waits.
    slot = await checked_stream_slot(request, settings, tenant.id, session, lambda: owned_job(session, tenant.id, job_id))
    url = settings.resolved_database_url

    def snapshot() -> dict[str, Any]:
        with session_scope(url) as s:
            return JobPublic.model_validate(job_public(s.get(Job, job_id))).model_dump(mode="json")

    return follow(request, settings, tenant.id, job_id, snapshot, slot)


# response_class Response: error answers are documented as the JSON they are; the page itself as text/html.
@router.get("/{job_id}/report.html", response_class=Response, responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}}, **ITEM_RESPONSES})
def job_report_html(job_id: str, session: SessionDep, tenant: CurrentTenant) -> HTMLResponse:
    """The job's report as one self-contained page (inline SVG): before/after bars, warnings, per-layer
    bars, training curves, quantize's candidates; for a running or failed job, what is known so far."""
    return HTMLResponse(report_html.render(job_public(owned_job(session, tenant.id, job_id))), headers=REPORT_PAGE_HEADERS)


def _no_artifact(job: Job, name: str) -> str:
    if job.artifacts_removed_at is not None:
        return f"job {job.id}'s artifacts were removed on {aware(job.artifacts_removed_at):%Y-%m-%d %H:%M} UTC ({job.artifacts_removed_reason}); its metrics and report stay"
    return f"job {job.id} has no artifact '{name}'" + ("" if job.status == "succeeded" else f" (status: {job.status})")


@router.delete("/{job_id}/artifacts", status_code=204, responses={**ITEM_RESPONSES, 409: {"model": ErrorResponse, "description": "The job has not ended (`conflict`)."}})
def delete_artifacts(job_id: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep) -> Response:
    """Remove a finished job's artifacts (model, bundle, report.json) to free the tenant's storage
    quota; the job, its metrics and its report page stay, `artifacts_removed` says when."""
    job = owned_job(session, tenant.id, job_id)
    if not remove_artifacts(session, store, job, "deleted by the user"):
        raise Conflict(f"job {job_id} is {job.status}: its artifacts can be removed once it ends", code="conflict")
    return Response(status_code=204)


@router.get("/{job_id}/artifacts/{name}/url", response_model=ArtifactUrl, responses={**ITEM_RESPONSES, 409: {"model": ErrorResponse}})
def artifact_url(job_id: str, name: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep, settings: SettingsDep) -> dict:
    """A presigned URL that downloads the artifact straight from the object store (large models need
    not pass through the API). Only with S3-compatible artifact storage: 409 `presigned_unavailable` otherwise."""
    job = owned_job(session, tenant.id, job_id)
    artifact = next((a for a in job.artifacts or [] if a["name"] == name), None)
    if artifact is None:
        raise NotFound(_no_artifact(job, name))
    url = store.presigned_url(f"jobs/{tenant.id}/{job_id}/{name}", name, settings.presigned_url_ttl_s)
    if url is None:
        raise Conflict("this service stores artifacts on disk, not in object storage: download through GET .../artifacts/{name}", code="presigned_unavailable")
    return {"url": url, "expires_in_s": settings.presigned_url_ttl_s, "sha256": artifact["sha256"]}


@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}, "application/zip": {}, "application/json": {}}}, 404: {"model": ErrorResponse}},
)
def download_artifact(job_id: str, name: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep) -> Response:
    """Download an artifact of a succeeded job: `model.onnx` (the compressed model; `model.zip`, the
    graph with its external data, when it is over 2 GB), `model.msz` (a Huffman bundle) or `report.json`."""
    job = owned_job(session, tenant.id, job_id)
    if name not in {a["name"] for a in job.artifacts or []}:
        raise NotFound(_no_artifact(job, name))
    media = {".json": "application/json", ".zip": "application/zip"}.get(Path(name).suffix, "application/octet-stream")
    return FileResponse(store.path(f"jobs/{tenant.id}/{job_id}/{name}"), media_type=media, filename=name)
