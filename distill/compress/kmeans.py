"""Weight sharing by one-dimensional k-means (pure functions).

Han, Mao & Dally, "Deep Compression" (ICLR 2016), section 3: the surviving weights of a layer are clustered with
k-means, every weight is replaced by its centroid, and only the centroid index is stored. Linear initialisation
(centroids evenly spaced between the smallest and the largest weight) worked best in the paper because it keeps
the few large weights, which matter most, represented.

With ``b`` bits a layer has ``2**b`` codes; code 0 is reserved for the exact zero of pruned weights (and for the
padding entries of the sparse format), so k-means finds ``2**b - 1`` non-zero centroids.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["assign_to_codebook", "clusters_for_bits", "kmeans_1d", "quantize_weight"]


def clusters_for_bits(bits: int) -> int:
    """Number of non-zero centroids for ``bits``-bit codes: ``2**bits - 1`` (code 0 is the pruned zero).

    Raises:
        ValueError: if ``bits`` is not in 1..16.
    """
    if not (isinstance(bits, int) and 1 <= bits <= 16):
        raise ValueError(f"bits must be an integer in 1..16, got {bits!r}")
    return (1 << bits) - 1


def kmeans_1d(x: np.ndarray, k: int, max_iter: int = 100, init: str = "linear") -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on scalars, vectorised: assignment by ``searchsorted`` on the midpoints of sorted centroids.

    Args:
        x: 1-D values (float64 internally).
        k: number of centroids (``>= 1``).
        max_iter: maximum number of Lloyd iterations; stops earlier when no assignment changes.
        init: ``"linear"`` (evenly spaced over [min, max], as in Deep Compression) or ``"density"`` (quantiles).

    Returns:
        ``(centroids, labels)``: the sorted centroids that own at least one value (so possibly fewer than ``k``,
        e.g. when ``x`` has fewer distinct values) and each value's centroid index.

    Raises:
        ValueError: on an empty input, ``k < 1`` or an unknown ``init``.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("kmeans_1d needs at least one value")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    lo, hi = float(x.min()), float(x.max())
    if init == "linear":
        c = np.linspace(lo, hi, k) if k > 1 else np.array([(lo + hi) / 2])
    elif init == "density":
        c = np.quantile(x, np.linspace(0, 1, k)) if k > 1 else np.array([np.median(x)])
    else:
        raise ValueError(f"init must be 'linear' or 'density', got {init!r}")
    c = np.unique(c)
    labels = np.full(x.size, -1, dtype=np.int64)
    for _ in range(max_iter):
        new = np.searchsorted((c[1:] + c[:-1]) / 2, x)  # nearest centroid, c sorted
        if np.array_equal(new, labels):
            break
        labels = new
        counts = np.bincount(labels, minlength=c.size)
        sums = np.bincount(labels, weights=x, minlength=c.size)
        filled = counts > 0
        c = np.where(filled, sums / np.maximum(counts, 1), c)  # an empty cluster keeps its centroid
        order = np.argsort(c, kind="stable")
        if not np.all(order[:-1] < order[1:]):
            c = c[order]
            labels = np.full(x.size, -1, dtype=np.int64)  # re-assign against the sorted centroids
    used = np.unique(labels)
    remap = np.full(c.size, -1, dtype=np.int64)
    remap[used] = np.arange(used.size)
    return c[used], remap[labels]


def assign_to_codebook(x: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest codebook value for each ``x`` (codebook any order); ties go to the lower value."""
    cb = np.asarray(codebook, dtype=np.float64)
    order = np.argsort(cb, kind="stable")
    s = cb[order]
    idx = np.searchsorted((s[1:] + s[:-1]) / 2, np.asarray(x, dtype=np.float64).ravel())
    return order[idx]


def quantize_weight(
    weight: torch.Tensor, bits: int, max_iter: int = 100, init: str = "linear"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Share the non-zero weights of one layer through k-means with ``2**bits - 1`` centroids.

    Zeros (pruned weights) stay exactly zero.

    Returns:
        ``(quantized, codebook, labels)``: the quantized weight (same dtype/device, values exactly
        ``codebook[label]``), the float codebook with ``codebook[0] == 0``, and per-weight labels (0 = pruned).
    """
    w = weight.detach()
    flat = w.flatten().cpu().double().numpy()
    nz = np.flatnonzero(flat)
    labels = np.zeros(flat.size, dtype=np.int64)
    if nz.size:
        centroids, lab = kmeans_1d(flat[nz], clusters_for_bits(bits), max_iter=max_iter, init=init)
        cent32 = centroids.astype(np.float32)
        keep = cent32 != 0  # a centroid that rounds to exactly 0 would be a pruned weight
        codebook = np.concatenate([[0.0], cent32[keep]]).astype(np.float32)
        new_index = np.cumsum(keep) * keep  # 0 for a dropped (zero) centroid, else its code
        labels[nz] = new_index[lab]
    else:
        codebook = np.zeros(1, dtype=np.float32)
    cb = torch.from_numpy(codebook).to(w.dtype)
    lab_t = torch.from_numpy(labels).view(w.shape)
    quantized = cb[lab_t].to(device=w.device)
    return quantized, cb, lab_t
