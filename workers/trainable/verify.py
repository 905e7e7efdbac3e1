"""Before any training: the converted module must compute what ONNX Runtime computes on the job's data.

A converter bug on some exporter's idiom would otherwise train a different function and report the
result as the user's model compressed. On disagreement the job fails with `conversion_mismatch`,
naming the first node (in graph order) whose output differs, found by running ONNX Runtime with every
intermediate value exposed and comparing it with the module's own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch

from service.core.errors import CompressionFailed
from workers.constant_folding import fold
from workers.fixed_batch import exactly
from workers.trainable.from_onnx import OnnxGraphModule, to_torch

SAMPLES = 8
RTOL, ATOL = 1e-3, 1e-4


class ConversionMismatch(CompressionFailed):
    code = "conversion_mismatch"


def _differs(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return True
    if a.dtype.kind in "biu" or a.dtype == bool:
        return not np.array_equal(a, b)
    scale = max(float(np.abs(b).max()) if b.size else 0.0, 1.0)
    return not np.allclose(a, b, rtol=RTOL, atol=ATOL * scale, equal_nan=True)


def _session(model: onnx.ModelProto, extra_outputs: list[str] | None = None):
    import onnxruntime as ort

    if extra_outputs:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        existing = {o.name for o in model.graph.output}
        for name in extra_outputs:
            if name not in existing:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node's own output
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def check_conversion(model: onnx.ModelProto, module: OnnxGraphModule, feeds: dict[str, np.ndarray]) -> None:
    """Raise ConversionMismatch when the module and ONNX Runtime disagree on `feeds` (a few samples)."""
    folded = fold(model)
    expected = _session(folded).run(None, feeds)
    with torch.no_grad():
        got = module(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in module.input_names])
    got = got if isinstance(got, tuple) else (got,)
    if not any(_differs(g.numpy(), e) for g, e in zip(got, expected)):
        return
    raise ConversionMismatch(_first_divergence(folded, module, feeds))


def _first_divergence(model: onnx.ModelProto, module: OnnxGraphModule, feeds: dict[str, np.ndarray]) -> str:
    names = [o for node in model.graph.node for o in node.output if o]
    session = _session(model, names)
    reference = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    captured: dict[str, Any] = {}
    with torch.no_grad():
        module(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in module.input_names], capture=captured)
    for node in model.graph.node:
        for output in node.output:
            mine, theirs = captured.get(output), reference.get(output)
            if isinstance(mine, torch.Tensor) and theirs is not None and _differs(mine.detach().numpy(), np.asarray(theirs)):
                return (f"the trainable form of the model disagrees with ONNX Runtime, first at node '{node.name or output}' "
                        f"({node.op_type}); training it would change what the model computes. Quantize still applies.")
    return "the trainable form of the model disagrees with ONNX Runtime on its outputs; training it would change what the model computes"


def sample_feeds(inputs: dict[str, np.ndarray], fixed_batch: int | None) -> dict[str, np.ndarray]:
    return {name: exactly(array, fixed_batch) if fixed_batch else array[:SAMPLES] for name, array in inputs.items()}


def trainable(model: onnx.ModelProto, data: Any) -> OnnxGraphModule:
    """Convert for training, checked against ONNX Runtime on the job's data when there is any."""
    module = to_torch(model)
    if data is not None and data.available:
        check_conversion(model, module, sample_feeds(data.inputs, data.fixed_batch))
    return module
