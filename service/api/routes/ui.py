"""/ui: the web page (one static file; it calls the same /v1 API with the key the user pastes)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["ui"])
PAGE = Path(__file__).resolve().parent.parent / "ui" / "index.html"
# The page's own script and styles only; reports are shown in a sandboxed frame (srcdoc inherits this).
POLICY = "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'"


@lru_cache(maxsize=1)
def _page() -> str:
    return PAGE.read_text(encoding="utf-8")


@router.get("/ui", response_class=HTMLResponse, include_in_schema=False)
def web_page() -> HTMLResponse:
    return HTMLResponse(_page(), headers={"Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff"})
