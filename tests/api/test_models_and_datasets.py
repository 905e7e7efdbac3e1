"""Uploads over HTTP: exact status codes and fields; nothing is left behind by a refused upload."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from service.core.settings import Settings
from tests.builders import dataset_npz, mlp, to_bytes
from tests.conftest import authed_client


def upload_model(client: TestClient, content: bytes, name: str = "m.onnx"):
    return client.post("/v1/models", files={"file": (name, content)})


def leftover_uploads(settings: Settings) -> list[Path]:
    return [p for p in (settings.resolved_artifact_dir / ".incoming").glob("*") if p.is_file()]


def test_upload_model_describes_it(client: TestClient) -> None:
    content = to_bytes(mlp())
    response = upload_model(client, content)
    assert response.status_code == 201
    body = response.json()
    assert body["id"].startswith("mdl_") and body["name"] == "m.onnx" and body["format"] == "onnx"
    assert body["size_bytes"] == len(content) and len(body["sha256"]) == 64
    assert body["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 16]}]
    assert body["parameters"] == 1732
    assert client.get(f"/v1/models/{body['id']}").json() == body
    listed = client.get("/v1/models").json()
    assert listed["count"] == 1 and listed["data"][0]["id"] == body["id"]


def test_delete_model(client: TestClient, settings: Settings) -> None:
    model_id = upload_model(client, to_bytes(mlp())).json()["id"]
    assert client.delete(f"/v1/models/{model_id}").status_code == 204
    assert client.get(f"/v1/models/{model_id}").status_code == 404
    assert not list(settings.resolved_artifact_dir.glob(f"models/*/{model_id}"))


def test_not_onnx_empty_and_truncated_are_422(client: TestClient, settings: Settings) -> None:
    for content in (b"hello, not a model", b"", to_bytes(mlp())[:500]):
        response = upload_model(client, content)
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "invalid_model"
    assert leftover_uploads(settings) == []
    assert client.get("/v1/models").json()["count"] == 0


def test_upload_without_file_part_is_422(client: TestClient) -> None:
    response = client.post("/v1/models", data={"name": "x"}, files={"other": ("a", b"b")})
    assert response.status_code == 422
    assert "no file part named 'file'" in response.json()["error"]["message"]
    assert client.post("/v1/models", content=b"{}", headers={"Content-Type": "application/json"}).status_code == 422


def test_upload_over_the_limit_is_413_and_removed(tmp_path: Path) -> None:
    from tests.conftest import fast_settings

    settings = fast_settings(tmp_path, max_upload_bytes=10_000)
    with authed_client(settings) as client:

        def chunks():  # streamed without Content-Length, so the limit must hold while streaming
            yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.onnx"\r\n\r\n'
            for _ in range(100):
                yield b"\0" * 1000
            yield b"\r\n--b--\r\n"

        response = client.post("/v1/models", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"
        assert leftover_uploads(settings) == []


def test_dataset_upload_and_validation(client: TestClient) -> None:
    response = client.post("/v1/datasets", files={"file": ("d.npz", dataset_npz(mlp(), samples=20))})
    assert response.status_code == 201
    body = response.json()
    assert body["samples"] == 20 and body["has_labels"] is True
    assert body["arrays"]["x"] == {"dtype": "float32", "shape": [20, 16], "min": None, "max": None}
    assert body["arrays"]["labels"]["min"] >= 0 and body["arrays"]["labels"]["max"] <= 3

    import io

    buf = io.BytesIO()
    np.savez(buf, x=np.array([object(), None], dtype=object))
    bad = client.post("/v1/datasets", files={"file": ("evil.npz", buf.getvalue())})
    assert bad.status_code == 422 and "object dtype" in bad.json()["error"]["message"]
    assert client.get("/v1/datasets").json()["count"] == 1
