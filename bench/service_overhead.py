"""Benchmark 1: one int8 job through the HTTP API (upload -> submit -> SSE until done -> download)
against the same quantization called directly in Python, same model and machine.

The service also validates the output in a sandbox and measures both models; the direct column
"pipeline" runs that same work in-process, "quantize only" is just ORT's quantizer.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from bench.common import report, running_service
from service.client import Client
from service.core.artifacts import ArtifactStore
from service.core.settings import Settings
from service.core.specs import QuantizeStep
from tests.builders import dataset_npz, mlp, save
from workers.methods import quantize
from workers.steps import StepContext
from workers.job_input import JobInput
from workers.pipeline import run_pipeline

REPEATS = 3
STEP = {"method": "quantize", "mode": "int8_static", "calibration": {"method": "minmax", "max_samples": 256}}
MEASURE = {"warmup": 5, "runs": 50, "batch_sizes": [1, 32]}


def main() -> None:
    work = Path(tempfile.mkdtemp())
    model = mlp(in_features=784, hidden=1024, classes=10)
    model_path = save(model, work / "mlp.onnx")
    data_path = work / "data.npz"
    data_path.write_bytes(dataset_npz(model, samples=512))


    from workers.data import load_step_data

    inputs = [{"name": "x", "dtype": "float32", "shape": ["N", 784]}]
    arrays = {"x": {"dtype": "float32", "shape": [512, 784]}, "labels": {"dtype": "int64", "shape": [512]}}
    data = load_step_data(data_path, arrays, inputs, "dataset")
    direct_quantize = []
    for i in range(REPEATS):
        ctx = StepContext(work_dir=work / f"q{i}")
        ctx.work_dir.mkdir()
        start = time.perf_counter()
        quantize.apply(model, QuantizeStep.model_validate(STEP), data, ctx)
        direct_quantize.append(time.perf_counter() - start)

    store = ArtifactStore(work / "store")
    store.put_file("m.onnx", model_path)
    store.put_file("d.npz", data_path)
    direct_pipeline = []
    for i in range(REPEATS):
        job = JobInput(f"job{i}", "t", {"artifact_key": "m.onnx", "inputs": inputs, "outputs": [], "name": "mlp"},
                       {"artifact_key": "d.npz", "arrays": arrays}, None, [STEP], {"measure": MEASURE})
        (work / f"p{i}").mkdir()
        start = time.perf_counter()
        run_pipeline(job, store, Settings(data_dir=work), work / f"p{i}", lambda *a: None)
        direct_pipeline.append(time.perf_counter() - start)

    http = []
    with running_service() as svc:
        client = Client(svc["url"], svc["key"])
        for i in range(REPEATS + 1):  # the first job also pays the worker's one-time imports
            start = time.perf_counter()
            body = {"model_id": client.upload_model(model_path)["id"], "dataset_id": client.upload_dataset(data_path)["id"],
                    "steps": [STEP], "measure": MEASURE}
            job = client.submit(body)
            for event, payload in client.events(job["id"]):
                if event == "end":
                    assert payload["status"] == "succeeded", payload["error"]
            client.download(job["id"], "model.onnx", work / f"out{i}.onnx")
            if i > 0:
                http.append(time.perf_counter() - start)

    q, p, h = statistics.median(direct_quantize), statistics.median(direct_pipeline), statistics.median(http)
    rows = [
        ["direct: quantize only", q, 1.0],
        ["direct: quantize + validate + measure", p, p / q],
        ["HTTP: upload, submit, follow, download", h, h / q],
    ]
    report("service_overhead", f"int8 static job, MLP 784-1024-1024-10, median of {REPEATS}", ["path", "seconds", "x quantize only"], rows,
           {"http_over_direct_pipeline": h / p, "model_bytes": model_path.stat().st_size})
    print(f"service overhead over the same work in-process: {h / p:.2f}x ({h - p:.2f} s)")


if __name__ == "__main__":
    main()
