"""int8 candidates on ONNX Runtime's quantizers: dynamic (weights int8, activations quantized at run
time) and static QDQ (activation ranges calibrated on the job's data).

Calibration runs here rather than inside `quantize_static`, because quantize_static does not pass
`num_bins`/`num_quantized_bins` to its calibrator: with its defaults (128/128) entropy calibration
degenerates to min-max. We run ORT's own calibrator with real histogram settings, save its ranges as
a calibration cache, and hand that cache to quantize_static. One calibration serves every static
candidate built from the same graph and method.

Activations are unsigned (u8 x s8): on x86 ONNX Runtime's s8 x s8 QDQ kernels ran MiniLM 2x slower than
float where u8 x s8 ran it 1.9x faster (measured, same ranges).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

from service.core.errors import CompressionFailed
from workers.quantization.int4 import drop_unused
from workers.steps import StepData

CALIBRATION_BATCH = 16
# Matrix products and the embedding lookups feeding them: where int8 pays on CPU. Dynamic int8
# convolutions (ConvInteger) run 6-13x slower than fp32 on ORT's CPU provider (measured).
MATMUL_OPS = ["MatMul", "Gemm", "Gather", "Attention", "EmbedLayerNormalization", "LSTM", "GRU"]
# Types ORT cannot infer for com.microsoft ops (the transformer fusions) default to float.
FLOAT_DEFAULT = {"DefaultTensorType": onnx.TensorProto.FLOAT}


def op_types(registry: dict[str, Any], ops: str, chosen: list[str] | None, excluded: list[str]) -> list[str]:
    base = chosen or (sorted(set(MATMUL_OPS) & set(registry)) if ops == "matmul" else sorted(registry))
    return [op for op in base if op not in set(excluded)]


def dynamic(source: Path, out: Path, *, per_channel: bool, reduce_range: bool, ops: list[str], exclude: list[str], only: list[str] | None) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from workers.model_files import is_external

    quantize_dynamic(
        str(source), str(out), op_types_to_quantize=ops, per_channel=per_channel, reduce_range=reduce_range,
        weight_type=QuantType.QInt8, nodes_to_exclude=exclude, nodes_to_quantize=only, extra_options=FLOAT_DEFAULT,
        # A source over 2 GB (weights beside it) may quantize to more than one file can hold, too.
        use_external_data_format=is_external(source),
    )
    if not is_external(out):
        drop_zero_weight_zero_points(out)


def drop_zero_weight_zero_points(path: Path) -> None:
    """MatMulInteger's weight zero point is optional (0 when absent) and symmetric int8 weights always
    have it 0: ORT still stores one byte per output column (20,736 bytes on all-MiniLM-L6-v2). Dropped
    when all zero: the same product, fewer bytes."""
    model = onnx.load_model(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    dropped = False
    for node in model.graph.node:
        if node.op_type == "MatMulInteger" and len(node.input) == 4 and node.input[3] in inits and not numpy_helper.to_array(inits[node.input[3]]).any():
            del node.input[3]
            dropped = True
    if dropped:
        drop_unused(model)  # the zero points no product reads any more
        onnx.save_model(model, str(path))


def prepare(source: Path, out: Path) -> Path:
    """Shape inference and graph cleanup, as ORT recommends before static quantization; symbolic shape
    inference first, plain ONNX inference when the symbolic one gives up (it does on real BERT exports)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    for symbolic in (True, False):
        try:
            # When symbolic inference gives up it dumps its partial model (and a data file the size of
            # the weights) into the current directory: keep that inside the job's work directory.
            with contextlib.chdir(out.parent):
                quant_pre_process(str(source.resolve()), str(out.resolve()), skip_symbolic_shape=not symbolic)
            return out
        except Exception:  # ORT raises bare Exception; fall back to the next way
            logging.getLogger(__name__).info("quant_pre_process (symbolic=%s) failed", symbolic, exc_info=True)
    return source


class Reader:
    """ORT CalibrationDataReader over the job's dataset, reporting progress (and so honouring cancel)."""

    def __init__(self, data: StepData, max_samples: int, progress: Callable[[float, str], None]) -> None:
        self.batch = data.batch_size(CALIBRATION_BATCH)
        self.total = min(max_samples, data.samples)
        self._it = data.batches(self.batch, limit=self.total)
        self._progress = progress
        self.seen = 0

    def get_next(self) -> dict | None:
        feed = next(self._it, None)
        if feed is not None:
            self.seen += len(next(iter(feed.values())))
            self._progress(self.seen / max(1, self.total), f"calibrating {self.seen}/{self.total} samples")
        return feed

    def rewind(self) -> None:  # part of ORT's reader interface; calibration reads once
        pass


def calibrate(model_path: Path, cache: Path, work: Path, data: StepData, calibration: Any, method: str, progress: Callable[[float, str], None]) -> int:
    """Ranges of every tensor a QDQ quantizer could use, saved to `cache`; returns the samples read."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry

    options: dict[str, Any] = {}
    if calibration.symmetric is not None:
        options["symmetric"] = calibration.symmetric
    if method == "entropy":
        options.update(num_bins=calibration.num_bins, num_quantized_bins=calibration.num_quantized_bins)
    elif method == "percentile":
        options.update(num_bins=calibration.num_bins, percentile=calibration.percentile)
    calibrator = create_calibrator(
        model_path, sorted(QDQRegistry), augmented_model_path=str(work / f"augmented-{method}.onnx"),
        calibrate_method=calibration_method(method), extra_options=options,
    )
    reader = Reader(data, calibration.max_samples, progress)
    calibrator.collect_data(reader)
    save_tensors_data(calibrator.compute_data(), cache)
    return reader.seen


def calibration_method(method: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[method]


def static(prepared: Path, out: Path, cache: Path, *, method: str, per_channel: bool, reduce_range: bool, ops: list[str], exclude: list[str], only: list[str] | None) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if not ops:
        raise CompressionFailed("every operator type is excluded: nothing to quantize", code="nothing_to_quantize")
    quantize_static(
        str(prepared), str(out), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=ops, per_channel=per_channel,
        reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
        nodes_to_quantize=only, calibrate_method=calibration_method(method), calibration_cache_path=str(cache), extra_options=FLOAT_DEFAULT,
    )
