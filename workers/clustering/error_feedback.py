"""GPTQ-style assignment of a layer's weights to its codebooks (Frantar et al. 2023's error feedback,
as GPTVQ and SqueezeLLM use it for non-uniform codes): the input columns are visited in turn, each
weight snapped to the nearest centroid of its row's codebook, and the rounding error spread over the
columns not yet visited through the inverse of the layer's input Hessian, so the layer's output on
the calibration data moves as little as it can with those codebooks. k-means still chooses the
codebooks (workers/methods/cluster.py); which centroid each weight takes is chosen here, and then
each codebook's centroids are re-solved by least squares for the layer's output with those
assignments (GPTVQ's codebook update, van Baalen et al. 2024).

Written here because the libraries that do this (GPTQ's and GPTVQ's code, llm-compressor) work on
uniform integer grids or on a transformer's own blocks, not on per-row codebooks of an arbitrary
torch module."""

from __future__ import annotations

import torch

from workers.hessian import inverse_factor, output_error

BLOCK = 128  # columns per lazy update, as in GPTQ
ACT_ORDER = True


def nearest(values: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the centroid nearest each value: values [rows] or [rows, n] (a column
    at a time, so memory stays rows x k), codebooks [rows, k]."""
    if values.dim() == 1:
        return torch.argmin((values[:, None] - codebooks).abs(), dim=1)
    return torch.stack([nearest(values[:, j], codebooks) for j in range(values.shape[1])], dim=1)


@torch.no_grad()
def assign(weight: torch.Tensor, codebooks: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Each weight's centroid index within its row's codebook (`weight` [rows, columns], `codebooks`
    [rows, k]), chosen with error feedback; and the layer's relative output error on the calibration
    data with nearest-centroid assignment and with this one."""
    books = codebooks.double()
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    # GPTQ's act-order: the columns whose inputs carry the most energy are snapped first, while the
    # most columns are left to absorb their error (transformers' few loud features matter most).
    order = torch.argsort(torch.diag(h), descending=True) if ACT_ORDER else torch.arange(h.shape[0])
    w = weight.double()[:, order].clone()
    hinv = inverse_factor(h[order][:, order])
    labels = torch.empty(w.shape, dtype=torch.long)
    columns = w.shape[1]
    for i1 in range(0, columns, BLOCK):
        i2 = min(i1 + BLOCK, columns)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            index = nearest(col, books)
            labels[:, i1 + i] = index
            e = (col - books.gather(1, index[:, None]).squeeze(1)) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    labels[:, order] = labels.clone()
    original = weight.double()
    snapped = books.gather(1, nearest(original, books))
    return labels, {"output_error_nearest": round(output_error(snapped, original, h), 6),
                    "output_error": round(output_error(books.gather(1, labels), original, h), 6)}


@torch.no_grad()
def refit_codebooks(weight: torch.Tensor, labels: torch.Tensor, codebooks: torch.Tensor, group: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The centroids that, with each weight's assignment kept, make the layer's output on the
    calibration data closest to `weight`'s: per codebook g, argmin_c sum over its rows r of
    (w_r - c[l_r])^T H (w_r - c[l_r]), a k x k system (sum_r O_r^T H O_r) c = sum_r O_r^T H w_r with
    O_r the one-hot [columns, k] of row r's labels. `codebooks` [groups, k], `labels` [rows,
    columns] local to the row's codebook, `group` [rows] each row's codebook. A centroid no weight
    takes keeps its value."""
    k = codebooks.shape[1]
    w, hf = weight.double(), h.double()
    books = codebooks.double().clone()
    for g in range(books.shape[0]):
        rows = torch.nonzero(group == g).flatten()
        if rows.numel() == 0:
            continue
        system = torch.zeros(k, k, dtype=torch.float64)
        rhs = torch.zeros(k, dtype=torch.float64)
        for chunk in rows.split(32):  # memory: 32 rows x columns x k one-hots at a time
            onehot = torch.nn.functional.one_hot(labels[chunk], k).double()  # [r, columns, k]
            h_onehot = torch.einsum("ij,rjk->rik", hf, onehot)
            system += torch.einsum("rik,ril->kl", onehot, h_onehot)
            rhs += torch.einsum("rik,ri->k", h_onehot, w[chunk])
        # A centroid nobody takes has a zero row: a tiny ridge towards its old value keeps it (and the system solvable).
        ridge = 1e-9 * torch.clamp(torch.diagonal(system).max(), min=1e-30)
        books[g] = torch.linalg.solve(system + ridge * torch.eye(k, dtype=torch.float64), rhs + ridge * books[g])
    return books.to(codebooks.dtype)
