"""Models exported with a fixed batch (torch's default without `dynamic_shapes`: [2, 16] here) run
through every training method with a dataset whose size is not a multiple of that batch: the
reference outputs, fine-tuning, evaluation and the artifact all use batches of exactly 2, and every
sample is counted once."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bench.architectures import dataset, export
from service.core.job_metrics import checked
from service.core.artifacts import ArtifactStore
from service.core.datasets import inspect_npz
from service.core.onnx_probe import probe_onnx
from service.core.settings import Settings
from tests.builders import dataset_npz, mlp, save
from workers.fixed_batch import chunks, exactly, padded_order
from workers.job_input import JobInput
from workers.steps import StepData
from workers.pipeline import run_pipeline

SAMPLES = 47  # odd: the last batch of 2 is filled up
STEPS = {
    "prune": {"method": "prune", "kind": "unstructured", "amount": 0.5, "finetune_epochs": 1},
    "prune-structured": {"method": "prune", "kind": "structured", "amount": 0.3, "finetune_epochs": 1},
    "cluster": {"method": "cluster", "bits": 4, "finetune_epochs": 1},
    "distill": {"method": "distill", "student": {"kind": "low_rank", "energy": 0.8}, "epochs": 1},
    "low_rank": {"method": "low_rank", "rank_ratio": 0.5, "min_layer_parameters": 256, "finetune_epochs": 1},
    "int8": {"method": "quantize", "mode": "int8_dynamic"},
}


@pytest.fixture(scope="module")
def workspace() -> Path:
    return Path(tempfile.mkdtemp(prefix="fixed-batch-"))


def _model(name: str, workspace: Path) -> tuple[Path, bytes]:
    if name == "mlp":
        path = save(mlp(batch=2), workspace / "mlp.onnx")
        return path, dataset_npz(mlp(), samples=SAMPLES)  # labels from the same weights, dynamic batch
    arch, exporter = name.split("-")
    exp = export(arch, exporter, workspace, dynamic=False)
    return exp.path, dataset(exp, SAMPLES, seq=16)


_prepared: dict[str, tuple[Path, dict, dict]] = {}


def _job(name: str, step: str, workspace: Path) -> tuple[JobInput, ArtifactStore]:
    if name not in _prepared:
        path, data = _model(name, workspace)
        (workspace / f"{name}.npz").write_bytes(data)
        arrays = inspect_npz(workspace / f"{name}.npz", max_members=8, max_decompressed_bytes=1 << 30)["arrays"]
        _prepared[name] = (path, probe_onnx(path, timeout_s=120, memory_bytes=4 << 30), arrays)
    path, description, arrays = _prepared[name]
    assert description["inputs"][0]["shape"][0] == 2  # the upload says it: a fixed batch
    store = ArtifactStore(workspace / "store")
    store.put_file(f"{name}.onnx", path)
    store.put_file(f"{name}.npz", workspace / f"{name}.npz")
    job = JobInput(f"{name}-{step}", "t", {"artifact_key": f"{name}.onnx", "inputs": description["inputs"], "outputs": description["outputs"], "name": name},
                   {"artifact_key": f"{name}.npz", "arrays": arrays}, None, [STEPS[step]], {"measure": {"runs": 5, "warmup": 1, "batch_sizes": [1, 4]}})
    return job, store


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("name", ["mlp", "bert-dynamo", "resnet-torchscript"])
def test_fixed_batch_export_passes_every_method(name: str, step: str, workspace: Path) -> None:
    job, store = _job(name, step, workspace)
    work = workspace / job.job_id
    work.mkdir()
    metrics, _ = run_pipeline(job, store, Settings(data_dir=workspace), work, lambda *a, **k: None)
    checked(metrics, strict=True)  # a key the schema does not declare (a misspelling) fails here
    assert metrics["evaluation"]["samples"] == SAMPLES  # every sample measured once, the filler rows dropped
    assert metrics["original"]["latency_ms"]["batch"] == 2 and metrics["evaluation"]["fixed_batch"] == 2
    assert metrics["compressed"]["fidelity"]["cosine"] > 0.5
    session = ort.InferenceSession(str(store.path(f"jobs/t/{job.job_id}/model.onnx")), providers=["CPUExecutionProvider"])
    arrays = np.load(io.BytesIO((workspace / f"{name}.npz").read_bytes()))
    feed = {i.name: arrays[i.name][:2] for i in session.get_inputs()}
    (out,) = session.run(None, feed)
    assert out.shape[0] == 2 and np.isfinite(out).all()


def test_batches_of_a_fixed_batch_count_every_sample_once() -> None:
    data = StepData(inputs={"x": np.arange(5)[:, None]}, fixed_batch=2)
    feeds = list(data.counted_batches(32))
    assert [len(f["x"]) for f, _ in feeds] == [2, 2, 2] and [real for _, real in feeds] == [2, 2, 1]
    assert data.outputs(lambda feed: feed["x"] * 10, 32).ravel().tolist() == [0, 10, 20, 30, 40]
    assert [idx.tolist() for idx, _ in chunks(1, 4, fixed=True)] == [[0, 0, 0, 0]]
    assert exactly(np.arange(3), 5).tolist() == [0, 1, 2, 0, 1]
    assert sorted(set(padded_order(np.array([4, 1, 3]), 2).tolist())) == [1, 3, 4] and len(padded_order(np.arange(3), 2)) == 4


def test_the_cli_says_when_an_upload_has_a_fixed_batch() -> None:
    from service.cli import describe_inputs

    line = describe_inputs({"id": "mdl_1", "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [2, 16]}]})
    assert "batch is fixed at 2" in line and "[2, 16]" in line
    assert "fixed" not in describe_inputs({"id": "mdl_2", "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 64]}]})
