"""Which layers cost the quality: each changed weight put back into the original model alone, and the
drop in output fidelity that causes, ranked.

Used when a result is worse than the thresholds in workers.verdict, so the warning can name the
layers most responsible. It needs the compressed model to keep the original's layers (pruning,
clustering, binary weights, deep compression do); when the graph itself changed (structured pruning,
distillation, quantization nodes), attribution is reported as unavailable rather than guessed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from workers.constant_folding import fold
from workers.memory import release_freed_memory
from workers.onnx_weights import layer_name, weight_aliases
from workers.evaluation import ReferenceRun, compare
from workers.steps import StepData
from workers.output_kind import model_output_kind

MAX_LAYERS = 40  # the largest changed tensors; each costs one session and one pass over the samples
MAX_SAMPLES = 64
MIN_ELEMENTS = 256


def _session(model_bytes: bytes, threads: int, override: tuple[str, np.ndarray] | None = None):
    """A session of the serialized original, with one initializer replaced (ONNX Runtime's
    add_initializer): no copy of the model per probe (each was a model's worth of memory)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if override is not None:
        value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(override[1]))
        options.add_initializer(override[0], value)
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"]), value
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"]), None


def _layer_label(name: str, consumers: dict[str, str]) -> str:
    return consumers.get(name, name)


def _load(model: onnx.ModelProto | Path) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else onnx.load_model(str(model))


def _changed(base: onnx.ModelProto, compressed: onnx.ModelProto) -> list[tuple[str, np.ndarray]]:
    """The largest weights the compression changed (same name and shape), with their new values."""
    new_values = {t.name: t for t in compressed.graph.initializer}
    changed = []
    for tensor in base.graph.initializer:
        other = new_values.get(tensor.name)
        if other is None or list(other.dims) != list(tensor.dims) or tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        before = numpy_helper.to_array(tensor)
        if before.size >= MIN_ELEMENTS and not np.array_equal(before, numpy_helper.to_array(other)):
            changed.append((before.size, tensor.name))
    return [(name, numpy_helper.to_array(new_values[name])) for _, name in sorted(changed, reverse=True)[:MAX_LAYERS]]


def layer_sensitivity(original: onnx.ModelProto | Path, compressed: onnx.ModelProto | Path, data: StepData, threads: int = 1) -> list[dict[str, Any]] | None:
    """[{layer, cosine, drop}] most harmful first; None when the layers cannot be matched. Given
    paths, each model is loaded here and dropped as soon as what is needed of it is taken: a
    language model's 110 MB graph was held four times over (both models, both folded) beside the
    probe sessions, and the job peaked at 2.4 GB in this step."""
    source = _load(original)
    # Named as the step reports name layers (the torch module path a user knows), not val_405 or node_MatMul_112.
    aliases = weight_aliases(source)
    base = fold(source)
    del source, original
    changed = _changed(base, fold(_load(compressed)))
    del compressed
    release_freed_memory()  # the unfolded and the compressed graphs: only the changed weights are kept
    if not changed:
        return None
    consumers = {i: layer_name(i, n, aliases) for n in base.graph.node for i in n.input}
    dtypes = {t.name: onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for t in base.graph.initializer}
    base_bytes = base.SerializeToString()
    reference = ReferenceRun(_session(base_bytes, threads)[0], data, MAX_SAMPLES, batch=16)
    kind = model_output_kind(base, reference.first_output, data.labels is not None)
    del base
    release_freed_memory()  # the graph: the sessions are made from its bytes
    rows = []
    for name, new_value in changed:
        # In the original's own type: an fp16 model's weight put into the float32 graph is its
        # float16 values widened, which is exactly the change being measured.
        session, _keep = _session(base_bytes, threads, (name, new_value.astype(dtypes[name])))  # the OrtValue must outlive the session
        cosine = float(compare(reference, session, kind).fidelity()["cosine"])
        del session, _keep
        rows.append({"layer": _layer_label(name, consumers), "tensor": name, "cosine": cosine, "drop": 1.0 - cosine})
    release_freed_memory()  # the probes' sessions
    return sorted(rows, key=lambda r: r["drop"], reverse=True)
