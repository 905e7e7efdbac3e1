"""The job's datasets as model feeds: loaded without pickle, mapped to input names, cast to input dtypes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from service.core.datasets import LABELS, check_against_model
from workers.steps import StepData


def fixed_batch(model_inputs: list[dict[str, Any]]) -> int | None:
    dims = {i["shape"][0] for i in model_inputs if i["shape"]}
    return next((d for d in dims if isinstance(d, int) and d > 0), None)


def load_step_data(path: Path, arrays_meta: dict[str, Any], model_inputs: list[dict[str, Any]], what: str) -> StepData:
    mapping = check_against_model(arrays_meta, model_inputs, what)
    dtypes = {i["name"]: np.dtype(i["dtype"]) for i in model_inputs}
    with np.load(path, allow_pickle=False) as npz:
        inputs = {name: np.ascontiguousarray(npz[array].astype(dtypes[name], copy=False)) for name, array in mapping.items()}
        labels = npz[LABELS].astype(np.int64) if LABELS in npz.files else None
    return StepData(inputs=inputs, labels=labels, fixed_batch=fixed_batch(model_inputs))


# Dynamic sequence axes of token models are measured at this length: a 1-token "sentence" makes
# attention nearly free and every quantization look faithful.
SYNTHETIC_SEQUENCE = 128


def token_vocabularies(model: Any) -> dict[str, int]:
    """Integer inputs that index an embedding table (Gather on an initializer, perhaps through a
    Cast): input name -> rows of that table, so synthetic ids stay inside the vocabulary."""
    tables = {t.name: (list(t.dims) or [0])[0] for t in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input}
    produced_by = {o: n for n in model.graph.node for o in n.output}
    vocab: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type != "Gather" or node.input[0] not in tables:
            continue
        source = node.input[1]
        while source in produced_by and produced_by[source].op_type in ("Cast", "Identity", "Unsqueeze", "Reshape"):
            source = produced_by[source].input[0]
        if source in graph_inputs:
            vocab[source] = max(vocab.get(source, 0), int(tables[node.input[0]]))
    return vocab


def synthetic_data(model_inputs: list[dict[str, Any]], samples: int, seed: int, vocab: dict[str, int] | None = None) -> tuple[StepData, str]:
    """Random feeds for a job without a dataset, so latency and fidelity are still measured; and a
    sentence saying how they were drawn (the report carries it)."""
    rng = np.random.default_rng(seed)
    vocab = vocab or {}
    inputs, notes = {}, []
    for inp in model_inputs:
        name, dtype = inp["name"], np.dtype(inp["dtype"])
        dims = inp["shape"][1:]
        token_like = dtype.kind in "iu" and len(dims) == 1
        shape = [samples] + [d if isinstance(d, int) and d > 0 else (SYNTHETIC_SEQUENCE if token_like else 1) for d in dims]
        if dtype.kind == "f":
            inputs[name] = rng.standard_normal(shape).astype(dtype)
            notes.append(f"{name}: standard normal {shape[1:]}")
        elif dtype.kind == "b" or "mask" in name.lower():
            inputs[name] = np.ones(shape, dtype)
            notes.append(f"{name}: all ones (no padding) {shape[1:]}")
        elif name in vocab:
            inputs[name] = rng.integers(0, vocab[name], shape).astype(dtype)
            notes.append(f"{name}: token ids uniform in [0, {vocab[name]}) at length {shape[1:]}")
        elif "position" in name.lower() and token_like:
            inputs[name] = np.broadcast_to(np.arange(shape[1]), shape).astype(dtype)
            notes.append(f"{name}: 0..{shape[1] - 1}")
        else:  # segment ids / other indices: zero is valid for any table
            inputs[name] = np.zeros(shape, dtype)
            notes.append(f"{name}: zeros {shape[1:]}")
    description = "no dataset: synthetic inputs (" + "; ".join(notes) + "); results on your own data may differ"
    return StepData(inputs=inputs, labels=None, fixed_batch=fixed_batch(model_inputs)), description


def graph_inputs(model: Any) -> list[dict[str, Any]]:
    """The model's feed inputs (initializers excluded) as the probe describes them."""
    from service.core.onnx_probe import value_info

    constants = {t.name for t in model.graph.initializer}
    return [value_info(i) for i in model.graph.input if i.name not in constants]
