"""How many bits each clustered layer gets, measured: each layer alone is clustered at `bits` - 1,
`bits` and `bits` + 1 on the unchanged model and the distillation loss to the original's outputs is
taken on a few calibration samples; then each layer's bits are chosen so that the summed losses are
least while the clustered weights take no more room than `bits` everywhere would. On all-MiniLM-L6-v2
the token embedding table (half the weights, read one row per token) loses little at 3 bits, which
pays for 5 bits in the linear layers, whose 4-bit resolution is what costs (docs/benchmarks.md).

The choice is a multiple-choice knapsack (HAWQ-V3 solves the same one with integer programming),
solved exactly by dynamic programming over the budget: a Lagrangian price alone (as the sparsity
allocation uses) jumps past the budget on few, unequal layers and left a small MLP worse than
uniform bits. Written here because those libraries allocate over uniform integer
grids of a transformer's own blocks; this works on codebooks over whatever layers the graph has."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable

import numpy as np

from workers.clustering.storage import table_bytes, unpacking_bytes

FLOOR = 1e-12  # a loss too small to measure
SPREAD = 1  # the bits measured: bits - SPREAD .. bits + SPREAD
LOWEST, HIGHEST = 2, 8
RESOLUTION = 4000  # steps the budget's room is divided into


def measured_bits(bits: int) -> tuple[int, ...]:
    return tuple(b for b in range(bits - SPREAD, bits + SPREAD + 1) if LOWEST <= b <= HIGHEST)


def stored_bits(count: int, groups: int, bits: float) -> float:
    """What a layer's clusters take: an index of `bits` bits a weight, a float32 codebook of 2**bits
    per group, and the graph nodes that unpack each plane of the indices (storage.planes: 5 bits are
    two planes; on a small model those nodes are a visible share of the file). A fractional `bits` is
    a budget: the same formula, as an average, with the cheaper nodes of the whole bits either side."""
    return count * bits + 32 * groups * 2**bits + 8 * min(unpacking_bytes(count, b) for b in _whole(bits))


def shared_bits(bits: Iterable[int]) -> float:
    """What clusters of these bits take once per model whatever the layers: the byte tables that
    unpack their planes (about 350 bytes a plane width; 3 and 5 bits each add widths 4 bits has not)."""
    return 8 * table_bytes(bits)


def _whole(bits: float) -> set[int]:
    return {math.floor(bits), math.ceil(bits)}


def measure(layers: dict[str, tuple[Callable[[int], None], Callable[[], None]]], bits: int, loss: Callable[[], float],
            progress: Callable[[int, int, str], None]) -> dict[str, dict[int, float]]:
    """Per layer, the loss with that layer alone clustered at each of `measured_bits(bits)`.
    `layers` maps a name to (cluster it at b bits in place, restore it)."""
    curves = {}
    for index, (name, (cluster_at, restore)) in enumerate(layers.items()):
        progress(index, len(layers), name)
        curve = {}
        for b in measured_bits(bits):
            cluster_at(b)
            curve[b] = max(FLOOR, loss())
        restore()
        # More bits never cost more: a measurement's noise must not say they do.
        for b in sorted(curve)[::-1][1:]:
            curve[b] = max(curve[b], curve[b + 1])
        curves[name] = curve
    return curves


def allocate(curves: dict[str, dict[int, float]], costs: dict[str, Callable[[float], float]], budget_bits: float,
             shared: Callable[[Iterable[int]], float] = lambda bits: 0.0) -> dict[str, int]:
    """Each layer's bits from its measured curve, minimising the summed losses with the layers' stored
    size (`costs[name](b)`, plus `shared(the bits used)`, what the model pays once for them) no more
    than `budget_bits` a weight everywhere would take. Every set of bits the layers may use is tried
    (its shared cost known), each by dynamic programming over the room (_knapsack). With a whole
    `budget_bits` every layer can take, that uniform choice stands when nothing is better; with no
    room, each layer's cheapest."""
    names = list(curves)
    budget = sum(costs[n](budget_bits) for n in names) + min(shared({b}) for b in _whole(budget_bits))
    options = sorted(set().union(*map(set, curves.values())))
    best: tuple[float, dict[str, int]] | None = None
    for size in range(1, len(options) + 1):
        for allowed in itertools.combinations(options, size):
            within = {n: {b: v for b, v in curves[n].items() if b in allowed} for n in names}
            if not all(within.values()):
                continue
            choice = _knapsack(within, costs, budget - shared(allowed))
            loss = predicted_loss(curves, choice) if choice is not None else math.inf
            if choice is not None and (best is None or loss < best[0]):
                best = loss, choice
    if best is None:
        return {n: min(curves[n], key=lambda b, n=n: (costs[n](b), b)) for n in names}
    if float(budget_bits).is_integer() and all(int(budget_bits) in curves[n] for n in names):
        uniform = dict.fromkeys(names, int(budget_bits))
        if predicted_loss(curves, uniform) <= best[0]:
            return uniform
    return best[1]


def _knapsack(curves: dict[str, dict[int, float]], costs: dict[str, Callable[[float], float]], budget: float) -> dict[str, int] | None:
    """The least summed loss with the summed costs within `budget` (None when even each layer's
    cheapest option is over it): dynamic programming over the room above every layer's cheapest
    option, in RESOLUTION steps, each option's cost rounded up (so the budget holds)."""
    names = list(curves)
    # Each layer's cheapest option (with the planes' nodes counted, 4 bits can cost less than 3 on a small layer).
    cheapest = {n: min(curves[n], key=lambda b, n=n: (costs[n](b), b)) for n in names}
    room = budget - sum(costs[n](cheapest[n]) for n in names)
    if room < 0:
        return None
    if room == 0:
        return cheapest
    unit = room / RESOLUTION
    best = np.zeros(RESOLUTION + 1)  # best[u]: the least summed loss of the layers so far within u units of room
    picks = []
    for n in names:
        options = sorted(curves[n])
        weights = [int(np.ceil((costs[n](b) - costs[n](cheapest[n])) / unit - 1e-9)) for b in options]
        candidates = np.full((len(options), RESOLUTION + 1), np.inf)
        for i, (b, w) in enumerate(zip(options, weights)):
            if w <= RESOLUTION:
                candidates[i, w:] = best[:RESOLUTION + 1 - w] + curves[n][b]
        picks.append((options, weights, np.argmin(candidates, axis=0)))
        best = candidates.min(axis=0)
    choice, u = {}, RESOLUTION
    for n, (options, weights, pick) in zip(names[::-1], picks[::-1]):
        choice[n] = options[pick[u]]
        u -= weights[pick[u]]
    return choice


def predicted_loss(curves: dict[str, dict[int, float]], choice: dict[str, int]) -> float:
    """The summed per-layer losses measured at `choice` (for the report: allocated against uniform)."""
    return float(np.sum([curves[n][b] for n, b in choice.items()]))
