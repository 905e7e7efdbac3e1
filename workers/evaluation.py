"""The original and a compressed model compared on the same data, batch by batch.

Scores are reduced on the fly (running sums for cosine, agreement, accuracy; a running maximum for
the largest difference), so a job's memory is bounded by one batch of outputs, not by the dataset
times the output size: a language model's logits for 256 sequences of 16 tokens over GPT-2's 50,257
words are 1.6 GB in float64, one batch of 32 is 200 MB.

Token outputs ([batch, positions, ...]) are compared only where the model's attention mask is set:
padded positions are not what the user uses (62% of MiniLM's positions on real sentences padded to
32 tokens), and counting them scored int8 per-channel 0.945 where the real tokens score 0.990.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.steps import Feed, StepData
from workers.output_kind import SCORED

EVAL_BATCH = 32
# Reference outputs up to this size are kept between candidates (quantize compares several); larger
# ones (a language model's logits) are computed again batch by batch.
CACHE_BYTES = 256 * 1024**2
# Batches are made smaller when one batch's output would exceed this (a float64 copy of each of the
# two models' outputs is compared): GPT-2's logits at 16 tokens are 3.2 MB a sample.
BATCH_OUTPUT_BYTES = 32 * 1024**2


def mask_input(data: StepData) -> str | None:
    """The feed input that marks real tokens (1) against padding (0): an integer or boolean
    [samples, positions] input named like an attention mask."""
    for name, array in data.inputs.items():
        if array.ndim == 2 and array.dtype.kind in "biu" and "mask" in name.lower():
            return name
    return None


def _positions(feed: Feed, mask_name: str | None, output: np.ndarray) -> np.ndarray | None:
    """[batch, positions] booleans of the positions to compare, when the output is per token."""
    if mask_name is None or output.ndim < 3:
        return None
    mask = feed[mask_name][: len(output)]
    if mask.shape != output.shape[:2]:
        return None
    return mask.astype(bool)


@dataclass
class ReferenceRun:
    """The original model's outputs on the evaluation data, batch by batch (kept when small)."""

    session: Any
    data: StepData
    limit: int
    batch: int = EVAL_BATCH
    _cache: list[np.ndarray] | None = None

    def __post_init__(self) -> None:
        self.mask_name = mask_input(self.data)
        self.samples = min(self.limit, self.data.samples)
        # A few rows first, to learn how large one sample's output is before running a whole batch.
        first = self.session.run(None, next(self.data.batches(min(self.batch, 4), limit=self.limit)))[0]
        per_sample = first.nbytes / max(1, len(first))
        if not self.data.fixed_batch:
            self.batch = int(max(1, min(self.batch, BATCH_OUTPUT_BYTES // max(1, per_sample))))
        if per_sample * self.samples <= CACHE_BYTES:
            self._cache = [self.session.run(None, feed)[0][:real] for feed, real in self.data.counted_batches(self.batch, self.limit)]
        self.first_output = first

    def batches(self) -> Iterator[tuple[Feed, int, int, np.ndarray]]:
        """(feed, first sample index, real rows, the original's output for the real rows)."""
        start = 0
        for i, (feed, real) in enumerate(self.data.counted_batches(self.batch, self.limit)):
            out = self._cache[i] if self._cache is not None else self.session.run(None, feed)[0][:real]
            yield feed, start, real, out
            start += real


@dataclass
class Comparison:
    """Fidelity and accuracy of a candidate against the reference, reduced batch by batch."""

    kind: str
    samples: int = 0
    cosine_sum: float = 0.0
    agree: int = 0
    compared_positions: int = 0
    all_positions: int = 0
    max_abs_diff: float = 0.0
    correct: int = 0
    reference_correct: int = 0
    labelled: int = 0
    agreement_total: int = 0
    non_finite_samples: int = 0
    masked: bool = False

    def add(self, reference: np.ndarray, candidate: np.ndarray, positions: np.ndarray | None, labels: np.ndarray | None) -> None:
        # Element-wise work in float32 (a batch of logits is large), sums accumulated in float64.
        ref = np.array(reference, dtype=np.float32).reshape(len(reference), *(reference.shape[1:2] if positions is not None else ()), -1)
        cand = np.array(candidate, dtype=np.float32).reshape(ref.shape)
        if positions is not None:
            self.masked = True
            keep = positions[..., None].astype(np.float32)
            ref *= keep
            cand *= keep
            self.compared_positions += int(positions.sum())
            self.all_positions += positions.size
        bad = ~np.isfinite(cand) & np.isfinite(ref)
        if bad.any():
            self.non_finite_samples += int(bad.reshape(len(bad), -1).any(axis=1).sum())
            cand[bad] = 0.0
        flat_ref, flat_cand = ref.reshape(len(ref), -1), cand.reshape(len(cand), -1)
        dot = np.add.reduce(flat_ref * flat_cand, axis=1, dtype=np.float64)
        denom = np.sqrt(np.add.reduce(flat_ref * flat_ref, axis=1, dtype=np.float64) * np.add.reduce(flat_cand * flat_cand, axis=1, dtype=np.float64))
        cos = np.where(denom > 0, dot / np.where(denom > 0, denom, 1), 1.0)
        self.cosine_sum += float(cos.sum())
        self.samples += len(ref)
        if flat_ref.size:
            flat_cand -= flat_ref
            self.max_abs_diff = max(self.max_abs_diff, float(np.nan_to_num(np.abs(flat_cand, out=flat_cand), nan=0.0).max()))
        if self.kind in SCORED:
            same = reference.argmax(-1) == candidate.argmax(-1)
            if positions is not None and same.shape == positions.shape:
                self.agree += int((same & positions).sum())
                self.agreement_total += int(positions.sum())
            else:
                self.agree += int(same.sum())
                self.agreement_total += same.size
        if labels is not None and self.kind == "classifier" and candidate.ndim == 2:
            self.correct += int((candidate.argmax(-1) == labels).sum())
            self.reference_correct += int((reference.argmax(-1) == labels).sum())
            self.labelled += len(labels)

    def fidelity(self) -> dict[str, float | None]:
        agreement = None
        if self.kind in SCORED and self.agreement_total:
            agreement = self.agree / self.agreement_total
        return {"top1_agreement": agreement, "max_abs_diff": self.max_abs_diff, "cosine": self.cosine_sum / max(1, self.samples)}

    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def reference_accuracy(self) -> float | None:
        return self.reference_correct / self.labelled if self.labelled else None

    def positions_note(self) -> str | None:
        """How token outputs were compared, for the report."""
        if not self.masked:
            return None
        padded = 1 - self.compared_positions / max(1, self.all_positions)
        return (f"per-token outputs compared at the {self.compared_positions} positions the attention mask marks as real tokens; "
                f"{padded:.0%} of positions are padding and left out")


def compare(reference: ReferenceRun, candidate_session: Any, kind: str) -> Comparison:
    """Run the candidate on the reference's batches and compare as it goes."""
    result = Comparison(kind=kind)
    labels = reference.data.labels
    for feed, start, real, ref_out in reference.batches():
        out = candidate_session.run(None, feed)[0][:real]
        positions = _positions(feed, reference.mask_name, ref_out)
        result.add(ref_out, out, positions, None if labels is None else labels[start:start + real])
    return result
