"""ONNX Runtime sessions that also output intermediate tensors: how every calibration pass reads the
inputs of a graph's layers (GPTQ's and SmoothQuant's statistics, an LLM's Hessians, feed-forward
units' importance). ONNX Runtime returns only graph outputs, so the tensors are added as outputs of a
copy of the graph."""

from __future__ import annotations

from collections.abc import Iterable

import onnx


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs `names` (those it outputs already are not added twice)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in dict.fromkeys(names) if name not in known)
    return probe


def session(model: onnx.ModelProto, threads: int):
    """A CPU session of an in-memory graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def probe_session(model: onnx.ModelProto, names: Iterable[str], threads: int):
    """A CPU session of `model` that also outputs `names`; the copy is dropped once loaded."""
    return session(with_outputs(model, names), threads)
