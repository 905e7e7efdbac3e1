"""Pruning through the HTTP API on real MNIST, next to Deep Compression's pruning stage.

1. LeNet-300-100 (trained here on the train split), unstructured 92% with fine-tuning; the test
   split evaluates. Han et al. (Deep Compression, ICLR 2016) prune LeNet-300-100 to 8% of its
   weights (12x fewer) at 1.59% top-1 error (reference model 1.64%).
2. A residual CNN with batch norm (MNIST at 14x14), structured: half of every layer's channels removed.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path


from bench.common import report, running_service
from service.client import Client
from tests import mnist
from tests.cnn_models import write_residual_cnn_files

LENET_EPOCHS = 8


def run_job(client: Client, model: Path, train: Path, test: Path, step: dict) -> dict:
    body = {
        "model_id": client.upload_model(model)["id"],
        "dataset_id": client.upload_dataset(train)["id"],
        "eval_dataset_id": client.upload_dataset(test)["id"],
        "steps": [step],
        "measure": {"runs": 200, "batch_sizes": [1, 64], "max_eval_samples": 10000},
    }
    job = client.submit(body)
    start = time.perf_counter()
    final = next(data for event, data in client.events(job["id"]) if event == "end")
    if final["status"] != "succeeded":
        sys.exit(f"job failed: {final['error']}")
    final["wall_s"] = time.perf_counter() - start
    return final


def row(name: str, job: dict) -> list:
    m = job["metrics"]
    o, c = m["original"], m["compressed"]
    return [
        name,
        f"{100 * (1 - o['accuracy']):.2f} -> {100 * (1 - c['accuracy']):.2f}",
        f"{o['size_bytes'] / 1000:.0f} -> {c['size_bytes'] / 1000:.0f}",
        m["compression_ratio"],
        f"{o['nonzero_parameters']} -> {c['nonzero_parameters']}",
        f"{o['macs']} -> {c['macs']}",
        f"{o['latency_ms']['p50']:.3f} -> {c['latency_ms']['p50']:.3f}",
        f"{o['latency_by_batch'][-1]['p50']:.3f} -> {c['latency_by_batch'][-1]['p50']:.3f}",
        job["wall_s"],
    ]


def main() -> None:
    work = Path(tempfile.mkdtemp())
    train_x, train_y = mnist.load("train")
    test_x, test_y = mnist.load("test")
    files = mnist.write_files(work, lenet_epochs=LENET_EPOCHS)

    write_residual_cnn_files(work, train_x, train_y, test_x, test_y)

    unstructured = {"method": "prune", "kind": "unstructured", "amount": 0.92, "iterations": 3, "finetune_epochs": 3,
                    "training": {"lr": 5e-4, "batch_size": 128}}
    structured = {"method": "prune", "kind": "structured", "amount": 0.5, "scope": "layer", "finetune_epochs": 3,
                  "max_accuracy_drop": 0.01, "training": {"lr": 1e-3}}
    env = {"MODELSHRINK_MAX_DATASET_DECOMPRESSED_BYTES": str(2 * 1024**3)}
    with running_service(env) as svc:
        client = Client(svc["url"], svc["key"], timeout=600)
        lenet = run_job(client, files["lenet"], files["train"], files["test"], unstructured)
        cnn = run_job(client, work / "rescnn.onnx", work / "train14.npz", work / "test14.npz", structured)
    rows = [
        row("LeNet-300-100, unstructured 92%", lenet),
        row("residual CNN + BN, structured 50%", cnn),
        ["Deep Compression (paper), LeNet-300-100 pruned to 8%", "1.64 -> 1.59", "1070 -> (not stated)", 12.0, "267k -> 21k", "-", "-", "-", "-"],
    ]
    report(
        "pruning_mnist",
        "Pruning through the HTTP API on MNIST (test split)",
        ["model / step", "top-1 error %", "size KB", "size ratio", "non-zero params", "MACs/sample", "p50 ms b1", "p50 ms b64", "job s"],
        rows,
        {"lenet_job": lenet["metrics"], "cnn_job": cnn["metrics"]},
    )


if __name__ == "__main__":
    main()
