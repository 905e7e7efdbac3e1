"""Deep Compression of LeNet-300-100 through the HTTP API on MNIST, stage by stage, next to
Han, Mao & Dally (ICLR 2016), Table 1: 1070 KB -> 27 KB (40x) at 1.58% error (reference 1.64%)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import report, running_service
from bench.pruning_mnist import run_job
from service.client import Client
from tests import mnist


def main() -> None:
    files = mnist.write_files(Path(tempfile.mkdtemp()))
    step = {
        "method": "deep_compression",
        "prune": {"kind": "unstructured", "amount": 0.92, "iterations": 3, "finetune_epochs": 3, "training": {"lr": 5e-4, "batch_size": 128}},
        "cluster": {"bits": 4, "finetune_epochs": 2, "training": {"lr": 1e-4, "batch_size": 128}},
    }
    env = {"MODELSHRINK_MAX_DATASET_DECOMPRESSED_BYTES": str(2 * 1024**3)}
    with running_service(env) as svc:
        job = run_job(Client(svc["url"], svc["key"], timeout=600), files["lenet"], files["train"], files["test"], step)
    stages = job["metrics"]["step_reports"][0]["stages"]
    rows = [[s["stage"], s["size_bytes"] / 1000, s["ratio"], 100 * (1 - s["accuracy"])] for s in stages]
    rows.append(["paper: original -> Deep Compression", "1070 -> 27", 40.0, "1.64 -> 1.58"])
    m = job["metrics"]
    report("deep_compression_mnist", "Deep Compression of LeNet-300-100 through the HTTP API (MNIST test split)",
           ["stage", "size KB", "ratio", "top-1 error %"], rows,
           {"speedup_b1": m["speedup"], "latency": [m["original"]["latency_ms"], m["compressed"]["latency_ms"]], "job_s": job["wall_s"]})


if __name__ == "__main__":
    main()
