"""Relative-index sparse storage with padding zeros (pure functions).

Han, Mao & Dally, "Deep Compression" (ICLR 2016), section 2 and Figure 2: the non-zero weights are stored with the
*difference* of their position to the previous stored entry in ``b`` bits. A gap longer than ``2**b - 1`` zeros is
bridged by a padding entry: a stored zero placed ``2**b`` positions after the previous entry.

Here an entry's gap is the number of zeros skipped before it, so a gap ``d`` needs ``d // 2**b`` padding entries
(each with gap ``2**b - 1``) and the entry itself keeps gap ``d % 2**b``. ``b = 0`` stores every position up to the
last non-zero (dense codes, no index at all once entropy-coded). Trailing zeros are not stored.
"""

from __future__ import annotations

import numpy as np

from distill.compress.huffman import code_lengths, coded_bits, sync_count, table_bytes

__all__ = ["best_index_bits", "decode_positions", "encode_positions", "stream_counts"]


def _skips(positions: np.ndarray) -> np.ndarray:
    p = np.asarray(positions, dtype=np.int64).ravel()
    if p.size and (p[0] < 0 or (np.diff(p) <= 0).any()):
        raise ValueError("positions must be non-negative and strictly increasing")
    prev = np.concatenate([[-1], p[:-1]])
    return p - prev - 1  # zeros skipped before each non-zero


def encode_positions(positions: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Relative indices of ``b`` bits for sorted non-zero ``positions``, with padding entries.

    Args:
        positions: strictly increasing flat indices of the non-zero weights.
        bits: index width ``b >= 0``.

    Returns:
        ``(gaps, real)``: the gap of every stored entry (each ``<= 2**b - 1``) and the entry number of each
        non-zero (the others are padding zeros).

    Raises:
        ValueError: if positions are not strictly increasing or ``bits`` is negative.
    """
    if bits < 0:
        raise ValueError(f"index bits must be >= 0, got {bits}")
    d = _skips(positions)
    span = 1 << bits
    pads = d // span  # (n,) padding entries before each non-zero
    real = np.cumsum(pads + 1) - 1  # entry number of each non-zero
    gaps = np.full(int(real[-1]) + 1 if real.size else 0, span - 1, dtype=np.int64)
    gaps[real] = d % span
    return gaps, real


def decode_positions(gaps: np.ndarray) -> np.ndarray:
    """Flat positions of all stored entries (padding included): ``cumsum(gap + 1) - 1``."""
    return np.cumsum(np.asarray(gaps, dtype=np.int64) + 1) - 1


def stream_counts(positions: np.ndarray, codes: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symbol counts of the gap stream and the code stream for index width ``bits``, without building them.

    Padding entries carry gap ``2**b - 1`` and code 0.
    """
    d = _skips(positions)
    span = 1 << bits
    pads = int((d // span).sum())
    gap_counts = np.bincount(d % span, minlength=span) if d.size else np.zeros(span, dtype=np.int64)
    gap_counts[span - 1] += pads
    code_counts = np.bincount(np.asarray(codes, dtype=np.int64), minlength=1)
    code_counts[0] += pads
    return gap_counts, code_counts


def _table_bytes(lengths: np.ndarray, nibbles: bool) -> int:
    used = np.flatnonzero(lengths)
    return table_bytes(lengths[: int(used[-1]) + 1], nibbles) if used.size else 0  # up to the last used symbol


def best_index_bits(
    positions: np.ndarray, codes: np.ndarray, max_bits: int = 12, nibbles: bool = True
) -> tuple[int, dict[int, int]]:
    """The index width ``b`` in ``0..max_bits`` giving the smallest Huffman-coded size (streams, tables, sync points).

    Args:
        positions: sorted flat positions of the non-zeros.
        codes: their cluster codes (``>= 1``; 0 is the padding/pruned zero).
        max_bits: the widest index considered.
        nibbles: code length tables cost 4 bits per symbol when they fit (format version 2), else 8.

    Returns:
        ``(best_bits, size_in_bits_per_candidate)``.
    """
    sizes: dict[int, int] = {}
    for b in range(max_bits + 1):
        gc, cc = stream_counts(positions, codes, b)
        entries = int(gc.sum())
        lg, lc = code_lengths(gc), code_lengths(cc)
        g_bits, c_bits = coded_bits(gc, lg), coded_bits(cc, lc)
        sync = 32 * (sync_count(entries, g_bits) + sync_count(entries, c_bits))
        sizes[b] = g_bits + c_bits + sync + 8 * (_table_bytes(lg, nibbles) + _table_bytes(lc, nibbles))
    best = min(sizes, key=lambda b: (sizes[b], b))
    return best, sizes
