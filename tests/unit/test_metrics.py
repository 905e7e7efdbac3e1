"""Metrics: parameter and MAC counts, fidelity and accuracy."""

from __future__ import annotations

import numpy as np

from tests.builders import cnn, mlp
from workers import metrics


def test_parameter_counts_include_zeros_separately() -> None:
    model = mlp(in_features=4, hidden=8, classes=2)
    model.graph.initializer[0].raw_data = np.zeros((4, 8), np.float32).tobytes()
    total, nonzero = metrics.parameter_counts(model)
    assert total == 4 * 8 + 8 + 8 * 8 + 8 + 8 * 2 + 2
    assert nonzero == total - 32


def test_macs_of_mlp_and_cnn() -> None:
    assert metrics.macs_per_sample(mlp(in_features=16, hidden=32, classes=4)) == 16 * 32 + 32 * 32 + 32 * 4
    # conv1: 8x8 pixels x 8 channels x (1*3*3); conv2: 8x8 x 8 x (8*3*3); gemm: 8 x 10
    assert metrics.macs_per_sample(cnn(channels=8, classes=10, size=8)) == 64 * 8 * 9 + 64 * 8 * 72 + 80


def test_fidelity_of_identical_and_flipped_outputs() -> None:
    ref = np.array([[3.0, 0.0], [0.0, 3.0]])  # logits (rows of length 1 would read as an embedding)
    assert metrics.fidelity(ref, ref) == {"top1_agreement": 1.0, "max_abs_diff": 0.0, "cosine": 1.0}
    flipped = metrics.fidelity(ref, ref[:, ::-1])
    assert flipped["top1_agreement"] == 0.0 and flipped["max_abs_diff"] == 3.0 and flipped["cosine"] == 0.0


def test_accuracy_needs_labels_and_class_scores() -> None:
    out = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert metrics.accuracy(out, np.array([1, 0, 0])) == 2 / 3
    assert metrics.accuracy(out, None) is None
    assert metrics.accuracy(np.ones((3, 1)), np.array([0, 0, 0])) is None


def test_a_tied_weight_is_counted_once(tmp_path) -> None:
    # GPT-2's output projection reads the token embedding through a Transpose; folding materialises a copy.
    import onnx

    from bench.architectures import build, export
    from workers.constant_folding import fold

    module, *_ = build("gpt2")
    exported = export("gpt2", "torchscript", tmp_path)
    total, _ = metrics.parameter_counts(fold(onnx.load(str(exported.path))))
    assert total == sum(p.numel() for p in module.parameters())


def test_int4_weights_count_as_weights_not_packed_bytes(tmp_path) -> None:
    from service.core.specs import QuantizeStep
    from tests.builders import mlp
    from workers.methods import quantize
    from workers.steps import StepContext, StepData

    model = mlp(in_features=128, hidden=256)
    dense, _ = metrics.parameter_counts(model)
    result = quantize.apply(model, QuantizeStep(mode="int4_weight_only"), StepData(), StepContext(work_dir=tmp_path))
    total, _ = metrics.parameter_counts(result.model)
    assert total >= dense  # K x N per quantized weight, plus the per-block scales
