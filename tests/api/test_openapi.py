"""openapi/openapi.json is generated from the app; regenerate with `python -m service.api.openapi_dump`."""

from __future__ import annotations

import json
from pathlib import Path

from service.api.openapi_dump import render

OPENAPI = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"


def test_openapi_json_is_up_to_date() -> None:
    assert OPENAPI.exists(), "run: python -m service.api.openapi_dump"
    assert json.loads(OPENAPI.read_text()) == json.loads(render()), "openapi/openapi.json is stale: run python -m service.api.openapi_dump"


# A signed link is its own credential: opened in a browser tab, without the key (service.core.signed_links).
WITHOUT_KEY = {("get", "/v1/links/{token}")}


def test_every_v1_operation_documents_its_auth_and_lookup_errors() -> None:
    spec = json.loads(OPENAPI.read_text())
    for path, operations in spec["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in operations.items():
            if (method, path) in WITHOUT_KEY:
                assert "401" not in operation["responses"]
            else:
                assert "401" in operation["responses"], f"{method.upper()} {path} does not document 401"
            if "{" in path:
                assert "404" in operation["responses"], f"{method.upper()} {path} does not document 404"
