"""The job's datasets as model feeds: loaded without pickle, mapped to input names, cast to input dtypes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from service.core.datasets import LABELS, check_against_model
from workers.methods.base import StepData


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


def synthetic_data(model_inputs: list[dict[str, Any]], samples: int, seed: int) -> StepData:
    """Random feeds for a job without a dataset, so latency and fidelity are still measured."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for inp in model_inputs:
        shape = [samples] + [d if isinstance(d, int) and d > 0 else 1 for d in inp["shape"][1:]]
        dtype = np.dtype(inp["dtype"])
        if dtype.kind == "f":
            inputs[inp["name"]] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            inputs[inp["name"]] = rng.integers(0, 2, shape).astype(dtype)
        else:  # token ids / indices: small non-negative values are valid for any vocabulary
            inputs[inp["name"]] = rng.integers(0, 2, shape).astype(dtype)
    return StepData(inputs=inputs, labels=None, fixed_batch=fixed_batch(model_inputs))
