"""Structured pruning's least-squares refit on a CNN with real data and real training: the residual
CNN with batch norm of bench/pruning_mnist.py (trained on 8,000 MNIST images at 14x14), half of every
layer's channels removed, with and without the refit, without fine-tuning and with 3 epochs; accuracy
on the 10,000 test images. Called directly (prune.apply), the same code a job runs.

    python -m bench.prune_refit_cnn
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from bench.common import report
from tests import mnist
from tests.cnn_models import write_residual_cnn_files


def main() -> None:
    from service.core.specs import PruneStep
    from workers.methods import prune
    from workers.steps import StepContext, StepData

    work = Path(tempfile.mkdtemp())
    train_x, train_y = mnist.load("train")
    test_x, test_y = mnist.load("test")
    model_path, train_path, test_path = write_residual_cnn_files(work, train_x, train_y, test_x, test_y)
    train, test = np.load(train_path), np.load(test_path)
    data = StepData(inputs={"x": train["x"][:4000]}, labels=train["labels"][:4000],
                    evaluation=StepData(inputs={"x": test["x"]}, labels=test["labels"]))
    model = onnx.load(str(model_path))
    rows = []
    for epochs in (0, 3):
        for refit in (False, True):
            start = time.perf_counter()
            spec = PruneStep(kind="structured", amount=0.5, scope="layer", finetune_epochs=epochs, refit=refit, training={"lr": 1e-3})
            result = prune.apply(model, spec, data, StepContext(work_dir=work))
            rows.append([epochs, refit, round(result.report["baseline"], 4), round(result.report["final"], 4), round(time.perf_counter() - start, 1)])
            print(rows[-1], flush=True)
    report("prune_refit_cnn", "residual CNN + BN on MNIST 14x14, structured 50% per layer: least-squares refit or not",
           ["fine-tuning epochs", "refit", "accuracy before", "accuracy after", "seconds"], rows, {"date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
