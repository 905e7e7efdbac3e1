"""Request-schema failures (422) answered with a readable summary first: the field's path, what was
wrong with it, and for a field the schema does not have, the closest field it does ("did you mean
'amount'?"). Pydantic's own list stays in `detail` for programs that read it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

MAX_LISTED = 5


def _field_names(schema: dict[str, Any]) -> set[str]:
    return {name for component in schema.get("components", {}).get("schemas", {}).values() for name in component.get("properties", {})}


def _path(loc: Iterable[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    # A discriminated union adds the chosen tag to the path (steps.0.prune.amount): keep it, it names the method.
    return ".".join(parts) or "body"


def summary(errors: list[dict[str, Any]], known_fields: set[str]) -> str:
    lines = []
    for error in errors[:MAX_LISTED]:
        where = _path(error.get("loc", ()))
        if error.get("type") == "extra_forbidden":
            name = str(list(error.get("loc", ()))[-1])
            close = difflib.get_close_matches(name, sorted(known_fields), n=1, cutoff=0.75)
            lines.append(f"{where}: unknown field" + (f" (did you mean '{close[0]}'?)" if close else ""))
        elif error.get("type") == "missing":
            lines.append(f"{where}: required")
        else:
            lines.append(f"{where}: {error.get('msg', 'invalid')}")
    more = len(errors) - MAX_LISTED
    return "; ".join(lines) + (f"; and {more} more (see detail)" if more > 0 else "")


def install(app: FastAPI) -> None:
    known: set[str] = set()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        if not known:
            known.update(_field_names(app.openapi()))
        errors = list(exc.errors())
        return JSONResponse(status_code=422, content={"error": {"code": "invalid_request", "message": summary(errors, known)},
                                                      "detail": jsonable_encoder(errors)})
