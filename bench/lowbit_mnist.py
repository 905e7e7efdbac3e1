"""Low-bit steps on MNIST, called in-process: int4 weight-only and binary weights on LeNet-300-100,
and 4-bit weight clustering of a residual CNN (14x14 MNIST), each with test-split accuracy."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import onnx
import torch

from bench.common import report
from service.core.specs import ClusterStep, QuantizeStep
from tests import mnist
from tests.builders import reference_outputs
from tests.cnn_models import downsample, train_residual_cnn
from workers.methods import cluster, quantize
from workers.steps import StepContext, StepData


def accuracy(model: onnx.ModelProto, x, y) -> float:
    return float((reference_outputs(model, x).argmax(-1) == y).mean())


def main() -> None:
    work = Path(tempfile.mkdtemp())
    train_x, train_y = mnist.load("train")
    test_x, test_y = mnist.load("test")
    lenet = onnx.load_model_from_string(mnist.lenet_300_100(epochs=4))
    data = StepData(inputs={"x": train_x}, labels=train_y, evaluation=StepData(inputs={"x": test_x}, labels=test_y))
    rows = []
    for name, spec in [
        ("LeNet-300-100, int4 weight-only (block 32)", QuantizeStep(mode="int4_weight_only")),
        ("LeNet-300-100, binary hidden layer, no fine-tuning", QuantizeStep(mode="binary")),
        ("LeNet-300-100, binary all layers, 3 epochs STE", QuantizeStep(mode="binary", binary_keep_first_last=False, finetune_epochs=3)),
    ]:
        result = quantize.apply(lenet, spec, data, StepContext(work_dir=work))
        rows.append([name, len(lenet.SerializeToString()) / len(result.model.SerializeToString()),
                     100 * accuracy(lenet, test_x, test_y), 100 * accuracy(result.model, test_x, test_y)])

    small_train, small_test = downsample(train_x[:8000]), downsample(test_x[:2000])
    net = train_residual_cnn(small_train, train_y[:8000])
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.zeros(2, 1, 14, 14),), buffer, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    cnn = onnx.load_model_from_string(buffer.getvalue())
    cnn_data = StepData(inputs={"x": small_train}, labels=train_y[:8000], evaluation=StepData(inputs={"x": small_test}, labels=test_y[:2000]))
    result = cluster.apply(cnn, ClusterStep(bits=4, finetune_epochs=2, min_elements=64), cnn_data, StepContext(work_dir=work))
    rows.append(["residual CNN, 4-bit clusters + 2 epochs centroid fine-tuning", len(cnn.SerializeToString()) / len(result.model.SerializeToString()),
                 100 * accuracy(cnn, small_test, test_y[:2000]), 100 * accuracy(result.model, small_test, test_y[:2000])])
    report("lowbit_mnist", "Low-bit steps on MNIST (test split)", ["model / step", "ONNX size ratio", "accuracy % before", "accuracy % after"], rows, {})


if __name__ == "__main__":
    main()
