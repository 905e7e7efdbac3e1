"""Signed share links: a report page opened without the API key, bound to one tenant's one
resource, refused once altered or expired."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from service.core.signed_links import Link, sign, verify
from tests.builders import mlp, to_bytes
from tests.conftest import authed_client, make_client


def _job(client: TestClient) -> str:
    model_id = client.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp()))}).json()["id"]
    return client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"method": "quantize", "mode": "fp16"}]}).json()["id"]


def test_a_shared_report_opens_without_the_key_and_only_as_signed(client: TestClient, settings) -> None:
    job_id = _job(client)
    created = client.post("/v1/links", json={"kind": "job", "id": job_id, "expires_in_s": 600})
    assert created.status_code == 201, created.text
    url = created.json()["url"]
    with make_client(settings) as anonymous:  # no Authorization header at all
        page = anonymous.get(url)
        assert page.status_code == 200 and job_id in page.text and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"] and page.headers["x-content-type-options"] == "nosniff"
        token = url.rsplit("/", 1)[1]
        claims, mac = token.split(".")
        forged = sign(settings, Link("someone-else", "job", job_id, "report.html", int(time.time()) + 600)).split(".")[0] + "." + mac
        assert anonymous.get(f"/v1/links/{forged}").status_code == 404  # claims changed, signature kept
        assert anonymous.get(f"/v1/links/{claims}.AAAA").status_code == 404
    assert verify(settings, token, now=time.time() + 601) is None  # expired
    # An artifact the job does not have (yet): no link.
    assert client.post("/v1/links", json={"kind": "job", "id": job_id, "what": "model.onnx"}).status_code == 404
    assert client.post("/v1/links", json={"kind": "job", "id": job_id, "expires_in_s": 10**9}).status_code == 422


def test_another_tenants_job_gets_no_link(client: TestClient, settings) -> None:
    job_id = _job(client)
    with authed_client(settings, tenant="other") as other:
        assert other.post("/v1/links", json={"kind": "job", "id": job_id}).status_code == 404
