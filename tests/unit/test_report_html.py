"""The job report page: rendered from a real pipeline run's metrics, self-contained, escaped."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path


from service.core.artifacts import ArtifactStore
from service.core.datasets import inspect_npz
from service.core.onnx_probe import probe_onnx
from service.core.report_html import render
from service.core.settings import Settings
from tests.builders import dataset_npz, mlp, to_bytes
from workers.job_input import JobInput
from workers.pipeline import run_pipeline


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))


def _job(tmp_path: Path, steps: list[dict]) -> dict:
    store = ArtifactStore(tmp_path / "store")
    model = mlp(in_features=64, hidden=128)
    store.put_bytes("m.onnx", to_bytes(model))
    store.put_bytes("d.npz", dataset_npz(model, 64))
    info = probe_onnx(store.path("m.onnx"), timeout_s=60, memory_bytes=2 << 30)
    arrays = inspect_npz(store.path("d.npz"), max_members=8, max_decompressed_bytes=1 << 30)["arrays"]
    job = JobInput("job_x", "t", {"artifact_key": "m.onnx", "inputs": info["inputs"], "outputs": info["outputs"], "name": "m"},
                   {"artifact_key": "d.npz", "arrays": arrays}, None, steps, {"measure": {"runs": 5, "warmup": 1, "batch_sizes": [1, 8]}})
    (tmp_path / "work").mkdir()
    metrics, artifacts = run_pipeline(job, store, Settings(data_dir=tmp_path), tmp_path / "work", lambda *a, **k: None)
    return {"id": "job_x", "status": "succeeded", "steps": steps, "metrics": metrics, "error": None}


def test_a_report_shows_before_after_layers_curves_and_candidates(tmp_path: Path) -> None:
    job = _job(tmp_path, [{"method": "prune", "amount": 0.5, "finetune_epochs": 2}, {"method": "quantize", "candidates": ["int8_dynamic", "fp16"]}])
    page = render(job)
    parser = _Elements()
    parser.feed(page)
    svgs = [attrs for tag, attrs in parser.tags if tag == "svg"]
    labels = {attrs.get("aria-label") for attrs in svgs}
    assert {"size (MB)", "p50 latency at batch 1 (ms)", "p50 latency at batch 8 (ms)", "accuracy", "fidelity to the original"} <= labels
    assert "sparsity per layer" in labels and "quantize candidates" in labels
    assert any(label and "fine-tuning epoch" in label for label in labels)
    assert sum(1 for tag, attrs in parser.tags if tag == "circle" and attrs.get("r") == "7") == 1  # the kept candidate, marked once
    assert not any(tag in ("script", "link", "img") for tag, _ in parser.tags)  # self-contained: nothing to fetch or run


def test_text_from_the_job_is_escaped() -> None:
    page = render({"id": "job_<b>", "status": "failed", "steps": [{"method": "prune"}], "metrics": None,
                   "error": {"code": "prune_failed", "message": "<script>alert(1)</script>"}})
    assert "<script>" not in page and "&lt;script&gt;" in page and "job_&lt;b&gt;" in page
