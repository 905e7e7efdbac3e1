"""/v1/searches: search across methods to a target; candidates run as jobs on every worker."""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sse_starlette.sse import EventSourceResponse

from service.api.deps import CurrentTenant, SessionDep, SettingsDep
from service.api.follow import checked_stream_slot, follow
from service.api.idempotency import check_replay
from service.core.quota import active_jobs, check_room_for_results, lock_tenant
from service.api.page_headers import REPORT_PAGE_HEADERS
from service.api.routes.datasets import owned_dataset
from service.api.routes.models import owned_model
from service.api.schemas import AUTH_RESPONSES, INVALID_RESPONSE, ITEM_RESPONSES, MAX_OFFSET, ErrorResponse, SearchCreate, SearchesPublic, SearchPublic, SearchStatus
from service.core.datasets import check_against_model, check_labels_fit
from service.core.db import session_scope
from service.core.errors import Conflict, InvalidInput, NotFound, QuotaExceeded
from service.core.llm import LLM_FORMAT
from service.core.search_driver import advance, search_recipes
from service.core.search_report_html import render_search
from service.core.search_view import candidate_jobs, search_public
from service.core.tables import TERMINAL_STATUSES, Search, new_id, utcnow
from service.core.webhooks import check_webhook_url

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/searches", tags=["searches"], responses=AUTH_RESPONSES)
DEFAULT_MIN_FIDELITY = 0.99
DEFAULT_MAX_PERPLEXITY_INCREASE = 0.05


def owned_search(session, tenant_id: str, search_id: str) -> Search:
    search = session.get(Search, search_id)
    if search is None or search.tenant_id != tenant_id:
        raise NotFound(f"search {search_id} not found")
    return search


def _public(session, search: Search) -> dict[str, Any]:
    return search_public(search, candidate_jobs(session, search.id))


def _facts(session, tenant_id: str, body: SearchCreate) -> dict[str, Any]:
    """What the planner needs to know of the model and data, checked as a job's inputs are."""
    model = owned_model(session, tenant_id, body.model_id)
    if model.format == LLM_FORMAT:
        return _llm_facts(session, tenant_id, body)
    labels = {}
    for field, ds_id in (("dataset_id", body.dataset_id), ("eval_dataset_id", body.eval_dataset_id)):
        if ds_id is not None:
            dataset = owned_dataset(session, tenant_id, ds_id)
            if dataset.kind == "text":
                raise InvalidInput(f"{field} {ds_id} is a text dataset; text is for LLM checkpoints (format hf_causal_lm). "
                                   "An ONNX model takes a .npz with one array per input")
            check_against_model(dataset.arrays, model.inputs, what=f"{field} {ds_id}")
            check_labels_fit(dataset.arrays, model.outputs, what=f"{field} {ds_id}")
            labels[field] = dataset.has_labels
    judged_on = "eval_dataset_id" if body.eval_dataset_id else "dataset_id"
    return {
        "has_dataset": body.dataset_id is not None,
        "labels": labels.get(judged_on, False),
        # Token ids in, not pixels or features: a transformer (or another sequence model).
        "token_inputs": any(str(i.get("dtype", "")).startswith(("int", "uint")) for i in model.inputs),
    }


def _llm_facts(session, tenant_id: str, body: SearchCreate) -> dict[str, Any]:
    """A decoder LLM checkpoint: calibration and evaluation data are text, quality is perplexity."""
    for field, ds_id in (("dataset_id", body.dataset_id), ("eval_dataset_id", body.eval_dataset_id)):
        if ds_id is not None and owned_dataset(session, tenant_id, ds_id).kind != "text":
            raise InvalidInput(f"{field} {ds_id} holds arrays; an LLM checkpoint calibrates and is evaluated on text (.txt or .jsonl)")
    if body.max_accuracy_drop is not None or body.min_fidelity is not None:
        raise InvalidInput("a search over an LLM checkpoint is judged by perplexity on the evaluation text: give max_perplexity_increase "
                           f"(default {DEFAULT_MAX_PERPLEXITY_INCREASE}), not max_accuracy_drop or min_fidelity")
    return {"has_dataset": body.dataset_id is not None, "labels": False, "token_inputs": True, "llm": True}


def _request(body: SearchCreate, facts: dict[str, Any]) -> dict[str, Any]:
    request = body.model_dump(mode="json", exclude={"model_id", "dataset_id", "eval_dataset_id", "webhook_url"})
    if facts.get("llm"):
        if request["max_perplexity_increase"] is None:
            request["max_perplexity_increase"] = DEFAULT_MAX_PERPLEXITY_INCREASE
        return request
    if request["max_perplexity_increase"] is not None:
        raise InvalidInput("max_perplexity_increase judges searches over LLM checkpoints (format hf_causal_lm); "
                           "an ONNX model's search takes max_accuracy_drop and/or min_fidelity")
    if request["max_accuracy_drop"] is not None and not facts["labels"]:
        raise InvalidInput("max_accuracy_drop needs labels in the evaluation data (eval_dataset_id, else dataset_id); use min_fidelity without labels",
                           code="labels_required")
    if request["max_accuracy_drop"] is None and request["min_fidelity"] is None:
        request["min_fidelity"] = DEFAULT_MIN_FIDELITY
    return request


def _created(session, search: Search) -> JSONResponse:
    body = SearchPublic.model_validate(_public(session, search)).model_dump(mode="json")
    return JSONResponse(status_code=202, content=body, headers={"Location": f"/v1/searches/{search.id}"})


@router.post(
    "",
    status_code=202,
    response_model=SearchPublic,
    responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}, 422: INVALID_RESPONSE, 429: {"model": ErrorResponse},
               507: {"model": ErrorResponse, "description": "The tenant is at its storage quota (`storage_quota_exceeded`)."}},
)
def create_search(
    body: SearchCreate,
    session: SessionDep,
    tenant: CurrentTenant,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(max_length=255, description="Retries with the same key return the same search.")] = None,
) -> JSONResponse:
    """Start a search: recipes over the methods (quantize auto, pruning with fine-tuning, distilled
    widths, Deep Compression, low rank, and compositions with quantization) run as jobs on every worker,
    the first rung on a third of the fine-tuning budget, the promising ones again at full budget. On an
    LLM checkpoint: int4 (GPTQ, RTN), int4 with an int8 lm_head, auto mixed precision and int8, judged
    by perplexity on the evaluation text (`max_perplexity_increase`) and decode speed.
    Answers 202 with the search and `Location: /v1/searches/{id}`."""
    fingerprint = hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    if idempotency_key:
        existing = session.scalar(select(Search).where(Search.tenant_id == tenant.id, Search.idempotency_key == idempotency_key))
        if existing is not None:
            check_replay(existing.request.get("request_sha256"), fingerprint)
            return _created(session, existing)
    facts = _facts(session, tenant.id, body)
    request = _request(body, facts) | {"request_sha256": fingerprint}
    if body.webhook_url:
        check_webhook_url(body.webhook_url, settings)
    now = utcnow()
    search = Search(id=new_id("srch"), tenant_id=tenant.id, model_id=body.model_id, dataset_id=body.dataset_id, eval_dataset_id=body.eval_dataset_id,
                    request=request, facts=facts, idempotency_key=idempotency_key, webhook_url=body.webhook_url,
                    deadline_at=now + timedelta(minutes=body.budget_minutes), created_at=now)
    planned = len(search_recipes(search))
    if planned == 0:
        raise InvalidInput(f"no recipe of methods {', '.join(body.methods or [])} applies to this model and data "
                           "(training recipes need a dataset_id; an LLM checkpoint takes quantize recipes only)")
    lock_tenant(session, tenant.id)  # the count below and the insert are one step for this tenant
    check_room_for_results(session, tenant.id, settings)
    active = active_jobs(session, tenant.id)
    if active + planned > settings.tenant_max_active_jobs:
        raise QuotaExceeded(f"this search starts {planned} candidate jobs and this tenant has {active} queued or running, "
                            f"its limit is {settings.tenant_max_active_jobs}; wait for some to finish", retry_after_s=30)
    session.add(search)
    try:
        session.commit()
    except IntegrityError:  # a concurrent request with the same Idempotency-Key won the race
        session.rollback()
        existing = session.scalar(select(Search).where(Search.tenant_id == tenant.id, Search.idempotency_key == idempotency_key))
        if existing is None:
            raise
        check_replay(existing.request.get("request_sha256"), fingerprint)  # the race's loser with another body: 409, as for jobs
        return _created(session, existing)
    try:
        advance(settings, search.id)  # the first rung's jobs, handed to the broker
    except Exception:  # the search and its jobs are recorded; the reconciler dispatches them when the broker is back
        log.warning("search %s: first rung not dispatched yet", search.id, exc_info=True)
    session.refresh(search)
    return _created(session, search)


@router.get("", response_model=SearchesPublic)
def list_searches(
    session: SessionDep,
    tenant: CurrentTenant,
    status: SearchStatus | None = None,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> dict:
    conditions = [Search.tenant_id == tenant.id] + ([Search.status == status] if status else [])
    rows = session.scalars(select(Search).where(*conditions).order_by(Search.created_at.desc()).limit(limit).offset(offset)).all()
    count = session.scalar(select(func.count()).select_from(Search).where(*conditions))
    return {"data": [_public(session, s) for s in rows], "count": count}


@router.get("/{search_id}", responses=ITEM_RESPONSES, response_model=SearchPublic)
def get_search(search_id: str, session: SessionDep, tenant: CurrentTenant) -> dict:
    return _public(session, owned_search(session, tenant.id, search_id))


@router.post("/{search_id}/cancel", status_code=202, response_model=SearchPublic, responses={**ITEM_RESPONSES, 409: {"model": ErrorResponse}})
def cancel_search(search_id: str, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep) -> dict:
    """Cancel the search and every unfinished candidate (queued ones never start; running ones stop at
    their next step or epoch boundary). Finished candidates, their metrics and artifacts are kept."""
    search = owned_search(session, tenant.id, search_id)
    if search.status in TERMINAL_STATUSES:
        raise Conflict(f"search {search_id} already ended ({search.status})")
    search.cancel_requested = True
    session.commit()
    advance(settings, search_id)
    session.refresh(search)
    return _public(session, search)


@router.get(
    "/{search_id}/events",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}}, 404: {"model": ErrorResponse}, 429: {"model": ErrorResponse}},
)
async def search_events(search_id: str, request: Request, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep) -> EventSourceResponse:
    """Server-sent events: `progress` whenever a candidate ends or a rung starts, then one `end` event
    with the final search."""
    slot = await checked_stream_slot(request, settings, tenant.id, session, lambda: owned_search(session, tenant.id, search_id))
    url = settings.resolved_database_url

    def snapshot() -> dict[str, Any]:
        with session_scope(url) as s:
            return SearchPublic.model_validate(_public(s, s.get(Search, search_id))).model_dump(mode="json")

    return follow(request, settings, tenant.id, search_id, snapshot, slot)


@router.get("/{search_id}/report.html", response_class=Response, responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}}, **ITEM_RESPONSES})
def search_report_html(search_id: str, session: SessionDep, tenant: CurrentTenant) -> HTMLResponse:
    """The search as one self-contained page (inline SVG): the outcome, the Pareto scatters with the
    best marked, and every candidate's recipe, rung, status and numbers."""
    return HTMLResponse(render_search(_public(session, owned_search(session, tenant.id, search_id))), headers=REPORT_PAGE_HEADERS)
