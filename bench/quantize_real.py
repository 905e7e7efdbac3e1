"""The service's `quantize` (auto, chosen by measurement) beside ONNX Runtime's own quantizers called
directly with their fixed settings, on the same models and data, in one run.

    python -m bench.quantize_real                       # MiniLM, ViT-Tiny, ResNet-18, GPT-2 (2 layers)
    python -m bench.quantize_real --models minilm --exporters dynamo

Peers: `quantize_dynamic` per-tensor and per-channel, and `quantize_static` with its defaults (QDQ,
min-max, s8 activations) calibrated on the same training samples. Every row is measured the same
way here: size ratio, held-out fidelity (cosine of the outputs; top-1 agreement for GPT-2's
next-token logits) and p50 latency relative to the original's at batch 1 and 32, the two timed
interleaved. MiniLM has its real weights and real sentences (see bench.real_models); the other
models are full-size configurations with random weights. GPT-2 is also quantized to int4 (embeddings
and the tied output projection included) by each of RTN, HQQ and GPTQ. Prints a table and writes
bench/results/quantize_real.json.
"""

from __future__ import annotations

import argparse
import io
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import report
from bench.real_models import MEASURE, prepared, run_pipeline_metrics

SERVICE = {
    "service auto": {"method": "quantize"},
}
STRICT = {"service auto, cosine >= 0.995": {"method": "quantize", "target": {"min_cosine": 0.995}}}
INT4 = {f"service int4 {a}": {"method": "quantize", "mode": "int4_weight_only", "int4_algorithm": a} for a in ("rtn", "hqq", "gptq")}


def _feeds(blob: bytes) -> dict[str, np.ndarray]:
    return dict(np.load(io.BytesIO(blob)))


def _session(path: Path) -> Any:
    from workers.metrics import make_session

    return make_session(path, 1)


def _peer_row(name: str, original: Path, candidate: Path, held_out: dict[str, np.ndarray]) -> list:
    import onnx

    from service.core.specs import MeasureSpec
    from workers import metrics as m
    from workers.evaluation import ReferenceRun, compare
    from workers.output_kind import model_output_kind
    from workers.steps import StepData

    # Compared exactly as the service compares its own result (padded positions left out).
    data = StepData(inputs=held_out)
    base, cand = _session(original), _session(candidate)
    reference = ReferenceRun(base, data, MEASURE["max_eval_samples"])
    kind = model_output_kind(onnx.load_model(str(original), load_external_data=False), reference.first_output, False)
    fidelity = compare(reference, cand, kind).fidelity()
    timing = m.latency([base, cand], data, MeasureSpec(**MEASURE), lambda f, msg: None)
    speed = [o["p50"] / c["p50"] for o, c in zip(timing[0], timing[1])]
    return [name, original.stat().st_size / candidate.stat().st_size, fidelity["cosine"], fidelity["top1_agreement"], *speed]


def peers(original: Path, train: dict[str, np.ndarray], work: Path) -> dict[str, Path]:
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_dynamic, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            n = len(next(iter(train.values())))
            self._it = iter([{k: v[i:i + 16] for k, v in train.items()} for i in range(0, n, 16)])

        def get_next(self) -> dict | None:
            return next(self._it, None)

    out = {}
    for name, per_channel in (("ORT quantize_dynamic per-tensor", False), ("ORT quantize_dynamic per-channel", True)):
        path = work / f"{original.stem}-{per_channel}.onnx"
        quantize_dynamic(str(original), str(path), per_channel=per_channel, weight_type=QuantType.QInt8)
        out[name] = path
    path = work / f"{original.stem}-static.onnx"
    try:
        quantize_static(str(original), str(path), Reader())
        out["ORT quantize_static (defaults)"] = path
    except Exception as exc:  # noqa: BLE001 - reported as a row
        logging.getLogger(__name__).warning("quantize_static failed: %s", exc)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="minilm,vit-tiny,resnet18,gpt2")
    parser.add_argument("--exporters", default="torchscript")
    parser.add_argument("--out", default="quantize_real", help="results file name under bench/results (without .json)")
    parser.add_argument("--strict", action="store_true", help="also `auto` with min_cosine 0.995 (mixed precision at work); writes quantize_real_strict.json")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    work = Path(tempfile.mkdtemp(prefix="quantize-real-"))
    rows, details = [], {}
    for model in args.models.split(","):
        for exporter in args.exporters.split(","):
            exp, train, held_out = prepared(model, exporter, work)
            steps = {**SERVICE, **(INT4 if model == "gpt2" else {}), **(STRICT if args.strict else {})}
            for name, step in steps.items():
                started = time.perf_counter()
                status, metrics = run_pipeline_metrics(exp, train, held_out, step, work)
                if metrics is None:
                    rows.append([exp.name, name, status, None, None, None, None, None, round(time.perf_counter() - started, 1)])
                else:
                    by_batch = {o["batch"]: o["p50"] / c["p50"] for o, c in zip(metrics["original"]["latency_by_batch"], metrics["compressed"]["latency_by_batch"])}
                    fid = metrics["compressed"]["fidelity"]
                    chosen = metrics["step_reports"][0].get("chosen", step.get("mode"))
                    rows.append([exp.name, f"{name} -> {chosen}", "ok", metrics["compression_ratio"], fid["cosine"], fid["top1_agreement"],
                                 by_batch.get(1), by_batch.get(32), round(time.perf_counter() - started, 1)])
                    details[f"{exp.name} {name}"] = metrics["step_reports"][0]
                print(*rows[-1], flush=True)
            for name, path in peers(exp.path, _feeds(train), work).items():
                started = time.perf_counter()
                rows.append([exp.name, *_peer_row(name, exp.path, path, _feeds(held_out)), round(time.perf_counter() - started, 1)])
                rows[-1].insert(2, "ok")
                print(*rows[-1], flush=True)
    report(f"{args.out}_strict" if args.strict else args.out, "quantize: the service's measured choice beside ONNX Runtime's fixed settings (held-out data)",
           ["model", "method", "status", "size ratio", "held-out cosine", "top-1 agreement", "speedup b1", "speedup b32", "seconds"], rows,
           {"measure": MEASURE, "step_reports": details})


if __name__ == "__main__":
    main()
