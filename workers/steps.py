"""The one interface every compression method implements, in a module that imports no method (so
the data readers, measurements and training code that methods use can import it freely).

A method is a function of (model, spec, data, context) -> StepResult. It never touches Celery, HTTP
or the database: progress and cancellation reach it only through `StepContext`, so methods are
tested directly on in-memory models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from workers.fixed_batch import chunks

Feed = dict[str, np.ndarray]


@dataclass
class StepData:
    """The job's dataset as model feeds (input name -> batch), plus labels when it has them."""

    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    labels: np.ndarray | None = None
    # Set when the model's batch axis is a fixed number (often 1): every feed must use that batch.
    fixed_batch: int | None = None
    # Held-out data for methods that check accuracy while they work (None: evaluate on this data).
    evaluation: "StepData | None" = None
    # How the data was made, when it is not the user's (synthetic inputs).
    description: str | None = None
    # Inputs to measure on when the job has no data (synthetic, described in its `description`):
    # never trained or calibrated on, only used to compare a method's variants with the original.
    probe: "StepData | None" = None

    def batch_size(self, preferred: int) -> int:
        return self.fixed_batch or preferred

    @property
    def available(self) -> bool:
        return bool(self.inputs)

    @property
    def samples(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[Feed]:
        """Feeds of `batch_size` rows; with a fixed batch, exactly that many (the last one filled up
        from the start): for calibration and statistics, where a repeated row does no harm."""
        for feed, _ in self.counted_batches(batch_size, limit):
            yield feed

    def counted_batches(self, batch_size: int, limit: int | None = None) -> Iterator[tuple[Feed, int]]:
        """Feeds and how many of their rows are real samples (the rest fill a fixed batch)."""
        n = self.samples if limit is None else min(limit, self.samples)
        batch = self.fixed_batch or batch_size
        for idx, real in chunks(n, batch, self.fixed_batch is not None):
            yield {name: arr[idx] for name, arr in self.inputs.items()}, real

    def outputs(self, run: Callable[[Feed], np.ndarray], batch_size: int, limit: int | None = None) -> np.ndarray:
        """`run`'s output for every sample, batch by batch, filler rows dropped."""
        outs = [run(feed)[:real] for feed, real in self.counted_batches(batch_size, limit)]
        return np.concatenate(outs, axis=0)


@dataclass
class StepContext:
    """What a method may use from the job around it."""

    work_dir: Path
    report_progress: Callable[..., None] = lambda fraction, message, milestone=False: None
    seed: int = 0
    # Loads another of the tenant's uploaded models by id (e.g. a distillation student).
    load_model: Callable[[str], onnx.ModelProto] | None = None
    # ONNX Runtime intra-op threads when a method times its variants (the job's measure.threads).
    threads: int = 1

    def progress(self, fraction: float, message: str, milestone: bool = False) -> None:
        """Report progress within this step (0..1); a milestone (an epoch or round finished) is
        always recorded, other updates may be thinned. Raises JobCancelled if the user cancelled."""
        self.report_progress(max(0.0, min(1.0, fraction)), message, milestone)


@dataclass
class StepResult:
    model: onnx.ModelProto
    report: dict[str, Any]
    # A storage bundle that decodes to exactly `model` (the huffman step); shipped as model.msz.
    bundle: bytes | None = None
