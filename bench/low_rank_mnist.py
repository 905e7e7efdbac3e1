"""low_rank and depthwise_separable on real MNIST through the worker's pipeline (test split held out):

1. LeNet-300-100 trained here: linear layers by truncated SVD, then fine-tuned. Target (issue):
   >= 4x fewer parameters at test error <= base + 0.3 points.
2. A residual CNN with batch norm (MNIST at 14x14): its 3x3 convolutions by Tucker-2, then fine-tuned.
   Target: >= 2x fewer MACs within 1 point.
3. The same CNN's 3x3 convolutions made depthwise-separable, distilled: each layer keeps 1/O + 1/K^2
   of its weights (the step report gives the ratio per layer).

    python -m bench.low_rank_mnist
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


from bench.common import report
from tests import mnist
from tests.cnn_models import write_residual_cnn_files

LENET_STEP = {"method": "low_rank", "rank_ratio": 0.12, "finetune_epochs": 4, "training": {"lr": 1e-3, "batch_size": 128}}
CNN_STEP = {"method": "low_rank", "rank_ratio": 0.45, "finetune_epochs": 5, "training": {"lr": 1e-3, "batch_size": 128}}
SEPARABLE_STEP = {"method": "depthwise_separable", "finetune_epochs": 5, "training": {"lr": 1e-3, "batch_size": 128}}
MEASURE = {"runs": 100, "batch_sizes": [1, 64], "max_eval_samples": 10000}


def run(model: Path, train: Path, test: Path, step: dict, work: Path) -> dict:
    from service.core.artifacts import ArtifactStore
    from service.core.datasets import inspect_npz
    from service.core.onnx_probe import probe_onnx
    from service.core.settings import Settings
    from workers.job_input import JobInput
    from workers.pipeline import run_pipeline

    store = ArtifactStore(work / "store")
    store.put_file(model.name, model)
    meta = {}
    for path in (train, test):
        store.put_file(path.name, path)
        meta[path.name] = {"artifact_key": path.name, "arrays": inspect_npz(store.path(path.name), max_members=8, max_decompressed_bytes=1 << 31)["arrays"]}
    info = probe_onnx(model, timeout_s=120, memory_bytes=4 << 30)
    job = JobInput(f"{model.stem}-{step['method']}", "bench", {"artifact_key": model.name, "inputs": info["inputs"], "outputs": info["outputs"], "name": model.stem},
                   meta[train.name], meta[test.name], [step], {"measure": MEASURE})
    (work / job.job_id).mkdir()
    started = time.perf_counter()
    metrics, _ = run_pipeline(job, store, Settings(data_dir=work), work / job.job_id, lambda *a, **k: None)
    metrics["wall_s"] = time.perf_counter() - started
    return metrics


def row(name: str, m: dict) -> list:
    o, c = m["original"], m["compressed"]
    return [name, f"{100 * (1 - o['accuracy']):.2f} -> {100 * (1 - c['accuracy']):.2f}", f"{o['parameters']} -> {c['parameters']}",
            round(o["parameters"] / c["parameters"], 2), f"{o['macs']} -> {c['macs']}", round(o["macs"] / c["macs"], 2),
            f"{o['latency_ms']['p50']:.3f} -> {c['latency_ms']['p50']:.3f}", round(m["wall_s"], 1)]


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="low-rank-mnist-"))
    train_x, train_y = mnist.load("train")
    test_x, test_y = mnist.load("test")
    files = mnist.write_files(work, lenet_epochs=8)
    lenet = run(files["lenet"], files["train"], files["test"], LENET_STEP, work)

    cnn_files = write_residual_cnn_files(work, train_x, train_y, test_x, test_y)
    cnn = run(*cnn_files, CNN_STEP, work)
    separable = run(*cnn_files, SEPARABLE_STEP, work)
    rows = [row("LeNet-300-100, SVD (rank 12% of full)", lenet), row("residual CNN + BN, Tucker-2 (45% of each mode)", cnn),
            row("residual CNN + BN, depthwise-separable (distilled)", separable)]
    report("low_rank_mnist", "low_rank on MNIST (test split)",
           ["model / step", "top-1 error %", "parameters", "param ratio", "MACs/sample", "MAC ratio", "p50 ms b1", "job s"], rows,
           {"lenet": lenet["step_reports"][0], "cnn": cnn["step_reports"][0], "separable": separable["step_reports"][0],
            "steps": {"lenet": LENET_STEP, "cnn": CNN_STEP, "separable": SEPARABLE_STEP}})


if __name__ == "__main__":
    main()
