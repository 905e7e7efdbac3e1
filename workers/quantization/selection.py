"""Choosing among measured candidates: the best by the objective among those meeting the target."""

from __future__ import annotations

from collections.abc import Callable

from service.core.specs import QualityTarget
from workers.quantization.measure import MIN_COMPRESSION, Measured


REPAIR_MARGIN = 0.9


def rank_key(measured: Measured, objective: str) -> tuple[float, float]:
    # Latency: the geometric mean slowdown over batch sizes, then size; size: bytes, then latency.
    if objective == "size":
        return (measured.size_bytes, measured.slowdown)
    return (measured.slowdown, measured.size_bytes)


# Latencies within 5% are timing noise (the same rule as the report's "slower" warning); sizes within
# 1% are one precision (int8 with and without fusion, per-channel or per-tensor).
LATENCY_NOISE = 1.05
SAME_SIZE = 1.01

# A larger model is kept for speed only when it is at least this much faster than every smaller one
# kept. Two identical jobs must keep one model, and a line at the noise (5%) sat inside it: a tiny
# BERT's int4 (9% larger) against fused int8 came out 1.025-1.056 faster in nine duels over three
# identical jobs on one machine, and on CI two identical jobs kept different models. At 10% a pair
# must be a real step faster; users come for smaller models, and a speed tie goes to the smaller.
SIZE_TRADE = 1.10


def _size_groups(measured: list[Measured]) -> list[list[Measured]]:
    """Candidates in groups of one size, smallest group first."""
    groups: list[list[Measured]] = []
    for candidate in sorted(measured, key=lambda c: c.size_bytes):
        if groups and candidate.size_bytes <= groups[-1][0].size_bytes * SAME_SIZE:
            groups[-1].append(candidate)
        else:
            groups.append([candidate])
    return groups


# Two candidates timed each against the original come out several percent apart by noise alone on a
# loaded two-core machine (CI saw an unfused int8 BERT 5% faster than the fused one; timed against each
# other they are 0-3.5% apart): a size trade whose gain looks within this factor is decided by timing
# the two against each other (a pair under the 10% line measured beyond 25% would be 14% off, over three
# times the noise seen).
DOUBT = 1.25

# first's time / second's, timed against each other; the int says which timing (0, 1, 2: fresh ones)
HeadToHead = Callable[[Measured, Measured, int], float]

# A duel whose gain lands this close to SIZE_TRADE is decided by the median of three (one duel's
# spread between identical jobs, about 3%, above).
BORDER = 0.03


def _clearly_faster(larger: Measured, smaller: Measured, head_to_head: HeadToHead | None) -> bool:
    gain = smaller.slowdown / larger.slowdown
    if head_to_head is not None and 1 / DOUBT < gain < DOUBT:
        gain = 1 / head_to_head(larger, smaller, 0)
        if abs(gain - SIZE_TRADE) < BORDER:
            gain = sorted([gain, 1 / head_to_head(larger, smaller, 1), 1 / head_to_head(larger, smaller, 2)])[1]
    return gain > SIZE_TRADE


def fastest_per_byte(eligible: list[Measured], head_to_head: HeadToHead | None = None) -> Measured:
    """The latency objective. From the smallest size up, a larger model is kept only when it is
    clearly faster (SIZE_TRADE, beyond the noise) than the last one kept, the fastest of every smaller size; the
    last kept is the fastest, and every byte it costs bought measurable speed. Within its size, among
    those as fast as its fastest, the most faithful: fidelity repeats across runs, timings do not.

    Each comparison is between two candidates of one run, and a close one is timed again head to head,
    so the noise threshold sits where a real difference is, not at the original's speed: classes
    against the original (faster, as fast, slower) let one unfused int8 model at 1.05x cross into
    "faster" alone and win over a fused model 16% smaller in one of four identical BERT jobs; a band
    around the fastest noisy figure let two identical jobs keep int4 in one run and int8 in the other;
    deciding by a few bytes let a repair that left most layers in float win for being 2% "faster"."""
    kept: list[tuple[list[Measured], Measured]] = []
    for group in _size_groups(eligible):
        # A group's speed is its fastest member's: the minimum of several timings of one precision.
        fastest = min(group, key=lambda c: c.slowdown)
        if not kept or _clearly_faster(fastest, kept[-1][1], head_to_head):
            kept.append((group, fastest))
    group, fastest = kept[-1]
    as_fast = [c for c in group if c.slowdown <= fastest.slowdown * LATENCY_NOISE]
    return max(as_fast, key=lambda c: (c.faithfulness(), -c.slowdown))


def best(measured: list[Measured], target: QualityTarget, objective: str, head_to_head: HeadToHead | None = None) -> Measured | None:
    """The best candidate by the objective among those meeting the target; `head_to_head` (the
    latency objective) re-times close size trades (see fastest_per_byte)."""
    eligible = [c for c in measured if c.meets(target)]
    if not eligible:
        return None
    if objective == "latency":
        return fastest_per_byte(eligible, head_to_head)
    return min(eligible, key=lambda c: rank_key(c, objective))


def closest(measured: list[Measured]) -> Measured | None:
    usable = [c for c in measured if c.error is None and c.path is not None]
    return max(usable, key=lambda c: c.faithfulness()) if usable else None


def promising_miss(measured: list[Measured], target: QualityTarget, objective: str, chosen: Measured | None) -> Measured | None:
    """The int8 candidate that missed the target but beats the chosen one on the objective: worth
    repairing by leaving its most sensitive layers in float."""
    misses = [c for c in measured if c.error is None and not c.meets(target) and c.compression >= MIN_COMPRESSION
              and c.candidate.family.startswith("int8") and c.latency_ratio]
    if chosen is not None:
        # Only a clear gain is worth the per-layer measurements (one build per layer): a miss 2% faster
        # than a candidate already meeting the target is timing noise.
        first = rank_key(chosen, objective)[0]
        misses = [c for c in misses if rank_key(c, objective)[0] < REPAIR_MARGIN * first]
    return min(misses, key=lambda c: rank_key(c, objective)) if misses else None


def table_text(rows: list[dict], limit: int = 14) -> str:
    """The candidate table in a few lines, for an error message a person reads."""
    lines = []
    for row in rows[:limit]:
        if row["status"] == "failed":
            lines.append(f"{row['candidate']}: failed ({row['error']})")
            continue
        quality = f"accuracy drop {row['accuracy_drop']:.4f}" if row["accuracy_drop"] is not None else f"cosine {row['cosine']:.4f}"
        speed = ", ".join(f"b{b} {s:.2f}x" for b, s in row["speedup_by_batch"].items())
        lines.append(f"{row['candidate']}: {quality}, {row['compression_ratio']:.2f}x smaller" + (f", speed {speed}" if speed else ""))
    return "; ".join(lines)
