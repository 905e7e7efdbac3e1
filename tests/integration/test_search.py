"""Searches end to end: a real worker runs every candidate as a job; the search judges them, promotes,
keeps the budget, cancels, reports and notifies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.core.settings import Settings
from service.core.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from tests.builders import dataset_npz, mlp, to_bytes
from tests.conftest import authed_client
from tests.integration.test_job_lifecycle import QUICK_MEASURE, backend_settings, follow, upload
from tests.webhook_receiver import webhook_receiver

pytestmark = pytest.mark.integration


def follow_search(client: TestClient, search_id: str) -> tuple[dict, list[dict]]:
    return follow(client, search_id, kind="searches")


def _upload_eval(client: TestClient, model) -> str:
    response = client.post("/v1/datasets", files={"file": ("eval.npz", dataset_npz(model, samples=64, seed=7))})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_search_runs_its_candidates_as_jobs_and_keeps_the_best(settings: Settings, start_worker) -> None:
    start_worker(settings)
    model = mlp(in_features=16, hidden=64, classes=4)
    with authed_client(settings) as client:
        model_id, dataset_id = upload(client, model, samples=128)
        eval_id = _upload_eval(client, model)
        body = {"model_id": model_id, "dataset_id": dataset_id, "eval_dataset_id": eval_id, "objective": "size", "max_accuracy_drop": 0.05,
                "budget_minutes": 10, "methods": ["quantize", "distill"], "measure": QUICK_MEASURE}
        created = client.post("/v1/searches", json=body)
        assert created.status_code == 202, created.text
        search_id = created.json()["id"]
        assert created.headers["location"] == f"/v1/searches/{search_id}"
        assert {c["recipe"] for c in created.json()["candidates"]} == {"quantize-auto", "distill-w25-quantize"}
        final, events = follow_search(client, search_id)
        assert final["status"] == "succeeded", final
        assert events and all(0.0 <= e["progress"]["fraction"] <= 1.0 for e in events)
        candidates = final["candidates"]
        assert all(c["status"] in ("succeeded", "failed", "cancelled") for c in candidates)
        for candidate in candidates:  # each candidate is an ordinary job of the tenant
            job = client.get(f"/v1/jobs/{candidate['job_id']}").json()
            assert job["options"]["search"]["id"] == search_id and job["steps"] == candidate["steps"]
        measured = [c for c in candidates if c["metrics"]]
        feasible = [c for c in measured if c["metrics"]["meets_constraint"]]
        best = next(c for c in candidates if c["job_id"] == final["best"])
        assert best["metrics"]["meets_constraint"] and best["metrics"]["accuracy_drop"] <= 0.05
        assert best["metrics"]["compression_ratio"] == max(c["metrics"]["compression_ratio"] for c in feasible)
        assert set(final["pareto"]) <= {c["job_id"] for c in measured} and final["best"] in final["pareto"]
        # Only a trainable recipe that missed at the first rung can run again at full budget.
        assert {c["recipe"] for c in candidates if c["rung"] == 1} <= {"distill-w25-quantize"}
        assert final["reason"] == f"all {len(candidates)} candidates finished"
        assert client.get("/v1/searches").json()["data"][0]["id"] == search_id
        page = client.get(f"/v1/searches/{search_id}/report.html")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'class="pareto"' in page.text and 'class="chosen"' in page.text and page.text.count("<tr>") == len(candidates) + 1


@pytest.fixture(params=["sqlite+embedded-redis", "postgres+redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    embedded = request.getfixturevalue("embedded_redis") if request.param == "sqlite+embedded-redis" else None
    return backend_settings(request.param, tmp_path, embedded)


def test_cancel_ends_the_search_and_every_unfinished_candidate(store: Settings) -> None:
    model = mlp()
    with authed_client(store) as client, authed_client(store, tenant="other") as other:
        model_id, dataset_id = upload(client, model)
        body = {"model_id": model_id, "dataset_id": dataset_id, "objective": "latency", "budget_minutes": 5, "measure": QUICK_MEASURE}
        search = client.post("/v1/searches", json=body).json()
        assert search["request"]["min_fidelity"] == 0.99  # the default constraint
        assert len(search["candidates"]) >= 4 and all(c["status"] == "queued" for c in search["candidates"])
        assert other.get(f"/v1/searches/{search['id']}").status_code == 404
        assert other.post(f"/v1/searches/{search['id']}/cancel").status_code == 404
        cancelled = client.post(f"/v1/searches/{search['id']}/cancel")
        assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
        assert cancelled.json()["error"]["code"] == "cancelled"
        for candidate in search["candidates"]:
            assert client.get(f"/v1/jobs/{candidate['job_id']}").json()["status"] == "cancelled"
        assert client.post(f"/v1/searches/{search['id']}/cancel").status_code == 409


def test_bad_search_requests_get_reasons(settings: Settings) -> None:
    model = mlp()
    with authed_client(settings) as client:
        model_id, unlabelled = upload(client, model, labels=False)
        no_labels = client.post("/v1/searches", json={"model_id": model_id, "dataset_id": unlabelled, "objective": "size", "max_accuracy_drop": 0.01})
        assert no_labels.status_code == 422 and no_labels.json()["error"]["code"] == "labels_required"
        missing = client.post("/v1/searches", json={"model_id": "mdl_nope", "objective": "size"})
        assert missing.status_code == 404
        for bad in ({"objective": "smallest"}, {"objective": "size", "methods": []}, {"objective": "size", "budget_minutes": 0}, {"objective": "size", "methods": ["magic"]}):
            response = client.post("/v1/searches", json={"model_id": model_id} | bad)
            assert response.status_code == 422, bad
        assert client.get("/v1/searches/srch_nope").status_code == 404
        assert client.get("/v1/searches/srch_nope/report.html").status_code == 404


def test_budget_ends_the_search_and_its_webhook_says_why(settings: Settings, start_worker) -> None:
    start_worker(settings)
    start_worker(settings, role="webhooks")
    model = mlp(in_features=256, hidden=512)
    with webhook_receiver(path="/hooks/search") as hook, authed_client(settings) as client:
        model_id = client.post("/v1/models", files={"file": ("m.onnx", to_bytes(model))}).json()["id"]
        # Timing runs far longer than the budget: the candidate hits its time limit (the budget's end).
        slow = {"warmup": 0, "runs": 100_000, "batch_sizes": [512]}
        body = {"model_id": model_id, "objective": "size", "budget_minutes": 0.1, "measure": slow, "webhook_url": hook.url}
        search_id = client.post("/v1/searches", json=body).json()["id"]
        final, _ = follow_search(client, search_id)
        assert hook.arrived.wait(60), "the webhook never arrived"
        # The candidate was cancelled at the deadline, or reached its time limit (the deadline) first.
        job, _ = follow(client, final["candidates"][0]["job_id"])
    assert final["status"] == "failed" and final["error"]["code"] == "search_target_missed"
    assert "budget of 0.1 minutes reached" in final["reason"]
    assert len(final["candidates"]) == 1 and job["error"]["code"] in ("cancelled", "timed_out")
    payload = json.loads(hook.body)
    assert payload["id"] == search_id and payload["status"] == "failed"
    assert hook.headers[SIGNATURE_HEADER] == sign(hook.body, hook.headers[TIMESTAMP_HEADER], settings.webhook_secret)
