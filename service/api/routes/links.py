"""/v1/links: short-lived signed links to a report page or an artifact, opened without the API key
(a new browser tab, a colleague), bound to the tenant and the one resource (service.core.signed_links)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from service.api.page_headers import REPORT_PAGE_HEADERS
from service.api.deps import CurrentTenant, SessionDep, SettingsDep, StoreDep
from service.api.routes.jobs import owned_job
from service.api.routes.searches import _public as search_view
from service.api.routes.searches import owned_search
from service.api.schemas import AUTH_RESPONSES, INVALID_RESPONSE, ITEM_RESPONSES
from service.core import report_html
from service.core.errors import InvalidInput, NotFound
from service.core.jobstore import job_public
from service.core.search_report_html import render_search
from service.core.signed_links import Link, sign, verify

router = APIRouter(prefix="/v1/links", tags=["links"])


class LinkCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["job", "search"]
    id: str = Field(max_length=64)
    what: str = Field("report.html", max_length=64, description="report.html, or (for a job) one of its artifacts, e.g. model.onnx.")
    expires_in_s: int = Field(3600, ge=60, description="How long the link works (at most the operator's shared_link_max_s, a week by default).")


class LinkPublic(BaseModel):
    url: str = Field(description="Path on this server: GET it without the API key until it expires.")
    expires_in_s: int
    expires_at: int = Field(description="Unix time.")


@router.post("", status_code=201, response_model=LinkPublic, responses={**AUTH_RESPONSES, **ITEM_RESPONSES, 422: INVALID_RESPONSE})
def create_link(body: LinkCreate, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep) -> dict:
    """A link to one of the tenant's report pages or job artifacts that works without the key for a while."""
    if body.expires_in_s > settings.shared_link_max_s:
        raise InvalidInput(f"expires_in_s is at most {settings.shared_link_max_s} on this server", code="invalid_input")
    if body.kind == "job":
        job = owned_job(session, tenant.id, body.id)
        if body.what != "report.html" and body.what not in {a["name"] for a in job.artifacts or []}:
            raise NotFound(f"job {body.id} has no artifact '{body.what}'" + ("" if job.status == "succeeded" else f" (status: {job.status})"))
    else:
        owned_search(session, tenant.id, body.id)
        if body.what != "report.html":
            raise InvalidInput("a search's shared link is to its report.html", code="invalid_input")
    expires_at = int(time.time()) + body.expires_in_s
    token = sign(settings, Link(tenant.id, body.kind, body.id, body.what, expires_at))
    return {"url": f"/v1/links/{token}", "expires_in_s": body.expires_in_s, "expires_at": expires_at}


@router.get("/{token}", response_class=Response, responses={200: {"content": {"text/html": {}, "application/octet-stream": {}}}, **ITEM_RESPONSES})
def open_link(token: str, session: SessionDep, settings: SettingsDep, store: StoreDep) -> Response:
    """What a signed link points to; 404 once it has expired, or if it was altered (no key needed)."""
    link = verify(settings, token)
    if link is None:
        raise NotFound("this link is unknown or has expired; ask for a new one")
    if link.kind == "search":
        return HTMLResponse(render_search(search_view(session, owned_search(session, link.tenant_id, link.resource_id))), headers=REPORT_PAGE_HEADERS)
    job = owned_job(session, link.tenant_id, link.resource_id)
    if link.what == "report.html":
        return HTMLResponse(report_html.render(job_public(job)), headers=REPORT_PAGE_HEADERS)
    if link.what not in {a["name"] for a in job.artifacts or []}:
        raise NotFound("this link is unknown or has expired; ask for a new one")
    media = {".json": "application/json", ".zip": "application/zip"}.get(Path(link.what).suffix, "application/octet-stream")
    return FileResponse(store.path(f"jobs/{link.tenant_id}/{link.resource_id}/{link.what}"), media_type=media, filename=link.what,
                        headers={"X-Content-Type-Options": "nosniff"})
