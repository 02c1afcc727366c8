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
    """Lloyd's k-means on scalars, vectorised: the values are sorted once, so each cluster is a contiguous run whose
    ends are found by ``searchsorted`` of the centroid midpoints and whose sum comes from prefix sums; one iteration
    costs ``O(k log n)``.

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
    order = np.argsort(x, kind="stable")
    xs = x[order]
    csum = np.concatenate([[0.0], np.cumsum(xs)])  # prefix sums: each cluster is a run of the sorted values
    bounds = np.zeros(0, dtype=np.int64)
    for _ in range(max_iter):
        mids = (c[1:] + c[:-1]) / 2  # c sorted; a value equal to a midpoint goes to the lower centroid
        new = np.concatenate([[0], np.searchsorted(xs, mids, side="right"), [xs.size]])
        if np.array_equal(new, bounds):
            break
        bounds = new
        counts = np.diff(bounds)
        sums = csum[bounds[1:]] - csum[bounds[:-1]]
        c = np.where(counts > 0, sums / np.maximum(counts, 1), c)  # an empty cluster keeps its centroid
        c = np.sort(c)  # Lloyd keeps 1-D centroids ordered; sorting only guards against rounding
    counts = np.diff(bounds)
    used = counts > 0
    labels = np.empty(x.size, dtype=np.int64)
    labels[order] = np.repeat(np.arange(int(used.sum())), counts[used])
    return c[used], labels


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
