"""The CUDA training path, run for real: structured pruning with fine-tuning and distillation of a
ResNet-18 (Hugging Face `transformers`, exported by torch's TorchScript exporter) through the worker's
own method code, once on CUDA and once on the CPU, each in its own process (the worker picks its
device once: MODELSHRINK_TORCH_DEVICE). Reports each step's time on each device, checks that the
results agree in quality, and times ONNX Runtime's CUDA execution provider against its CPU one when
that provider is present. Without a CUDA device the CUDA part is skipped, and the output says so.

    python -m bench.gpu_check            # full-size ResNet-18 at 224x224 (a few minutes on a GPU machine)
    python -m bench.gpu_check --quick    # a tiny ResNet at 32x32 (what CI runs on its CPU)

Needs torch, onnx, onnxruntime and transformers (all on the GPU machines we are lent) plus this
repository. Writes bench/results/gpu_check.json; exits 1 when the two devices disagree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STEPS = {
    "prune structured 30% + 1 epoch": {"method": "prune", "kind": "structured", "amount": 0.3, "finetune_epochs": 1, "training": {"batch_size": 32}},
    "distill width 0.5, 1 epoch": {"method": "distill", "student": {"kind": "width", "width": 0.5}, "epochs": 1, "training": {"batch_size": 32}},
}
# Quality (agreement with the original on held-out images) may differ between devices by float
# reduction order and nondeterministic kernels; more than this is a real difference.
TOLERANCE = 0.1


def _prepare(work: Path, quick: bool) -> tuple[Path, Path, Path]:
    from bench.architectures import dataset, export

    exp = export("resnet", "torchscript", work, tiny=quick)
    size = 32 if quick else 224
    paths = (exp.path, work / "train.npz", work / "held_out.npz")
    for path, samples, seed in ((paths[1], 64 if quick else 256, 0), (paths[2], 32 if quick else 64, 1)):
        path.write_bytes(dataset(exp, samples, seed=seed, image=size))
    return paths


def _run_on_device(model_path: Path, train_path: Path, held_out_path: Path) -> dict:
    """Inside the child process: each step through the worker's method code on this process's device."""
    import onnx

    from service.core.specs import step_adapter
    from workers.methods import METHODS
    from workers.steps import StepContext, StepData
    from workers.trainable.device import training_device

    model = onnx.load_model(str(model_path))
    train = StepData(inputs=dict(np.load(train_path)))
    train.evaluation = StepData(inputs=dict(np.load(held_out_path)))
    results = {"device": str(training_device())}
    for name, raw in STEPS.items():
        step = step_adapter.validate_python(raw)
        with tempfile.TemporaryDirectory() as work:
            started = time.perf_counter()
            report = METHODS[step.method].apply(model, step, train, StepContext(work_dir=Path(work))).report
            seconds = time.perf_counter() - started
        quality = report.get("final", report.get("student_score"))
        results[name] = {"seconds": round(seconds, 2), "quality": quality, "metric": report.get("quality_metric")}
    return results


def _child(device: str, paths: tuple[Path, Path, Path]) -> dict | str:
    env = {**os.environ, "MODELSHRINK_TORCH_DEVICE": device}
    out = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--child", *map(str, paths)], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, timeout=1800)
    if out.returncode != 0:
        return f"failed: {(out.stderr.strip().splitlines() or ['?'])[-1][:300]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ort_providers(model_path: Path, held_out_path: Path) -> dict:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"cuda": "skipped: this onnxruntime has no CUDAExecutionProvider"}
    feed = {k: v[:16] for k, v in np.load(held_out_path).items()}
    timings = {}
    for provider in ("CPUExecutionProvider", "CUDAExecutionProvider"):
        session = ort.InferenceSession(str(model_path), providers=[provider])
        for _ in range(3):
            session.run(None, feed)
        started = time.perf_counter()
        for _ in range(20):
            session.run(None, feed)
        timings[provider] = round(1000 * (time.perf_counter() - started) / 20, 3)
    return {"ms_per_batch_of_16": timings}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a tiny ResNet at 32x32 (CI on CPU)")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "TRAIN", "HELD_OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_run_on_device(*map(Path, args.child)), default=str))
        return 0

    import torch

    from bench.common import report

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    paths = _prepare(work, args.quick)
    cuda = torch.cuda.is_available()
    results: dict = {"cpu": _child("cpu", paths)}
    results["cuda"] = _child("cuda", paths) if cuda else "skipped: no CUDA device on this machine"
    results["onnxruntime"] = _ort_providers(paths[0], paths[2])
    rows, agree = [], True
    for name in STEPS:
        cpu = results["cpu"][name] if isinstance(results["cpu"], dict) else None
        gpu = results["cuda"][name] if isinstance(results["cuda"], dict) else None
        if cpu is None:
            agree = False
        if cpu is not None and gpu is not None and abs(cpu["quality"] - gpu["quality"]) > TOLERANCE:
            agree = False
        rows.append([name, cpu and cpu["seconds"], gpu["seconds"] if gpu else results["cuda"] if isinstance(results["cuda"], str) else "failed",
                     cpu and round(cpu["quality"], 4), gpu and round(gpu["quality"], 4),
                     round(cpu["seconds"] / gpu["seconds"], 2) if cpu and gpu else None])
    if isinstance(results["cuda"], str) and results["cuda"].startswith("failed"):
        agree = False
    results["agree"] = agree
    report("gpu_check", f"Worker training path on CUDA and CPU ({'tiny ResNet 32x32' if args.quick else 'ResNet-18 224x224'}; "
           f"torch {torch.__version__}, CUDA {'available' if cuda else 'not available'})",
           ["step", "CPU s", "CUDA s", "CPU quality", "CUDA quality", "CUDA speedup"], rows, {"results": results, "quick": args.quick})
    print(json.dumps({"agree": agree, "onnxruntime": results["onnxruntime"]}))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
