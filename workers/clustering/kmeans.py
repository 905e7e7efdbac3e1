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
    """(centroids float32[k] sorted, labels) for a 1-D array of values."""
    values = values.astype(np.float64)
    k = min(k, len(np.unique(values))) or 1
    centroids = np.sort(initial_centroids(values, k, init, np.random.default_rng(seed)).astype(np.float64))
    for _ in range(iterations):
        labels = assign(values, centroids)
        sums = np.bincount(labels, weights=values, minlength=k)
        counts = np.bincount(labels, minlength=k)
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        updated.sort()
        if np.allclose(updated, centroids, rtol=0, atol=1e-10):
            centroids = updated
            break
        centroids = updated
    return centroids.astype(np.float32), assign(values, centroids)
