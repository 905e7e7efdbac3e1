"""A candidate measured against the original on the same held-out inputs: fidelity (cosine of the
outputs, top-1 agreement, accuracy with labels) and speed (the original and the candidate timed
interleaved, run by run, at each batch size), so candidates compare on one footing."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from service.core.specs import MeasureSpec, QualityTarget
from workers import metrics as m
from workers.evaluation import ReferenceRun, compare
from workers.steps import StepData
from workers.output_kind import model_output_kind
from workers.quantization.candidates import Candidate

MAX_SAMPLES = 128
# A candidate must be this much smaller than the original to count: quantize is asked for to shrink
# the model, and one that leaves most weights in float (say, dynamic int8 of a CNN's last layer only) does not.
MIN_COMPRESSION = 1.05
TIMING = MeasureSpec(warmup=2, runs=10, batch_sizes=[1, 32], threads=1)


@dataclass
class Measured:
    candidate: Candidate
    path: Path | None = None
    size_bytes: int = 0
    compression: float = 0.0  # original size / candidate size
    samples: int = 0  # held-out samples the fidelity and accuracy were measured on
    cosine: float | None = None
    top1_agreement: float | None = None
    accuracy: float | None = None
    accuracy_drop: float | None = None
    latency_ratio: dict[int, float] = field(default_factory=dict)  # batch -> candidate p50 / original p50
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def slowdown(self) -> float:
        """Geometric mean over batch sizes of candidate time / original time (below 1: faster)."""
        ratios = list(self.latency_ratio.values())
        return math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else math.inf

    def meets(self, target: QualityTarget) -> bool:
        if self.error is not None or self.compression < MIN_COMPRESSION:
            return False
        if self.accuracy_drop is not None:
            # An accuracy measured on n samples moves in steps of 1/n: a budget finer than one sample
            # cannot be resolved, so one sample's worth is the least a candidate is allowed.
            return self.accuracy_drop <= max(target.max_accuracy_drop, 1.0 / max(1, self.samples)) + 1e-9
        return self.cosine is not None and self.cosine >= target.min_cosine

    def faithfulness(self) -> float:
        """Higher is more faithful: accuracy (with labels) or cosine."""
        if self.error is not None:
            return -math.inf
        return -(self.accuracy_drop or 0.0) if self.accuracy_drop is not None else (self.cosine if self.cosine is not None else -math.inf)

    def row(self, target: QualityTarget) -> dict[str, Any]:
        return {
            "candidate": self.candidate.name,
            "settings": self.candidate.settings(),
            "status": "failed" if self.error else "measured",
            "error": self.error,
            "compression_ratio": round(self.compression, 3) if self.size_bytes else None,
            "meets_target": self.meets(target),
            "cosine": None if self.cosine is None else round(self.cosine, 5),
            "top1_agreement": None if self.top1_agreement is None else round(self.top1_agreement, 4),
            "accuracy": self.accuracy,
            "accuracy_drop": None if self.accuracy_drop is None else round(self.accuracy_drop, 4),
            "speedup_by_batch": {str(b): round(1 / r, 3) for b, r in self.latency_ratio.items()},
        }


class Reference:
    """The original's outputs and session on the measurement data, computed once per job."""

    def __init__(self, original: Path, data: StepData, threads: int) -> None:
        self.data = data
        self.threads = threads
        self.session = m.make_session(original, threads)
        self.reference = ReferenceRun(self.session, data, MAX_SAMPLES)
        self.kind = model_output_kind(onnx.load_model(str(original), load_external_data=False), self.reference.first_output, data.labels is not None)
        self.positions: str | None = None  # how token outputs are compared, once measured
        # With labels (a classifier), the original's accuracy; candidates are held to its drop.
        self.accuracy = compare(self.reference, self.session, self.kind).reference_accuracy() if data.labels is not None else None
        self.size_bytes = original.stat().st_size
        self._sessions: dict[Path, Any] = {}
        self._duels: dict[tuple[Path, Path, int], float] = {}

    def fidelity(self, measured: Measured, session: Any) -> None:
        comparison = compare(self.reference, session, self.kind)
        if comparison.non_finite_samples:
            measured.error = "non-finite outputs where the original's are finite"
            return
        self.positions = comparison.positions_note()
        measured.samples = comparison.samples
        scores = comparison.fidelity()
        measured.cosine, measured.top1_agreement = scores["cosine"], scores["top1_agreement"]
        measured.accuracy = comparison.accuracy()
        reference_accuracy = comparison.reference_accuracy()
        if measured.accuracy is not None and reference_accuracy is not None:
            measured.accuracy_drop = reference_accuracy - measured.accuracy

    def measure(self, measured: Measured, keep_session: bool = False) -> Measured:
        """Size and fidelity (a candidate ONNX Runtime cannot load or run is marked failed)."""
        assert measured.path is not None
        measured.size_bytes = measured.path.stat().st_size
        measured.compression = self.size_bytes / measured.size_bytes
        try:
            session = m.make_session(measured.path, self.threads)
            self.fidelity(measured, session)
            if keep_session:  # for `time`, which takes it (or `release`)
                self._sessions[measured.path] = session
        except Exception as exc:  # noqa: BLE001 - a candidate ONNX Runtime cannot load or run is a failed candidate, not a failed job
            measured.error = f"ONNX Runtime could not run it: {(str(exc).splitlines() or [type(exc).__name__])[0][:200]}"
        return measured

    def release(self, measured: Measured) -> None:
        if measured.path is not None:
            self._sessions.pop(measured.path, None)

    def time(self, measured: Measured, progress: Callable[[float, str], None]) -> Measured:
        """p50 latency relative to the original's, the two timed interleaved at each batch size."""
        assert measured.path is not None
        session = self._sessions.pop(measured.path, None) or m.make_session(measured.path, self.threads)
        batches = [self.data.fixed_batch] if self.data.fixed_batch else TIMING.batch_sizes
        spec = TIMING.model_copy(update={"threads": self.threads, "batch_sizes": batches})
        original, candidate = m.latency([self.session, session], self.data, spec, progress)
        measured.latency_ratio = {o["batch"]: c["p50"] / o["p50"] for o, c in zip(original, candidate)}
        return measured

    def head_to_head(self, first: Measured, second: Measured, timing: int = 0) -> float:
        """first's time / second's (geometric mean over batch sizes), the two timed against each other
        run by run for three times as long as a candidate against the original. Two ratios to the
        original each carry their own noise; a direct comparison carries one (see selection). Each
        `timing` number is timed once and kept: selection asks for more when one is too close to call."""
        assert first.path is not None and second.path is not None
        key = (first.path, second.path, timing)
        if key not in self._duels:
            batches = [self.data.fixed_batch] if self.data.fixed_batch else TIMING.batch_sizes
            spec = TIMING.model_copy(update={"threads": self.threads, "batch_sizes": batches})
            sessions = [m.make_session(first.path, self.threads), m.make_session(second.path, self.threads)]
            a, b = m.latency(sessions, self.data, spec, lambda f, msg: None, min_timed_ms=3 * m.MIN_TIMED_MS)
            ratios = [x["p50"] / y["p50"] for x, y in zip(a, b)]
            self._duels[key] = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        return self._duels[key]
