"""The report says plainly when a result is worse, and where: quality warnings with the layers most
responsible, "slower" only beyond timing noise, synthetic inputs that look like real ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from service.core.artifacts import ArtifactStore
from service.core.settings import Settings
from tests.builders import dataset_npz, mlp
from workers import verdict
from workers.data import synthetic_data, token_vocabularies
from workers.job_input import JobInput
from workers.pipeline import run_pipeline

MEASURE = {"runs": 5, "warmup": 1, "batch_sizes": [1, 8]}


def _run(model: onnx.ModelProto, steps: list[dict], data: bytes | None, tmp: Path) -> dict:
    store = ArtifactStore(tmp / "store")
    store.put_bytes("m.onnx", model.SerializeToString())
    dataset = None
    if data is not None:
        store.put_bytes("d.npz", data)
        arrays = {"x": {"dtype": "float32", "shape": [256, 16]}, "labels": {"dtype": "int64", "shape": [256]}}
        dataset = {"artifact_key": "d.npz", "arrays": arrays}
    inputs = [{"name": i.name, "dtype": "float32", "shape": ["N", 16]} for i in model.graph.input]
    job = JobInput("j", "t", {"artifact_key": "m.onnx", "inputs": inputs, "outputs": [], "name": "m"}, dataset, None, steps, {"measure": MEASURE})
    work = tmp / "work"
    work.mkdir()
    metrics, _ = run_pipeline(job, store, Settings(data_dir=tmp), work, lambda *a, **k: None)
    return metrics


def test_a_worse_result_is_flagged_with_the_layers_most_responsible(tmp_path: Path) -> None:
    model = mlp(in_features=16, hidden=64, classes=4)
    steps = [{"method": "prune", "kind": "unstructured", "amount": 0.9, "scope": "layer"}]
    metrics = _run(model, steps, dataset_npz(model, samples=256), tmp_path)
    drop = metrics["original"]["accuracy"] - metrics["compressed"]["accuracy"]
    assert drop > 0.01
    assert any(w.startswith(f"Accuracy dropped by {drop * 100:.1f} points") for w in metrics["warnings"])
    responsible = next(w for w in metrics["warnings"] if w.startswith("Layers most responsible"))
    layers = [row["layer"] for row in metrics["sensitivity"]]
    assert layers and set(layers) <= {"w0", "w1", "w2"} and layers[0] in responsible
    drops = [row["drop"] for row in metrics["sensitivity"]]
    assert drops == sorted(drops, reverse=True)


def test_a_faithful_result_carries_no_quality_warning(tmp_path: Path) -> None:
    model = mlp(in_features=16, hidden=64, classes=4)
    metrics = _run(model, [{"method": "quantize", "mode": "fp16"}], dataset_npz(model, samples=256), tmp_path)
    assert not [w for w in metrics["warnings"] if "Accuracy" in w or "cosine" in w]
    assert metrics["sensitivity"] is None


def test_slower_means_beyond_five_percent() -> None:
    original = {"latency_by_batch": [{"batch": 1, "p50": 1.00}, {"batch": 8, "p50": 2.0}]}
    compressed = {"latency_by_batch": [{"batch": 1, "p50": 1.04}, {"batch": 8, "p50": 2.2}]}
    notes = verdict.speed_and_size_warnings(original, compressed, ratio=2.0)
    assert len(notes) == 1 and "at batch 8" in notes[0]


def test_token_models_get_in_vocabulary_ids_at_a_realistic_length(tmp_path: Path) -> None:
    from bench.architectures import export

    exp = export("bert", "torchscript", tmp_path)
    model = onnx.load(str(exp.path))
    vocab = token_vocabularies(model)
    assert vocab == {"input_ids": 200}
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}, {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]}]
    data, description = synthetic_data(inputs, 8, seed=0, vocab=vocab)
    ids = data.inputs["input_ids"]
    assert ids.shape == (8, 128) and ids.max() < 200 and len(np.unique(ids)) > 100
    assert (data.inputs["attention_mask"] == 1).all()
    assert "token ids uniform in [0, 200) at length [128]" in description


def test_a_library_refusing_the_clients_model_is_a_step_error_not_internal_error(tmp_path: Path, monkeypatch) -> None:
    import pytest

    from service.core.errors import CompressionFailed
    from workers.methods import METHODS

    def refuse(*_a, **_k):
        raise RuntimeError("shape '[64, 32, -1, 16]' is invalid for input of size 49152 (/srv/secret/path.py)")

    monkeypatch.setattr(METHODS["quantize"], "apply", refuse)
    with pytest.raises(CompressionFailed) as failed:
        _run(mlp(), [{"method": "quantize", "mode": "fp16"}], None, tmp_path)
    assert failed.value.code == "quantize_failed"
    assert "steps[0] (quantize) could not process this model" in failed.value.message and "/srv" not in failed.value.message


def test_any_failure_of_a_method_on_the_clients_model_gets_the_steps_code(tmp_path: Path, monkeypatch) -> None:
    """Graph surgery meeting a pattern it does not expect (KeyError, AssertionError, onnx's checker)
    is about the model too; running out of memory is resource_limit. Never internal_error."""
    import pytest

    from service.core.errors import CompressionFailed
    from workers.methods import METHODS

    for error, code in ((KeyError("/model/node_7_output"), "quantize_failed"), (AssertionError("unexpected graph"), "quantize_failed"),
                        (MemoryError(), "resource_limit")):
        def fail(*_a, error: BaseException = error, **_k):
            raise error

        monkeypatch.setattr(METHODS["quantize"], "apply", fail)
        with pytest.raises(CompressionFailed) as failed:
            _run(mlp(), [{"method": "quantize", "mode": "fp16"}], None, tmp_path / code / type(error).__name__)
        assert failed.value.code == code, (error, failed.value.code)


def test_warnings_name_layers_as_the_step_report_does(tmp_path: Path) -> None:
    # The dynamo exporter names weights val_405 / node_MatMul_112: both places use the torch module path.
    import io

    from bench.architectures import dataset, export
    from service.core.specs import PruneStep
    from workers.methods import prune
    from workers.sensitivity import layer_sensitivity
    from workers.steps import StepContext, StepData

    exp = export("bert", "dynamo", tmp_path)
    arrays = dict(np.load(io.BytesIO(dataset(exp, 32))))
    data = StepData(inputs={name: arrays[name] for name in exp.inputs})
    model = onnx.load(str(exp.path))
    result = prune.apply(model, PruneStep(amount=0.9, finetune_epochs=0), data, StepContext(work_dir=tmp_path))
    reported = {row["layer"] for row in result.report["layers"]}
    blamed = [row["layer"] for row in layer_sensitivity(model, result.model, data) or []]
    assert blamed and set(blamed) <= reported, (blamed, sorted(reported))
