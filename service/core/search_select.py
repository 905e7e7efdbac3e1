"""Judging a search's candidates: the constraint, the objective, the Pareto front, the best, what to promote.

Pure functions over the candidates' job metrics (no database), so the rules are tested directly.
Quality is accuracy when the evaluation data has labels, else fidelity (mean output cosine to the
original); the constraint is `max_accuracy_drop` (absolute) and/or `min_fidelity`. On a decoder LLM
quality is perplexity on the evaluation text, judged by `max_perplexity_increase` (relative), and
speed is decode tokens/s at batch 1 (the job's `speedup`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, Field

from service.core.job_metrics import JobMetrics


class CandidatePoint(BaseModel):
    """A finished candidate as searches answer it and their report page draws it (Point.public)."""

    job_id: str
    recipe: str
    rung: int
    size_bytes: int
    compression_ratio: float
    speedup: float = Field(description="Geometric mean of the speedups at the measured batch sizes.")
    latency_ms: float | None = Field(description="p50 at the first measured batch size.")
    accuracy: float | None
    accuracy_drop: float | None
    fidelity: float | None = Field(description="Mean output cosine to the original.")
    perplexity_increase: float | None = Field(None, description="LLM checkpoints: perplexity on the evaluation text / the original's - 1.")
    meets_constraint: bool
    violation: float = Field(description="0 when the constraint holds; else how far off, in the constraint's units.")

    def quality(self, name: str) -> float | None:
        """The quality a search judges by: accuracy (labelled evaluation data), fidelity, or on an LLM
        the perplexity ratio (the original's / the candidate's: 1 is the original, higher is better)."""
        if name == "perplexity":
            return None if self.perplexity_increase is None else perplexity_ratio(self.perplexity_increase)
        return self.accuracy if name == "accuracy" else self.fidelity


def perplexity_ratio(increase: float) -> float:
    """The original's perplexity / the candidate's: a quality where higher is better, as accuracy and fidelity are."""
    return 1.0 / (1.0 + increase)


@dataclass(frozen=True)
class Point:
    """One finished candidate, reduced to what the search compares."""

    job_id: str
    recipe: str
    rung: int
    size_bytes: int
    ratio: float  # original size / candidate size
    speedup: float  # geometric mean over the measured batch sizes
    latency_ms: float | None  # p50 at the first batch size
    accuracy: float | None
    accuracy_drop: float | None
    fidelity: float | None
    violation: float  # 0 when the constraint holds; else how far off, in the constraint's own units
    perplexity_increase: float | None = None  # LLM checkpoints

    @property
    def feasible(self) -> bool:
        return self.violation <= 0.0

    def objective(self, objective: str) -> float:
        """Larger is better."""
        return self.ratio if objective == "size" else self.speedup

    def quality(self) -> float:
        if self.perplexity_increase is not None:
            return perplexity_ratio(self.perplexity_increase)
        return self.accuracy if self.accuracy is not None else (self.fidelity if self.fidelity is not None else -math.inf)

    def public(self) -> CandidatePoint:
        return CandidatePoint(job_id=self.job_id, recipe=self.recipe, rung=self.rung, size_bytes=self.size_bytes,
                              compression_ratio=round(self.ratio, 4), speedup=round(self.speedup, 4), latency_ms=self.latency_ms,
                              accuracy=self.accuracy, accuracy_drop=self.accuracy_drop, fidelity=self.fidelity,
                              perplexity_increase=None if self.perplexity_increase is None else round(self.perplexity_increase, 6),
                              meets_constraint=self.feasible, violation=round(self.violation, 6))


def _speedup(metrics: JobMetrics) -> float:
    before = {row.batch: row.p50 for row in metrics.original.latency_by_batch}
    after = {row.batch: row.p50 for row in metrics.compressed.latency_by_batch}
    ratios = [before[b] / after[b] for b in before if b in after and after[b] > 0]
    if not ratios:
        return float(metrics.speedup or 1.0)
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def point(job_id: str, recipe: str, rung: int, metrics: JobMetrics, constraint: dict[str, float | None]) -> Point:
    original, compressed = metrics.original, metrics.compressed
    accuracy = compressed.accuracy
    drop = original.accuracy - accuracy if accuracy is not None and original.accuracy is not None else None
    fidelity = compressed.fidelity.cosine if compressed.fidelity is not None else None
    increase = compressed.llm.perplexity_increase if compressed.llm is not None else None
    violation = 0.0
    max_drop, min_fidelity = constraint.get("max_accuracy_drop"), constraint.get("min_fidelity")
    max_increase = constraint.get("max_perplexity_increase")
    if max_increase is not None:
        violation = max(violation, (increase - max_increase) if increase is not None else math.inf)
    if max_drop is not None:
        violation = max(violation, (drop - max_drop) if drop is not None else math.inf)
    if min_fidelity is not None:
        violation = max(violation, (min_fidelity - fidelity) if fidelity is not None else math.inf)
    latency = compressed.latency_by_batch[0].p50 if compressed.latency_by_batch else None
    return Point(
        job_id, recipe, rung, int(compressed.size_bytes), float(metrics.compression_ratio), _speedup(metrics),
        latency, accuracy, drop, fidelity, violation, increase,
    )


def pareto(points: list[Point]) -> list[Point]:
    """Candidates no other candidate beats on size, speed and quality at once (ordered by size)."""

    def dominates(a: Point, b: Point) -> bool:
        no_worse = a.size_bytes <= b.size_bytes and a.speedup >= b.speedup and a.quality() >= b.quality()
        better = a.size_bytes < b.size_bytes or a.speedup > b.speedup or a.quality() > b.quality()
        return no_worse and better

    front = [p for p in points if not any(dominates(q, p) for q in points if q is not p)]
    return sorted(front, key=lambda p: (p.size_bytes, p.job_id))


# Objectives this close to the best are ties: speedups within 5% are timing noise (the report's
# "slower" rule), sizes within 1% are the same model give or take a scale tensor. Among ties the
# other axis decides, then quality: a search's best is never beaten on both size and speed by another
# candidate of the same run (seen: 2.44x smaller and 1.32x faster kept over 3.01x and 1.41x).
OBJECTIVE_NOISE = {"latency": 1.05, "size": 1.01}


def best(points: list[Point], objective: str) -> Point | None:
    """The feasible candidate with the best objective, on the Pareto front of the feasible ones; within
    the objective's noise of the best, the better on the other axis, then quality, then job id."""
    feasible = pareto([p for p in points if p.feasible])
    if not feasible:
        return None
    top = max(p.objective(objective) for p in feasible)
    tied = [p for p in feasible if p.objective(objective) * OBJECTIVE_NOISE.get(objective, 1.0) >= top]
    other = "size" if objective == "latency" else "latency"
    return sorted(tied, key=lambda p: (-p.objective(other), -p.quality(), p.job_id))[0]


def closest(points: list[Point], count: int = 3) -> list[Point]:
    """When nothing is feasible: the candidates that came nearest to the constraint."""
    return sorted(points, key=lambda p: (p.violation, p.job_id))[:count]


def promote(points: list[Point], trainable: set[str], objective: str, room: int) -> list[Point]:
    """Successive halving with early rejection: of the first rung's trainable candidates, those that
    miss the constraint but would beat the best feasible candidate's objective if more fine-tuning
    brought them within it, nearest to the constraint first, at most `room` (half the rung)."""
    incumbent = best(points, objective)
    bar = incumbent.objective(objective) if incumbent is not None else -math.inf
    hopeful = [p for p in points if p.rung == 0 and p.recipe in trainable and not p.feasible and p.objective(objective) > bar and math.isfinite(p.violation)]
    return sorted(hopeful, key=lambda p: (p.violation, -p.objective(objective), p.job_id))[:room]

