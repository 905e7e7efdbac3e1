"""Hostile or careless requests get a 4xx naming the problem, never a 5xx, and cost the API little."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.builders import mlp, to_bytes
from tests.conftest import authed_client, fast_settings

STEP = {"method": "quantize", "mode": "int8_dynamic"}


def _upload(client, model: onnx.ModelProto) -> str:
    response = client.post("/v1/models", files={"file": ("m.onnx", to_bytes(model))})
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.mark.parametrize("path, field", [
    ("/v1/jobs?offset=9223372036854775808", "offset"),
    ("/v1/models?offset=-1", "offset"),
    ("/v1/datasets?limit=100000", "limit"),
])
def test_list_bounds_answer_422_naming_the_field(client, path: str, field: str) -> None:
    response = client.get(path)
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["query", field]


@pytest.mark.parametrize("patch, loc", [
    ({"measure": {"batch_sizes": [-5]}}, "batch_sizes"),
    ({"steps": [{"method": "prune", "amount": 0.5, "training": {"seed": 2**70}}]}, "seed"),
    ({"steps": [{"method": "distill", "hint_weight": 1e308}]}, "hint_weight"),
    ({"limits": {"time_limit_s": 0}}, "time_limit_s"),
])
def test_out_of_range_numbers_answer_422(client, patch: dict, loc: str) -> None:
    model_id = _upload(client, mlp())
    response = client.post("/v1/jobs", json={"model_id": model_id, "steps": [STEP], **patch})
    assert response.status_code == 422, response.text
    assert any(loc in [str(p) for p in e["loc"]] for e in response.json()["detail"])


def test_oversized_json_and_form_bodies_answer_413(client) -> None:
    big = client.post("/v1/jobs", json={"model_id": "m" * 2_000_000, "steps": [STEP]})
    assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
    fields = {f"f{i}": "x" for i in range(50)}
    many = client.post("/v1/models", data=fields, files={"file": ("m.onnx", to_bytes(mlp()))})
    assert many.status_code == 413 and "form fields" in many.json()["error"]["message"]


def test_labels_outside_the_models_classes_are_refused_at_submit(client) -> None:
    model = mlp(classes=4)
    model_id = _upload(client, model)
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((8, 16), np.float32), labels=np.arange(8))
    dataset_id = client.post("/v1/datasets", files={"file": ("d.npz", buf.getvalue())}).json()["id"]
    response = client.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "steps": [STEP]})
    assert response.status_code == 422 and response.json()["error"]["code"] == "labels_out_of_range"


def _no_input_model() -> onnx.ModelProto:
    const = helper.make_node("Constant", [], ["y"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]))
    graph = helper.make_graph([const], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _string_input_model() -> onnx.ModelProto:
    node = helper.make_node("Identity", ["s"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("s", TensorProto.STRING, ["N"])],
                              [helper.make_tensor_value_info("y", TensorProto.STRING, ["N"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize("model, code, words", [
    (_no_input_model(), "invalid_model", "no inputs"),
    (_string_input_model(), "unsupported_input_type", "s (object)"),
], ids=["no-inputs", "string-input"])
def test_models_we_cannot_feed_are_refused_with_a_specific_code(client, model, code: str, words: str) -> None:
    response = client.post("/v1/models", files={"file": ("m.onnx", to_bytes(model))})
    assert response.status_code == 422 and response.json()["error"]["code"] == code
    assert words in response.json()["error"]["message"]


def test_runtime_errors_never_show_a_host_path(client, settings) -> None:
    model = mlp()
    model.graph.node[0].op_type = "NoSuchOp"
    model.graph.node[0].domain = "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    response = client.post("/v1/models", files={"file": ("m.onnx", to_bytes(model))})
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert str(settings.data_dir) not in message and ".upload-" not in message


def test_a_tiny_model_that_allocates_gigabytes_on_zeros_is_refused_quickly(client) -> None:
    # ConstantOfShape([2**31]): 8 GiB of zeros from a few hundred bytes.
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [2**31])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
             helper.make_node("ReduceSum", ["big"], ["s"], keepdims=1), helper.make_node("Add", ["x", "s"], ["y"])]
    graph = helper.make_graph(nodes, "bomb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    response = client.post("/v1/models", files={"file": ("bomb.onnx", to_bytes(model))})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "model_too_large" and "memory" in response.json()["error"]["message"]


def test_tenant_quotas_answer_429_and_507(tmp_path: Path) -> None:
    settings = fast_settings(tmp_path, tenant_max_active_jobs=2, tenant_max_stored_bytes=10_000)
    with authed_client(settings) as client:
        model_id = _upload(client, mlp())  # about 7 kB: a second one goes over 10 kB
        for _ in range(2):
            assert client.post("/v1/jobs", json={"model_id": model_id, "steps": [STEP]}).status_code == 202
        refused = client.post("/v1/jobs", json={"model_id": model_id, "steps": [STEP]})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"
        assert refused.headers["Retry-After"] == "30"
        full = client.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp(seed=2)))})
        assert full.status_code == 507 and full.json()["error"]["code"] == "storage_quota_exceeded"
    with authed_client(settings, tenant="someone-else") as other:  # quotas are per tenant
        assert other.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp()))}).status_code == 201


def test_one_idempotency_key_with_two_bodies_at_once_gives_one_job_and_one_409(tmp_path: Path) -> None:
    settings = fast_settings(tmp_path)
    with authed_client(settings) as client:
        model_id = _upload(client, mlp())
        results: list = [None, None]
        barrier = threading.Barrier(2)

        def submit(i: int) -> None:
            barrier.wait()
            body = {"model_id": model_id, "steps": [{"method": "quantize", "mode": ["fp16", "int8_dynamic"][i]}]}
            results[i] = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "same-key"})

        for _ in range(5):
            barrier.reset()
            results[:] = [None, None]
            threads = [threading.Thread(target=submit, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            codes = sorted(r.status_code for r in results)
            assert codes == [202, 409], codes
            assert client.get("/v1/jobs").json()["count"] == 1


def test_a_schema_violation_answers_a_readable_summary_with_the_closest_field(client) -> None:
    response = client.post("/v1/jobs", json={"model_id": "mdl_x", "steps": [{"method": "prune", "ammount": 0.5}]})
    assert response.status_code == 422
    body = response.json()
    assert body["error"]["code"] == "invalid_request"
    assert "unknown field (did you mean 'amount'?)" in body["error"]["message"] and "ammount" in body["error"]["message"]
    assert body["detail"] and body["detail"][0]["type"] == "extra_forbidden"  # pydantic's list is kept for programs


def test_an_unknown_key_names_the_likely_cause(settings) -> None:
    from tests.conftest import make_client

    with make_client(settings) as anonymous:
        response = anonymous.get("/v1/models", headers={"Authorization": "Bearer not-a-key"})
    assert response.status_code == 401
    assert "modelshrink keys create" in response.json()["error"]["message"] and "MODELSHRINK_DATA_DIR" in response.json()["error"]["message"]


def test_the_search_idempotency_race_answers_409_to_the_other_body(client, settings, monkeypatch) -> None:
    # The race, made deterministic: while this request is being checked, another one with the same key
    # and another body commits its search first; this request's insert then meets the unique key.
    from datetime import timedelta

    from service.api.routes import searches
    from service.core.db import session_scope
    from service.core.tables import Search, new_id, utcnow

    model_id = _upload(client, mlp())
    real_facts = searches._facts

    def facts_while_another_request_wins(session, tenant_id, body):
        with session_scope(settings.resolved_database_url) as other:
            other.add(Search(id=new_id("srch"), tenant_id=tenant_id, model_id=body.model_id, request={"request_sha256": "another body", "objective": "size"},
                             facts={}, idempotency_key="race-key", deadline_at=utcnow() + timedelta(minutes=5), created_at=utcnow()))
            other.commit()
        return real_facts(session, tenant_id, body)

    monkeypatch.setattr(searches, "_facts", facts_while_another_request_wins)
    response = client.post("/v1/searches", json={"model_id": model_id, "objective": "size", "methods": ["quantize"]}, headers={"Idempotency-Key": "race-key"})
    assert response.status_code == 409 and response.json()["error"]["code"] == "idempotency_key_reused", response.text


def _at_once(count: int, call) -> list:
    results: list = [None] * count
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = call(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_uploads_and_jobs_never_take_a_tenant_over_its_quotas(tmp_path: Path) -> None:
    one = len(to_bytes(mlp(seed=0)))
    settings = fast_settings(tmp_path, tenant_max_stored_bytes=int(3.5 * one), tenant_max_active_jobs=4)
    with authed_client(settings) as client:
        # 30 different models at once, room for 3: each saw free room when it started streaming.
        uploads = _at_once(30, lambda i: client.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp(seed=i)))}))
        codes = sorted(r.status_code for r in uploads)
        assert codes.count(201) == 3 and set(codes) == {201, 507}, codes
        models = client.get("/v1/models").json()
        assert models["count"] == 3 and sum(m["size_bytes"] for m in models["data"]) <= settings.tenant_max_stored_bytes
        model_id = models["data"][0]["id"]
        jobs = _at_once(10, lambda i: client.post("/v1/jobs", json={"model_id": model_id, "steps": [STEP]}))
        assert sorted(r.status_code for r in jobs).count(202) == 4, [r.status_code for r in jobs]
        assert client.get("/v1/jobs").json()["count"] == 4


def test_concurrent_searches_never_take_a_tenant_over_its_job_quota(tmp_path: Path) -> None:
    settings = fast_settings(tmp_path, tenant_max_active_jobs=5)
    with authed_client(settings) as client:
        model_id = client.post("/v1/models", files={"file": ("m.onnx", to_bytes(mlp(seed=0)))}).json()["id"]
        body = {"model_id": model_id, "objective": "size", "methods": ["quantize"], "budget_minutes": 5}
        first = client.post("/v1/searches", json=body)
        assert first.status_code == 202, first.text
        per_search = len(first.json()["candidates"])
        # 12 at once: each search's candidate jobs are written after its own row commits, so each
        # must count the others' not-yet-written candidates (they all saw room before the fix).
        searches = _at_once(12, lambda i: client.post("/v1/searches", json=body))
        accepted = sum(1 for r in searches if r.status_code == 202)
        assert {r.status_code for r in searches} <= {202, 429}, [r.text for r in searches if r.status_code not in (202, 429)]
        assert accepted == (settings.tenant_max_active_jobs - per_search) // per_search
        active = [j for j in client.get("/v1/jobs").json()["data"] if j["status"] in ("queued", "running")]
        assert len(active) <= settings.tenant_max_active_jobs


@pytest.mark.parametrize("method,path,allow", [("PUT", "/v1/models", "GET, POST"), ("POST", "/v1/models/m-1", "DELETE, GET"),
                                               ("PATCH", "/healthz", "GET")])
def test_a_wrong_method_answers_405_with_every_allowed_method(client, method: str, path: str, allow: str) -> None:
    response = client.request(method, path)
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    assert response.headers["allow"] == allow
