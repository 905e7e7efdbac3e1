"""Choosing among measured candidates: the best by the objective among those meeting the target."""

from __future__ import annotations

from service.core.specs import QualityTarget
from workers.quantization.measure import MIN_COMPRESSION, Measured


REPAIR_MARGIN = 0.9


def rank_key(measured: Measured, objective: str) -> tuple[float, float]:
    # Latency: the geometric mean slowdown over batch sizes, then size; size: bytes, then latency.
    if objective == "size":
        return (measured.size_bytes, measured.slowdown)
    return (measured.slowdown, measured.size_bytes)


# Latencies within 5% are timing noise (the same rule as the report's "slower" warning): among
# candidates that close to the fastest, the smallest wins. Without it a repair that left most layers in
# float could be kept over the fully quantized model for being 2% "faster" in one run (seen: 1.12x
# smaller instead of 2.9x on a loaded machine).
LATENCY_NOISE = 1.05


def best(measured: list[Measured], target: QualityTarget, objective: str) -> Measured | None:
    eligible = [c for c in measured if c.meets(target)]
    if not eligible:
        return None
    if objective == "latency":
        # The two were timed interleaved, so a ratio is robust to the machine's load drifting; what is
        # left is noise of a few percent (small models get more runs for it: workers.metrics).
        noise = LATENCY_NOISE
        # Speed in classes the measurement can tell apart: clearly faster than the original, as fast
        # (within the noise), clearly slower; the best class present, and in it the smallest.
        # A band around the fastest noisy figure let two identical jobs of a tiny BERT keep int4 in one
        # run and int8 in the other, all within a few percent of the original's speed.
        faster = [c for c in eligible if c.slowdown < 1 / noise]
        same = [c for c in eligible if 1 / noise <= c.slowdown <= noise]
        if faster or not same:  # clearly faster ones; or, all slower, the least slow within the noise
            pool = faster or eligible
            fastest = min(c.slowdown for c in pool)
            eligible = [c for c in pool if c.slowdown <= fastest * noise]
        else:
            eligible = same
        return min(eligible, key=lambda c: (c.size_bytes, c.slowdown))
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
