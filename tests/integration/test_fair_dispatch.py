"""One tenant's backlog does not starve another: each tenant has at most `tenant_max_dispatched` jobs
in the shared broker queue, the rest wait their turn in the job store."""

from __future__ import annotations

import pytest

from service.core.settings import Settings
from tests.builders import mlp, to_bytes
from tests.conftest import authed_client
from tests.integration.test_job_lifecycle import QUICK_MEASURE, follow, job_state

pytestmark = pytest.mark.integration
STEP = {"method": "quantize", "mode": "fp16"}


def test_a_later_tenant_runs_before_an_earlier_tenants_backlog(settings: Settings, start_worker) -> None:
    assert settings.tenant_max_dispatched == 2
    with authed_client(settings, tenant="busy") as busy, authed_client(settings, tenant="light") as light:
        busy_model = busy.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp()))}).json()["id"]
        light_model = light.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp(seed=1)))}).json()["id"]
        backlog = [busy.post("/v1/jobs", json={"model_id": busy_model, "steps": [STEP], "measure": QUICK_MEASURE}).json()["id"] for _ in range(5)]
        latecomer = light.post("/v1/jobs", json={"model_id": light_model, "steps": [STEP], "measure": QUICK_MEASURE}).json()["id"]
        start_worker(settings)
        assert follow(light, latecomer)[0]["status"] == "succeeded"
        # The latecomer waited behind at most the busy tenant's two dispatched jobs, not its backlog.
        started = [job_state(busy, j)["started_at"] for j in backlog]
        assert sum(s is not None for s in started) <= 3
        for job_id in backlog:
            assert follow(busy, job_id)[0]["status"] == "succeeded"
        late = job_state(light, latecomer)["started_at"]
        assert sorted(job_state(busy, j)["started_at"] for j in backlog)[2] > late
