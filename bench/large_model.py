"""A model over protobuf's 2 GB limit, in and out through the real service: upload as a .zip of
model.onnx + model.onnx.data (torch.onnx.export's layout), an int8 job, download. Compared with ONNX
Runtime's quantize_dynamic called directly on the same files in the same run.

The model is a chain of N MatMuls of 8192x8192 float32 weights (N=8: 2.15 GB), written straight to
external data (no in-memory model over 2 GB is ever serialized, which protobuf cannot do). Needs
about 14 GB of memory for the job (MODELSHRINK_JOB_MEMORY_LIMIT_BYTES is raised for it) and ~5 GB of disk.

    python -m bench.large_model            # 8 layers, 2.15 GB
    python -m bench.large_model --layers 2 # 0.54 GB: the same path without the size (a quick look)

Writes bench/results/large_model.json.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

WIDTH = 8192


def build(folder: Path, layers: int) -> Path:
    """model.onnx + model.onnx.data, each weight streamed to the data file as it is drawn."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    initializers, nodes, x, offset = [], [], "x", 0
    with open(folder / "model.onnx.data", "wb") as data:
        for i in range(layers):
            weight = (np.random.default_rng(i).standard_normal((WIDTH, WIDTH), dtype=np.float32) / np.float32(np.sqrt(WIDTH))).astype(np.float32).tobytes()
            data.write(weight)
            tensor = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[WIDTH, WIDTH], data_location=TensorProto.EXTERNAL)
            for key, value in (("location", "model.onnx.data"), ("offset", str(offset)), ("length", str(len(weight)))):
                tensor.external_data.add(key=key, value=value)
            offset += len(weight)
            initializers.append(tensor)
            out = "y" if i == layers - 1 else f"h{i}"
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [out], name=f"layer{i}"))
            x = out
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])], initializers)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    return folder / "model.onnx"


def _latency_ms(path: Path, x: np.ndarray, runs: int = 20) -> tuple[float, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": x})[0]
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, {"x": x[:1]})
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times)), out


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def _on_disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()

    from bench.common import report, running_service
    from service.client import Client

    work = Path(tempfile.mkdtemp(prefix="large-model-"))
    try:
        started = time.perf_counter()
        graph = build(work / "export", args.layers)
        size = _on_disk(graph.parent)
        print(f"built {size / 1e9:.2f} GB in {time.perf_counter() - started:.0f} s", flush=True)
        x = np.random.default_rng(7).standard_normal((16, WIDTH)).astype(np.float32)
        original_ms, reference = _latency_ms(graph, x)

        # The peer: ONNX Runtime's own dynamic quantizer, called directly.
        from onnxruntime.quantization import QuantType, quantize_dynamic

        peer_dir = work / "peer"
        peer_dir.mkdir()
        started = time.perf_counter()
        quantize_dynamic(str(graph), str(peer_dir / "model.onnx"), weight_type=QuantType.QInt8, use_external_data_format=True)
        peer_s = time.perf_counter() - started
        peer_ms, peer_out = _latency_ms(peer_dir / "model.onnx", x)
        peer_row = ["onnxruntime quantize_dynamic (direct)", round(size / _on_disk(peer_dir), 2), round(original_ms / peer_ms, 2),
                    round(_cosine(reference, peer_out), 5), round(peer_s, 1), "-"]
        shutil.rmtree(peer_dir)

        env = {"MODELSHRINK_JOB_MEMORY_LIMIT_BYTES": str(20 * 1024**3), "MODELSHRINK_PROBE_MEMORY_BYTES": str(20 * 1024**3),
               "MODELSHRINK_PROBE_TIMEOUT_S": "900"}
        with running_service(env) as service:
            client = Client(service["url"], service["key"], timeout=900)
            started = time.perf_counter()
            model = client.upload_model(graph)  # zipped with its data file, as torch's exports are
            upload_s = time.perf_counter() - started
            print(f"uploaded in {upload_s:.0f} s: format {model['format']}, {model['size_bytes'] / 1e9:.2f} GB stored", flush=True)
            started = time.perf_counter()
            job = client.submit({"model_id": model["id"], "steps": [{"method": "quantize", "mode": "int8_dynamic"}],
                                 "measure": {"runs": 10, "warmup": 2, "batch_sizes": [1]}})
            for event, data in client.events(job["id"]):
                if event == "end":
                    job = data
            job_s = time.perf_counter() - started
            if job["status"] != "succeeded":
                raise SystemExit(f"job {job['status']}: {job.get('error')}")
            artifact = next(a["name"] for a in job["artifacts"] if a["name"].startswith("model."))
            downloaded = client.download(job["id"], artifact, work / artifact)
            out_dir = work / "ours"
            if artifact.endswith(".zip"):
                zipfile.ZipFile(downloaded).extractall(out_dir)
            else:
                out_dir.mkdir()
                shutil.move(downloaded, out_dir / "model.onnx")
            ours_ms, ours_out = _latency_ms(out_dir / "model.onnx", x)
        metrics = job["metrics"]
        rows = [
            ["modelshrink quantize int8_dynamic (HTTP)", round(size / _on_disk(out_dir), 2), round(original_ms / ours_ms, 2),
             round(_cosine(reference, ours_out), 5), round(job_s, 1), metrics["step_reports"][0].get("chosen", "")],
            peer_row,
        ]
        report("large_model", f"A {size / 1e9:.2f} GB model ({args.layers} x {WIDTH}x{WIDTH} MatMul) through the service; "
               f"upload {upload_s:.0f} s, stored as {model['format']}", ["path", "size ratio", "speedup b1", "cosine", "seconds", "chosen"], rows,
               {"model_bytes": size, "upload_s": upload_s, "stored_format": model["format"], "artifact": artifact,
                "job_metrics": {k: metrics[k] for k in ("compression_ratio", "speedup", "warnings")},
                "job_fidelity": metrics["compressed"]["fidelity"], "original_ms_b1": original_ms})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
