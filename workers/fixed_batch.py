"""Feeding models whose batch axis is a fixed number.

torch's default export without `dynamic_shapes` fixes the batch (MiniLM: [2, 32]); its shape
constants then spell that batch out, so such a model (and its trainable form) accepts exactly that
many rows and nothing else. Every place that runs a model goes through these helpers: feeds are cut
into chunks of the fixed batch, the last one filled up with rows from the start of the data, and
the filler rows' outputs are dropped again, so every sample is used once and counted once.
Works on numpy arrays and torch tensors alike (both index with an integer array)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


def exactly(rows: Any, n: int) -> Any:
    """`rows` with exactly n rows: cut, or repeated from the start when there are fewer."""
    if len(rows) == n:
        return rows
    if len(rows) > n:
        return rows[:n]
    return rows[np.arange(n) % len(rows)]


def chunks(samples: int, batch: int, fixed: bool) -> Iterator[tuple[np.ndarray, int]]:
    """Row indices of each chunk and how many of them are real samples. With `fixed`, every chunk
    has exactly `batch` indices (the last wraps around to the first samples)."""
    for start in range(0, samples, batch):
        stop = min(start + batch, samples)
        idx = np.arange(start, stop)
        if fixed and len(idx) < batch:
            idx = np.concatenate([idx, np.arange(batch - len(idx)) % samples])
        yield idx, stop - start


def padded_order(order: Any, batch: int) -> Any:
    """A training order whose length is a multiple of the fixed batch: every sample still trains each
    epoch, the last batch filled with the order's first samples (instead of dropping up to batch - 1)."""
    remainder = len(order) % batch
    if remainder == 0:
        return order
    return exactly(order, len(order) + batch - remainder)


def fixed_batch_of(model: Any) -> int | None:
    """The batch an ONNX model's feed inputs spell out on their first axis, if they do."""
    constants = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name not in constants and dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
    return None
