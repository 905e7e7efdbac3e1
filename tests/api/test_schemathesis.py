"""Property-based API testing with schemathesis against the app's OpenAPI schema (the same document
as openapi/openapi.json, which test_openapi keeps in sync), with a valid API key: no request it
generates may get a 5xx, and every response must be one the schema documents."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings as hypothesis_settings

from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.core.settings import Settings
from tests.conftest import fast_settings, new_key

EXAMPLES = 25  # per operation: bounded, so the whole run takes seconds


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory):
    import redis

    from service.api.app import create_app

    settings: Settings = fast_settings(tmp_path_factory.mktemp("schemathesis"))
    app = create_app(settings)
    key = new_key(settings, tenant="fuzz")
    yield app, key
    redis.Redis.from_url(settings.resolved_broker_url).delete(settings.queue_name)


def _operations(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    # /v1 only: /readyz answers a documented 503 here by design (no worker runs in this test), and
    # the probes take no input to generate.
    return [op for op in (result.ok() for result in schema.get_all_operations()) if op.path.startswith("/v1/")]


def test_api_conforms_to_its_schema(api) -> None:
    app, key = api
    headers = {"Authorization": f"Bearer {key}"}
    operations = _operations(app)
    assert len(operations) >= 11
    for operation in operations:

        @given(case=operation.as_strategy())
        @hypothesis_settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
        def check(case) -> None:
            # Every default check (no 5xx, documented status codes, content types and bodies, schema-invalid
            # requests rejected) except accepting every schema-valid request: a well-formed body holding
            # a PNG where an ONNX model belongs is refused with a documented 422, as it should be.
            case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])

        check()
