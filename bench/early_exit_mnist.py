"""early_exit on LeNet-5 (Caffe's: conv 20, pool, conv 50, pool, fc 500, fc 10) trained here on real
MNIST; heads trained on the training split, the threshold chosen and everything measured on the test
split, through the worker's pipeline. Target (issue): >= 40% fewer average MACs at <= 0.2 points
accuracy loss, and ONNX Runtime time (batch 1, the deployable nested-If model) lower by a comparable share.

    python -m bench.early_exit_mnist
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import report
from bench.low_rank_mnist import run
from tests import mnist

STEP = {"method": "early_exit", "max_accuracy_drop": 0.002, "epochs": 10}


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="early-exit-mnist-"))
    train_x, train_y = mnist.load("train")
    test_x, test_y = mnist.load("test")
    (work / "lenet5.onnx").write_bytes(mnist.lenet_5(epochs=3))
    (work / "train.npz").write_bytes(mnist.npz(train_x.reshape(-1, 1, 28, 28), train_y))
    (work / "test.npz").write_bytes(mnist.npz(test_x.reshape(-1, 1, 28, 28), test_y))
    metrics = run(work / "lenet5.onnx", work / "train.npz", work / "test.npz", STEP, work)
    step = metrics["step_reports"][0]
    chosen, deployable = step["chosen"], step["deployable"]
    rows = [[row["threshold"], f"{100 * row['accuracy']:.2f}", f"{100 * (1 - row['average_macs'] / step['model_macs']):.1f}", row["exit_shares"][0]]
            for row in step["thresholds"]]
    report("early_exit_mnist", f"early_exit on LeNet-5 (test split; original {100 * step['original_score']:.2f}% accurate). Chosen threshold "
           f"{chosen['threshold']}: {100 * chosen['mac_reduction']:.1f}% fewer average MACs, accuracy -{100 * chosen['accuracy_drop']:.2f} points; "
           f"ONNX Runtime batch 1: {deployable['ms_per_sample_batch1']['original']:.4f} -> {deployable['ms_per_sample_batch1']['early_exit']:.4f} ms "
           f"({100 * deployable['time_reduction']:.1f}% less)",
           ["threshold", "accuracy %", "fewer MACs %", "share leaving at exit 1"], rows, {"step_report": step, "step": STEP})


if __name__ == "__main__":
    main()
