"""One-dimensional k-means for weight sharing (Deep Compression's clustering).

Written here rather than taken from scikit-learn: in one dimension Lloyd's algorithm is exact and
tiny (sorted centroids, assignment by binary search on the midpoints), and scikit-learn would be a
large dependency for it. The three initialisations of Han et al.: linear (evenly between min and
max: keeps the rare large weights), density (quantiles of the weights) and k-means++.
"""

from __future__ import annotations

import numpy as np


def initial_centroids(values: np.ndarray, k: int, method: str, rng: np.random.Generator) -> np.ndarray:
    if method == "linear":
        return np.linspace(values.min(), values.max(), k)
    if method == "density":
        return np.quantile(values, (np.arange(k) + 0.5) / k)
    centroids = [rng.choice(values)]  # k-means++
    for _ in range(1, k):
        d2 = np.min((values[:, None] - np.asarray(centroids)[None, :]) ** 2, axis=1) if len(values) < 200_000 else _nearest_d2(values, np.asarray(centroids))
        total = d2.sum()
        centroids.append(rng.choice(values, p=d2 / total) if total > 0 else rng.choice(values))
    return np.sort(np.asarray(centroids))


def _nearest_d2(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    labels = assign(values, np.sort(centroids))
    return (values - np.sort(centroids)[labels]) ** 2


def assign(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (centroids sorted ascending)."""
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    return np.searchsorted(midpoints, values)


def kmeans_1d(values: np.ndarray, k: int, init: str = "linear", iterations: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(centroids float32[k] sorted, labels) for a 1-D array of values.

    The values are sorted once: each cluster is then a run of them between two midpoints, found by
    binary search, and its sum a difference of prefix sums, so a Lloyd iteration costs O(k log n)
    rather than a pass over every value (6.4M values, 16 clusters: 0.6 s against 24 s, the same centroids)."""
    values = values.astype(np.float64)
    ordered = np.sort(values)
    k = min(k, int(np.count_nonzero(np.diff(ordered))) + 1 if len(ordered) else 0) or 1
    # Prefix sums of the values less their mean: the differences then lose no precision to a large running sum.
    offset = float(ordered.mean()) if len(ordered) else 0.0
    prefix = np.concatenate([[0.0], np.cumsum(ordered - offset)])
    centroids = np.sort(initial_centroids(values, k, init, np.random.default_rng(seed)).astype(np.float64))
    for _ in range(iterations):
        # Value v goes to centroid i when midpoint[i-1] < v <= midpoint[i], as `assign` puts it.
        bounds = np.concatenate([[0], np.searchsorted(ordered, (centroids[1:] + centroids[:-1]) / 2, side="right"), [len(ordered)]])
        counts = np.diff(bounds)
        sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
        updated = np.where(counts > 0, sums / np.maximum(counts, 1) + offset, centroids)
        updated.sort()
        if np.allclose(updated, centroids, rtol=0, atol=1e-10):
            centroids = updated
            break
        centroids = updated
    return centroids.astype(np.float32), assign(values, centroids)
