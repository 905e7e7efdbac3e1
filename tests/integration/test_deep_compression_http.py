"""Deep Compression of LeNet-300-100 through the HTTP API on real MNIST: >= 40x smaller than the
fp32 ONNX file, test error at most 0.1 points above the uncompressed model's; the Huffman bundle
decodes to the exact pre-Huffman model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from service.core.settings import Settings
from tests import mnist
from tests.builders import reference_outputs
from tests.conftest import authed_client, fast_settings
from tests.integration.test_job_lifecycle import follow

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not mnist.available(), reason="../shared/data/mnist is missing")]


# Prune (3 rounds of 3 epochs), cluster and Huffman on 60,000 images: 69 s alone on 2 cores, and past the
# suite's 300 s twice while benchmarks shared the machine (both times it passed alone right after).
@pytest.mark.timeout(600)
def test_lenet_300_100_deep_compression_over_http(tmp_path: Path, start_worker) -> None:
    settings: Settings = fast_settings(tmp_path, lease_ttl_s=10.0, visibility_timeout_s=600.0)
    start_worker(settings)
    train_x, train_y = mnist.load("train")
    test_x, test_y = mnist.load("test")
    lenet = mnist.lenet_300_100(epochs=4)
    with authed_client(settings) as client:
        model_id = client.post("/v1/models", files={"file": ("lenet.onnx", lenet)}).json()["id"]
        train_id = client.post("/v1/datasets", files={"file": ("train.npz", mnist.npz(train_x, train_y))}).json()["id"]
        test_id = client.post("/v1/datasets", files={"file": ("test.npz", mnist.npz(test_x, test_y))}).json()["id"]
        step = {
            "method": "deep_compression",
            "prune": {"kind": "unstructured", "amount": 0.92, "iterations": 3, "finetune_epochs": 3, "training": {"lr": 5e-4, "batch_size": 128}},
            "cluster": {"bits": 4, "finetune_epochs": 2, "training": {"lr": 1e-4, "batch_size": 128}},
        }
        body = {"model_id": model_id, "dataset_id": train_id, "eval_dataset_id": test_id, "steps": [step],
                "measure": {"runs": 10, "batch_sizes": [1, 32], "max_eval_samples": 10000}}
        job, _ = follow(client, client.post("/v1/jobs", json=body).json()["id"])
        assert job["status"] == "succeeded", job["error"]
        metrics = job["metrics"]
        assert metrics["original"]["size_bytes"] == len(lenet)
        assert metrics["compression_ratio"] >= 40, metrics["compression_ratio"]
        assert metrics["original"]["accuracy"] - metrics["compressed"]["accuracy"] <= 0.001
        stages = [s["stage"] for s in metrics["step_reports"][0]["stages"]]
        assert stages == ["original (fp32 ONNX)", "pruned", "clustered", "huffman"]

        bundle = client.get(f"/v1/jobs/{job['id']}/artifacts/model.msz").content
        onnx_bytes = client.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").content
        assert len(bundle) == metrics["compressed"]["size_bytes"]
    (tmp_path / "model.msz").write_bytes(bundle)
    subprocess.run([sys.executable, "-m", "service.cli", "unpack", str(tmp_path / "model.msz"), "-o", str(tmp_path / "decoded.onnx")], check=True)
    decoded = onnx.load_model(str(tmp_path / "decoded.onnx"))
    assert (tmp_path / "decoded.onnx").read_bytes() == onnx_bytes
    assert np.array_equal(reference_outputs(decoded, test_x), reference_outputs(onnx.load_model_from_string(onnx_bytes), test_x))
    error = float((reference_outputs(decoded, test_x).argmax(-1) != test_y).mean())
    baseline = float((reference_outputs(onnx.load_model_from_string(lenet), test_x).argmax(-1) != test_y).mean())
    assert error - baseline <= 0.001
