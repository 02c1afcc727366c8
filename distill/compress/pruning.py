"""Magnitude pruning masks (pure functions).

Han, Pool, Tran & Dally, "Learning both Weights and Connections for Efficient Neural Networks" (NeurIPS 2015) and
Han, Mao & Dally, "Deep Compression" (ICLR 2016): a connection is removed when its magnitude is below a threshold;
the threshold is a quality parameter times the standard deviation of the layer's weights.
"""

from __future__ import annotations

import torch

__all__ = ["magnitude_threshold", "prune_mask", "sparsity_mask", "threshold_mask"]


def magnitude_threshold(weight: torch.Tensor, quality: float) -> float:
    """``quality * std(weight)``, the standard deviation over all entries of the layer (pruned zeros included).

    .. math:: \\tau = q \\, \\sigma(W)

    Args:
        weight: the layer's weights.
        quality: the quality parameter ``q >= 0``.

    Raises:
        ValueError: if ``quality`` is negative or not finite.
    """
    if not (quality >= 0.0 and quality < float("inf")):
        raise ValueError(f"quality must be a finite number >= 0, got {quality}")
    w = weight.detach().double().flatten()
    if w.numel() < 2:
        return 0.0
    return float(quality * w.std(unbiased=False))


def threshold_mask(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask of the weights kept: ``|w| >= threshold`` (and ``w != 0``)."""
    a = weight.detach().abs()
    return (a >= threshold) & (a > 0)


def sparsity_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask keeping all but the ``round(sparsity * n)`` smallest-magnitude weights.

    Ties are broken by position (stable sort), so the mask is deterministic.

    Raises:
        ValueError: if ``sparsity`` is outside [0, 1].
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    flat = weight.detach().abs().flatten()
    k = int(round(sparsity * flat.numel()))
    mask = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        kth = flat.kthvalue(k).values  # O(n) selection instead of a full sort
        below = flat < kth
        mask[below] = False
        ties = torch.nonzero(flat == kth).flatten()  # in position order, as a stable sort would rank them
        mask[ties[: k - int(below.sum())]] = False
    return mask.view_as(weight)


def prune_mask(
    weight: torch.Tensor,
    quality: float | None = None,
    sparsity: float | None = None,
    previous: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """The mask of one pruning step and its magnitude threshold.

    Exactly one of ``quality`` (prune ``|w| < quality * std``) or ``sparsity`` (target fraction of zeros) is given.
    A ``previous`` mask is kept: pruned connections never come back. With ``sparsity``, the target counts the
    weights already pruned.

    Returns:
        ``(mask, threshold)`` where ``mask`` is boolean (True = kept) and ``threshold`` the magnitude cut used.

    Raises:
        ValueError: if both or neither of ``quality``/``sparsity`` are given.
    """
    if (quality is None) == (sparsity is None):
        raise ValueError(f"give exactly one of quality or sparsity, got quality={quality}, sparsity={sparsity}")
    w = weight.detach()
    if previous is not None:
        w = w * previous.to(w.device)
    if quality is not None:
        threshold = magnitude_threshold(w, quality)
        mask = threshold_mask(w, threshold)
    else:
        assert sparsity is not None
        mask = sparsity_mask(w, sparsity) & (w != 0)
        kept = w.abs()[mask]
        threshold = float(kept.min()) if kept.numel() else float("inf")
    if previous is not None:
        mask &= previous.to(mask.device).bool()
    return mask, threshold
