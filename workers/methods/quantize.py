"""quantize: int8 (dynamic, or static QDQ with calibration) and fp16, on ONNX Runtime's quantization tools.

Calibration is run here rather than inside `quantize_static`, because quantize_static does not pass
`num_bins`/`num_quantized_bins` to its calibrator: with its defaults (128/128) entropy calibration
degenerates to min-max. We run ORT's own calibrator with real histogram settings, save its ranges
as a calibration cache, and hand that cache to quantize_static.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import onnx

from service.core.errors import CompressionFailed, JobFailure
from service.core.specs import QuantizeStep
from workers.methods import quantize_lowbit
from workers.methods.base import StepContext, StepData, StepResult

name = "quantize"
SPEC = QuantizeStep
CALIBRATION_BATCH = 16
# Dynamic int8 convolutions (ConvInteger) run 6-13x slower than fp32 on ORT's CPU provider (measured);
# with no calibration data, `auto` quantizes only the matrix products, where dynamic int8 pays off.
AUTO_DYNAMIC_OPS = ["MatMul", "Gemm", "Attention", "LSTM", "GRU", "EmbedLayerNormalization"]


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def _resolve_mode(spec: QuantizeStep, data: StepData) -> tuple[str, str]:
    if spec.mode != "auto":
        return spec.mode, "requested"
    if data.available:
        return "int8_static", "auto: the job has a dataset, so activations are calibrated (QDQ, static)"
    return "int8_dynamic", "auto: no dataset to calibrate with, so dynamic int8 on matrix products only (dynamic int8 convolutions are slower on CPU)"


def _op_types(spec: QuantizeStep, registry: dict[str, Any], default: list[str] | None = None) -> list[str]:
    chosen = spec.op_types or default or sorted(registry)
    return [op for op in chosen if op not in set(spec.exclude_op_types)]


class _Reader:
    """ORT CalibrationDataReader over the job's dataset, reporting progress (and so honouring cancel)."""

    def __init__(self, data: StepData, spec: QuantizeStep, ctx: StepContext) -> None:
        self.batch = data.batch_size(CALIBRATION_BATCH)
        self.total = min(spec.calibration.max_samples, data.samples)
        self._it = data.batches(self.batch, limit=self.total)
        self._ctx = ctx
        self.seen = 0

    def get_next(self) -> dict | None:
        feed = next(self._it, None)
        if feed is not None:
            self.seen += len(next(iter(feed.values())))
            self._ctx.progress(0.7 * self.seen / max(1, self.total), f"calibrating {self.seen}/{self.total} samples")
        return feed

    def rewind(self) -> None:  # part of ORT's reader interface; calibration reads once
        pass


def _calibrate(model_path: Path, spec: QuantizeStep, data: StepData, ctx: StepContext, op_types: list[str]) -> tuple[Path, Any, int]:
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    cal = spec.calibration
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[cal.method]
    options: dict[str, Any] = {}
    if cal.symmetric is not None:
        options["symmetric"] = cal.symmetric
    if cal.method == "entropy":
        options.update(num_bins=cal.num_bins, num_quantized_bins=cal.num_quantized_bins)
    elif cal.method == "percentile":
        options.update(num_bins=cal.num_bins, percentile=cal.percentile)
    calibrator = create_calibrator(
        model_path,
        op_types,
        augmented_model_path=str(ctx.work_dir / "augmented.onnx"),
        calibrate_method=method,
        extra_options=options,
    )
    reader = _Reader(data, spec, ctx)
    calibrator.collect_data(reader)
    ranges = calibrator.compute_data()
    cache = ctx.work_dir / "calibration.json"
    save_tensors_data(ranges, cache)
    return cache, method, reader.seen


def _quantize_static(model_path: Path, out: Path, spec: QuantizeStep, data: StepData, ctx: StepContext) -> dict[str, Any]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not data.available:
        raise CompressionFailed("int8_static needs calibration data: submit the job with a dataset_id", code="dataset_required")
    prepared = ctx.work_dir / "prepared.onnx"
    try:
        # Shape inference + graph cleanup, as ORT recommends before static quantization.
        quant_pre_process(str(model_path), str(prepared), skip_symbolic_shape=False)
    except Exception:
        logging.getLogger(__name__).info("quant_pre_process failed; quantizing the model as uploaded", exc_info=True)
        prepared = model_path
    op_types = _op_types(spec, QDQRegistry)
    cache, method, seen = _calibrate(prepared, spec, data, ctx, op_types)
    ctx.progress(0.75, "writing the QDQ model")
    quantize_static(
        str(prepared),
        str(out),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=op_types,
        per_channel=True if spec.per_channel is None else spec.per_channel,
        reduce_range=spec.reduce_range,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=spec.exclude_nodes,
        calibrate_method=method,
        calibration_cache_path=str(cache),
    )
    return {"calibration": {"method": spec.calibration.method, "samples": seen}, "format": "QDQ", "per_channel": spec.per_channel is not False}


def _quantize_dynamic(model_path: Path, out: Path, spec: QuantizeStep, auto: bool) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    op_types = _op_types(spec, IntegerOpsRegistry, AUTO_DYNAMIC_OPS if auto else None)
    quantize_dynamic(
        str(model_path),
        str(out),
        op_types_to_quantize=op_types,
        per_channel=bool(spec.per_channel),
        reduce_range=spec.reduce_range,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=spec.exclude_nodes,
    )
    return {"op_types": op_types, "per_channel": bool(spec.per_channel)}


def _to_fp16(model: onnx.ModelProto, spec: QuantizeStep) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = convert_float_to_float16(
        model,
        keep_io_types=spec.keep_io_types,
        op_block_list=spec.exclude_op_types or None,
        node_block_list=spec.exclude_nodes or None,
    )
    # The converter appends its input/output Casts at the end of the node list; ONNX Runtime runs
    # that, but onnx.checker (and other runtimes) require topological order.
    wrapper = OnnxModel(converted)
    wrapper.topological_sort()
    return wrapper.model


def apply(model: onnx.ModelProto, spec: QuantizeStep, data: StepData, ctx: StepContext) -> StepResult:
    mode, reason = _resolve_mode(spec, data)
    source = ctx.work_dir / "quantize_input.onnx"
    out = ctx.work_dir / "quantize_output.onnx"
    onnx.save_model(model, str(source))
    ctx.progress(0.0, f"quantizing ({mode})")
    try:
        if mode == "int8_static":
            details = _quantize_static(source, out, spec, data, ctx)
            result = onnx.load_model(str(out))
        elif mode == "int4_weight_only":
            result, details = quantize_lowbit.int4_weight_only(model, spec)
        elif mode == "binary":
            result, details = quantize_lowbit.binary(model, spec, data, ctx)
        elif mode == "int8_dynamic":
            details = _quantize_dynamic(source, out, spec, auto=spec.mode == "auto")
            result = onnx.load_model(str(out))
        else:
            details = {"keep_io_types": spec.keep_io_types}
            result = _to_fp16(model, spec)
    except JobFailure:  # our own failures and cancellation pass through unchanged
        raise
    except Exception as exc:
        raise CompressionFailed(f"ONNX Runtime could not quantize the model ({mode}): {str(exc).splitlines()[0][:300]}") from exc
    ctx.progress(1.0, f"quantized ({mode})", milestone=True)
    report = {
        "mode": mode,
        "reason": reason,
        "ops_before": _op_counts(model),
        "ops_after": _op_counts(result),
        **details,
    }
    return StepResult(model=result, report=report)
