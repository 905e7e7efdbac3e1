"""Artifacts in S3-compatible object storage, with no disk shared between the API and the worker:
an S3-speaking server (moto's, started here), PostgreSQL on 5432 and Redis on 6379; the API and the
worker each keep only a local cache in their own directory."""

from __future__ import annotations

import hashlib
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest

from service.core.settings import Settings
from tests.builders import dataset_npz, mlp, to_bytes
from tests.conftest import authed_client
from tests.integration.test_job_lifecycle import backend_settings, follow

BUCKET = "modelshrink-artifacts"


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)  # the worker process inherits them
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    try:
        yield endpoint
    finally:
        server.stop()


def test_jobs_run_with_artifacts_only_in_object_storage(tmp_path: Path, s3_endpoint: str, start_worker) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    base = backend_settings("postgres+redis", tmp_path / "api", None)
    s3 = {"artifact_url": f"s3://{BUCKET}/{prefix}", "s3_endpoint_url": s3_endpoint}
    api: Settings = base.model_copy(update={**s3, "artifact_dir": tmp_path / "api-cache"})
    worker: Settings = base.model_copy(update={**s3, "data_dir": tmp_path / "worker", "artifact_dir": tmp_path / "worker-cache"})
    start_worker(worker)
    client_s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    with authed_client(api, tenant=f"t-{uuid.uuid4().hex[:8]}") as client:
        model = mlp(in_features=32, hidden=64)
        model_id = client.post("/v1/models", files={"file": ("m.onnx", to_bytes(model))}).json()["id"]
        dataset_id = client.post("/v1/datasets", files={"file": ("d.npz", dataset_npz(model, 48))}).json()["id"]
        body = {"model_id": model_id, "dataset_id": dataset_id, "steps": [{"method": "quantize", "mode": "int8_dynamic", "per_channel": True}],
                "measure": {"runs": 5, "warmup": 1, "batch_sizes": [1]}}
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        job, _ = follow(client, job_id)
        assert job["status"] == "succeeded", job["error"]
        keys = {o["Key"] for o in client_s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]}
        assert any("/models/" in k for k in keys) and any("/datasets/" in k for k in keys)
        artifact = next(a for a in job["artifacts"] if a["name"] == "model.onnx")
        object_key = next(k for k in keys if k.endswith(f"{job_id}/model.onnx"))
        head = client_s3.head_object(Bucket=BUCKET, Key=object_key)
        assert head["Metadata"]["sha256"] == artifact["sha256"]
        # The API never saw the worker's disk: the download comes from the bucket through its own cache.
        assert not (tmp_path / "api-cache" / "jobs").exists()
        downloaded = client.get(f"/v1/jobs/{job_id}/artifacts/model.onnx").content
        assert hashlib.sha256(downloaded).hexdigest() == artifact["sha256"]
        # Or straight from the bucket, by a presigned URL, without the API key.
        signed = client.get(f"/v1/jobs/{job_id}/artifacts/model.onnx/url").json()
        assert signed["sha256"] == artifact["sha256"] and signed["expires_in_s"] == 900
        direct = httpx.get(signed["url"])
        assert direct.status_code == 200 and hashlib.sha256(direct.content).hexdigest() == artifact["sha256"]
        assert 'filename="model.onnx"' in direct.headers["content-disposition"]
        assert client.get(f"/v1/jobs/{job_id}/artifacts/nope.onnx/url").status_code == 404
        assert list((tmp_path / "worker-cache").rglob("*.npz")), "the worker fetched the dataset from the bucket"
        # Deleting the dataset deletes its objects from the bucket too.
        assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204
        left = {o["Key"] for o in client_s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])}
        assert not any(dataset_id in k for k in left) and any(model_id in k for k in left)
