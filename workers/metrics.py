"""Before/after metrics, measured the same way for both models: same data, same runtime, same threads."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from service.core.specs import MeasureSpec
from workers.steps import StepData
from workers.output_kind import SCORED, output_kind

EVAL_BATCH = 32


# Inputs of quantized operators that hold scales and zero points (by position), not weights.
QUANTIZATION_INPUTS = {
    "QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2), "MatMulInteger": (2, 3), "ConvInteger": (2, 3),
    "QLinearMatMul": (1, 2, 4, 5, 6, 7), "QLinearConv": (1, 2, 4, 5, 6, 7), "MatMulNBits": (2, 3), "DynamicQuantizeMatMul": (2, 3),
}
# ONNX Runtime's quantizers name the scales they multiply in with a Mul (dynamic int8) this way.
QUANTIZATION_SUFFIXES = ("_scale", "_zero_point", "_scales", "_zero_points")


def quantization_parameter_names(model: onnx.ModelProto) -> set[str]:
    """Initializers that are quantization scales or zero points: reported apart from parameters, so a
    quantized model does not seem to have grown (26,122 -> 27,198 "parameters" on the old quick start)."""
    names = {n.input[i] for n in model.graph.node for i in QUANTIZATION_INPUTS.get(n.op_type, ()) if i < len(n.input) and n.input[i]}
    small = {t.name for t in model.graph.initializer if np.prod(t.dims) <= 65536}
    return (names | {name for name in small if name.endswith(QUANTIZATION_SUFFIXES)}) & {t.name for t in model.graph.initializer}


def quantization_parameter_count(model: onnx.ModelProto) -> int:
    names = quantization_parameter_names(model)
    return int(sum(np.prod(t.dims) for t in model.graph.initializer if t.name in names))


def parameter_counts(model: onnx.ModelProto) -> tuple[int, int]:
    """Every stored weight element counted once (quantization scales and zero points apart: see
    quantization_parameter_count), and the non-zero ones. A tied weight appears twice once folding has materialised its Transpose (GPT-2's
    output projection reads the token embedding): tensors with the same values in any layout count
    once. A MatMulNBits weight counts as the K x N weights it holds, not its packed bytes."""
    packed = {n.input[1]: _attr(n, "K") * _attr(n, "N") for n in model.graph.node if n.op_type == "MatMulNBits" and len(n.input) > 1}
    total = nonzero = 0
    seen: set[tuple] = set()
    quantization = quantization_parameter_names(model)
    for init in model.graph.initializer:
        if init.name in quantization:
            continue
        arr = numpy_helper.to_array(init)
        if init.name in packed:
            total += packed[init.name]
            nonzero += packed[init.name]
            continue
        if arr.size >= 64 and arr.dtype.kind == "f":
            values = arr.astype(np.float64)
            fingerprint = (arr.size, float(values.sum()), float((values * values).sum()), float(np.abs(values).max()))
            if fingerprint[2] != 0.0 and fingerprint in seen:
                continue  # the same tensor again (tied, or a transposed copy)
            seen.add(fingerprint)
        total += arr.size
        nonzero += int(np.count_nonzero(arr))
    return total, nonzero


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), 0)


def _dims(value_info: onnx.ValueInfoProto | None) -> list[int] | None:
    if value_info is None:
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in value_info.type.tensor_type.shape.dim]


def macs_per_sample(model: onnx.ModelProto) -> int | None:
    """Multiply-accumulates of Conv/Gemm/MatMul (and their integer forms) at batch 1, from inferred shapes."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shape inference fails on some valid graphs: MACs are then unknown
        return None
    g = inferred.graph
    infos = {vi.name: vi for vi in list(g.value_info) + list(g.input) + list(g.output)}
    shapes = {name: _dims(vi) for name, vi in infos.items()}
    shapes.update({t.name: list(t.dims) for t in g.initializer})
    total = 0
    for node in g.node:
        out = shapes.get(node.output[0]) if node.output else None
        a = shapes.get(node.input[0]) if node.input else None
        w = shapes.get(node.input[1]) if len(node.input) > 1 else None
        if out is None or a is None or w is None:
            continue
        if node.op_type in ("MatMul", "MatMulInteger", "Gemm") and a:
            k = a[-1]
            if node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute):
                k = a[0]
            total += int(np.prod(out)) * k
        elif node.op_type in ("Conv", "ConvInteger") and len(w) >= 3:
            total += int(np.prod(out)) * int(np.prod(w[1:]))
    return int(total)


def make_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feed_of_batch(data: StepData, batch: int) -> dict[str, np.ndarray]:
    # Repeat samples if the data holds fewer than one batch: latency depends on shapes, not values.
    return {name: np.resize(arr, (batch, *arr.shape[1:])) for name, arr in data.inputs.items()}


def latency(sessions: list, data: StepData, spec: MeasureSpec, progress: Callable[[float, str], None],
            min_timed_ms: float | None = None) -> list[list[dict[str, Any]]]:
    """Latency of several sessions on the same feeds, interleaved run by run (in alternating order),
    so a burst of load on the machine lands on all of them alike instead of on whichever ran then."""
    batches = [data.fixed_batch] if data.fixed_batch else spec.batch_sizes
    results: list[list[dict[str, Any]]] = [[] for _ in sessions]
    for bi, batch in enumerate(batches):
        feed = _feed_of_batch(data, batch)
        slowest = 0.0
        for session in sessions:
            for _ in range(max(1, spec.warmup)):  # at least one, to learn how long a run takes
                start = time.perf_counter()
                session.run(None, feed)
                slowest = max(slowest, time.perf_counter() - start)
        runs = _runs_for(spec.runs, slowest * 1000.0, MIN_TIMED_MS if min_timed_ms is None else min_timed_ms)
        times: list[list[float]] = [[] for _ in sessions]
        for r in range(runs):
            order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
            for i in order:
                start = time.perf_counter()
                sessions[i].run(None, feed)
                times[i].append((time.perf_counter() - start) * 1000.0)
            if r % 10 == 9:
                progress((bi + (r + 1) / runs) / len(batches), f"timing batch {batch}: run {r + 1}/{runs}")
        for i, t in enumerate(times):
            results[i].append({"batch": batch, "p50": float(np.percentile(t, 50)), "p95": float(np.percentile(t, 95)), "runs": runs})
    return results


# A run of a small model takes microseconds, and ten of them decide nothing (the same original came out
# 20% apart between two timing sessions): runs are added until each session has been timed for about
# MIN_TIMED_MS, up to MAX_RUNS. Large models keep the asked number of runs.
MIN_TIMED_MS = 150.0
MAX_RUNS = 400


def _runs_for(asked: int, run_ms: float, min_timed_ms: float = MIN_TIMED_MS) -> int:
    if run_ms <= 0:
        return max(asked, MAX_RUNS)
    return int(max(asked, min(MAX_RUNS, np.ceil(min_timed_ms / run_ms))))


def first_outputs(session, data: StepData, limit: int) -> np.ndarray:
    return data.outputs(lambda feed: session.run(None, feed)[0], EVAL_BATCH, limit=limit).astype(np.float64)


def _is_classifier(out: np.ndarray) -> bool:
    return out.ndim >= 2 and out.shape[-1] > 1


def fidelity(reference: np.ndarray, candidate: np.ndarray, kind: str | None = None) -> dict[str, float | None]:
    """Cosine to the original's outputs (per sample), the largest difference, and, for scores
    (`kind` classifier or token_logits, see workers.output_kind), how often the argmax agrees: for an
    embedding or hidden states the argmax of a vector means nothing, so it is left out (None)."""
    ref, cand = reference.reshape(len(reference), -1), candidate.reshape(len(candidate), -1)
    denom = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cosine = np.where(denom > 0, (ref * cand).sum(axis=1) / np.where(denom > 0, denom, 1), 1.0)
    agreement = None
    if (kind or output_kind(reference)) in SCORED:
        agreement = float((reference.argmax(-1) == candidate.argmax(-1)).mean())
    return {"top1_agreement": agreement, "max_abs_diff": float(np.abs(ref - cand).max()), "cosine": float(cosine.mean())}


def accuracy(outputs: np.ndarray, labels: np.ndarray | None) -> float | None:
    if labels is None or not _is_classifier(outputs) or outputs.ndim != 2:
        return None
    return float((outputs.argmax(-1) == labels[: len(outputs)]).mean())
