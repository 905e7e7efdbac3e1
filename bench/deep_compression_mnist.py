"""Deep Compression of LeNet-300-100 and LeNet-5 through the HTTP API on MNIST, stage by stage, next
to Han, Mao & Dally (ICLR 2016), Table 1: LeNet-300-100 1070 KB -> 27 KB (40x) at 1.58% error
(reference 1.64%); LeNet-5 1720 KB -> 44 KB (39x) at 0.74% (reference 0.80%).
`--lenet5` adds LeNet-5 (about ten minutes of CPU training here), `--lenet5-only` runs it alone. The step runs with its defaults (the
sparsity chosen on the data, service/core/methods/deep_compression.py); `--paper-setting` runs Han et
al.'s 92% in 3 rounds of 3 epochs instead."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench.common import report, running_service
from bench.pruning_mnist import run_job
from service.client import Client
from tests import mnist


def main() -> None:
    work = Path(tempfile.mkdtemp())
    files = mnist.write_files(work)
    images = [] if "--lenet5-only" in sys.argv else [("LeNet-300-100", files["lenet"], files["train"], files["test"])]
    if "--lenet5" in sys.argv or "--lenet5-only" in sys.argv:
        train_x, train_y = mnist.load("train")
        test_x, test_y = mnist.load("test")
        (work / "lenet5.onnx").write_bytes(mnist.lenet_5())
        (work / "train_img.npz").write_bytes(mnist.npz(train_x.reshape(-1, 1, 28, 28), train_y))
        (work / "test_img.npz").write_bytes(mnist.npz(test_x.reshape(-1, 1, 28, 28), test_y))
        images.append(("LeNet-5", work / "lenet5.onnx", work / "train_img.npz", work / "test_img.npz"))
    step: dict = {"method": "deep_compression"}
    if "--paper-setting" in sys.argv:
        step["prune"] = {"kind": "unstructured", "amount": 0.92, "iterations": 3, "finetune_epochs": 3, "training": {"lr": 5e-4, "batch_size": 128}}
        step["cluster"] = {"bits": 4, "finetune_epochs": 2, "training": {"lr": 1e-4, "batch_size": 128}}
    env = {"MODELSHRINK_MAX_DATASET_DECOMPRESSED_BYTES": str(2 * 1024**3)}
    paper = {"LeNet-300-100": ["1070 -> 27", 40.0, "1.64 -> 1.58"], "LeNet-5": ["1720 -> 44", 39.0, "0.80 -> 0.74"]}
    rows, extra = [], {}
    with running_service(env) as svc:
        client = Client(svc["url"], svc["key"], timeout=1200)
        for model_name, model, train, test in images:
            job = run_job(client, model, train, test, step)
            rows += [[model_name, s["stage"], s["size_bytes"] / 1000, s["ratio"], 100 * (1 - s["accuracy"])] for s in job["metrics"]["step_reports"][0]["stages"]]
            rows.append([model_name, "paper: original -> Deep Compression", *paper[model_name]])
            m = job["metrics"]
            extra[model_name] = {"step": step, "chosen": m["step_reports"][0].get("chosen"), "speedup_b1": m["speedup"], "latency": [m["original"]["latency_ms"], m["compressed"]["latency_ms"]], "job_s": job["wall_s"]}
    name = "deep_compression_mnist" + ("_lenet5" if "--lenet5-only" in sys.argv else "") + ("_paper_setting" if "--paper-setting" in sys.argv else "")
    report(name, "Deep Compression through the HTTP API (MNIST test split)",
           ["model", "stage", "size KB", "ratio", "top-1 error %"], rows, extra)


if __name__ == "__main__":
    main()
