"""Canonical Huffman coding, vectorised with numpy (pure functions).

Huffman, "A Method for the Construction of Minimum-Redundancy Codes" (1952), in the canonical form of
Schwartz & Kallick (1964): a code is fully described by the code length of each symbol, which is all the file
stores. Deep Compression (Han, Mao & Dally, ICLR 2016) Huffman-codes both the cluster indices and the sparse index
gaps.

Nothing loops in Python per symbol:

* encoding writes bit ``j`` of every code at once, for ``j`` in ``0..max_length-1``;
* the encoder records a **sync point** (the bit offset) every :data:`SYNC_INTERVAL` symbols. Long streams are
  decoded in lockstep: one lane per sync interval, and each of the ``SYNC_INTERVAL`` steps decodes one symbol in
  every lane at once with a table lookup on the ``max_length``-bit window at the lane's position;
* short streams (and streams without sync points) are decoded without any loop over symbols: at **every** bit
  position, the window gives the symbol and the next code's position if a code started there; the positions where
  codes really start are the orbit of 0 under ``next``, found by pointer doubling (``V <- V ++ J[V]``,
  ``J <- J[J]``, ``log2(n)`` gathers).

A stream holding a single distinct symbol costs zero bits: its count is known from the container.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MAX_CODE_LENGTH",
    "SYNC_INTERVAL",
    "HuffmanStream",
    "canonical_codes",
    "code_lengths",
    "coded_bits",
    "decode",
    "encode",
    "entropy_bits",
    "pack_lengths",
    "sync_count",
    "table_bytes",
    "unpack_lengths",
]

MAX_CODE_LENGTH = 24
SYNC_INTERVAL = 4096  # symbols between two recorded bit offsets
_LOCKSTEP_MIN_SYMBOLS = 16 * SYNC_INTERVAL  # below this, pointer doubling is faster


def sync_count(n_symbols: int, n_bits: int) -> int:
    """Number of sync points stored for a stream: one per started interval after the first (none without bits)."""
    return max(-(-n_symbols // SYNC_INTERVAL) - 1, 0) if n_bits else 0


def _huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Unrestricted Huffman code lengths of positive ``counts`` (at least two)."""
    m = counts.size
    heap = [(int(c), i) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    parent = np.zeros(2 * m - 1, dtype=np.int64)
    nxt = m
    while len(heap) > 1:  # one merge per distinct symbol, not per coded symbol
        c1, a = heapq.heappop(heap)
        c2, b = heapq.heappop(heap)
        parent[a] = parent[b] = nxt
        heapq.heappush(heap, (c1 + c2, nxt))
        nxt += 1
    depth = np.zeros(2 * m - 1, dtype=np.int64)
    for node in range(2 * m - 3, -1, -1):  # parents are created after their children
        depth[node] = depth[parent[node]] + 1
    return depth[:m]


def code_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code length of each symbol (0 for an unused symbol), limited to ``max_length`` bits.

    A single used symbol gets length 1 (it is still identified by the table; :func:`encode` writes no bits for
    it). When the optimal code is longer than ``max_length``, counts are halved (keeping them >= 1) until it fits,
    a standard near-optimal way to limit lengths.

    Args:
        counts: non-negative occurrence count of each symbol of the alphabet.
        max_length: the longest allowed code.

    Returns:
        ``uint8`` lengths, one per symbol.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError("counts must be a 1-D array of non-negative integers")
    lengths = np.zeros(counts.size, dtype=np.uint8)
    used = np.flatnonzero(counts)
    if used.size == 0:
        return lengths
    if used.size == 1:
        lengths[used] = 1
        return lengths
    if used.size > (1 << max_length):
        raise ValueError(f"{used.size} symbols cannot have codes of at most {max_length} bits")
    c = counts[used]
    while True:
        ls = _huffman_lengths(c)
        if ls.max() <= max_length:
            break
        c = np.maximum(c >> 1, 1)
    lengths[used] = ls
    return lengths


def canonical_codes(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The canonical code of each used symbol.

    Symbols are ordered by (length, symbol); each code is the previous plus one, shifted to its length. Computed in
    closed form: the left-justified code of the ``i``-th symbol is the Kraft sum of the ones before it.

    Returns:
        ``(codes, order, left_justified)``: ``codes[s]`` for every symbol (0 where unused), the used symbols in
        canonical order, and their codes left-justified to ``max(lengths)`` bits (strictly increasing).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    used = np.flatnonzero(lengths)
    codes = np.zeros(lengths.size, dtype=np.uint64)
    if used.size == 0:
        return codes, used, np.zeros(0, dtype=np.uint64)
    order = used[np.lexsort((used, lengths[used]))]
    ls = lengths[order]
    lmax = int(ls.max())
    kraft = (np.uint64(1) << (lmax - ls).astype(np.uint64)).astype(np.uint64)
    left = np.concatenate([np.zeros(1, dtype=np.uint64), np.cumsum(kraft, dtype=np.uint64)[:-1]])
    codes[order] = left >> (lmax - ls).astype(np.uint64)
    return codes, order, left


@dataclass(frozen=True)
class HuffmanStream:
    """An encoded stream: the code length table, the packed bits and their counts."""

    lengths: np.ndarray  # uint8 per symbol, trailing unused symbols trimmed
    data: bytes  # big-endian bit order inside each byte (np.packbits)
    n_symbols: int
    n_bits: int
    sync: np.ndarray  # uint32 bit offsets of symbols SYNC_INTERVAL, 2*SYNC_INTERVAL, ... (see sync_count)


def table_bytes(lengths: np.ndarray, nibbles: bool = True) -> int:
    """Bytes of a stored code length table: 4 bits per symbol when every length is at most 15 (and ``nibbles``),
    else one byte per symbol. Trailing unused symbols are never stored."""
    n = int(np.asarray(lengths).size)
    if nibbles and (n == 0 or int(np.max(lengths)) <= 15):
        return (n + 1) // 2
    return n


def pack_lengths(lengths: np.ndarray, nibbles: bool = True) -> tuple[bytes, int]:
    """The code length table as stored: ``(bytes, bits_per_length)`` with 4 bits per length (high nibble first,
    the last low nibble zero-padded) when all lengths fit, else 8 (see :func:`table_bytes`)."""
    lengths = np.asarray(lengths, dtype=np.uint8)
    if not nibbles or (lengths.size and int(lengths.max()) > 15):
        return lengths.tobytes(), 8
    padded = np.concatenate([lengths, np.zeros(lengths.size % 2, dtype=np.uint8)])
    return ((padded[0::2] << 4) | padded[1::2]).astype(np.uint8).tobytes(), 4


def unpack_lengths(data: bytes, n: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_lengths`: the ``n`` code lengths of a table stored with ``bits`` bits each.

    Raises:
        ValueError: if ``bits`` is not 4 or 8, or ``data`` has the wrong size.
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        if raw.size != n:
            raise ValueError(f"length table holds {raw.size} bytes, expected {n}")
        return raw
    if bits != 4:
        raise ValueError(f"a length table stores 4 or 8 bits per symbol, got {bits}")
    if raw.size != (n + 1) // 2:
        raise ValueError(f"length table holds {raw.size} bytes, expected {(n + 1) // 2}")
    out = np.empty(2 * raw.size, dtype=np.uint8)
    out[0::2], out[1::2] = raw >> 4, raw & 0x0F
    return out[:n]


def coded_bits(counts: np.ndarray, lengths: np.ndarray) -> int:
    """Bits of the payload for symbols with these ``counts`` (0 when a single symbol is used)."""
    counts = np.asarray(counts, dtype=np.int64)
    if np.count_nonzero(counts) <= 1:
        return 0
    return int((counts * np.asarray(lengths[: counts.size], dtype=np.int64)).sum())


def entropy_bits(counts: np.ndarray) -> float:
    """Total empirical entropy ``-sum c log2(c / n)`` of symbols with these ``counts``, in bits."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    if c.size <= 1:
        return 0.0
    n = c.sum()
    return float(-(c * np.log2(c / n)).sum())


def encode(symbols: np.ndarray, alphabet_size: int | None = None, max_length: int = MAX_CODE_LENGTH) -> HuffmanStream:
    """Huffman-code ``symbols`` (non-negative integers) with a canonical code built from their own counts.

    Raises:
        ValueError: if a symbol is negative or not below ``alphabet_size``.
    """
    s = np.asarray(symbols).ravel().astype(np.int64)
    if s.size and s.min() < 0:
        raise ValueError("Huffman symbols must be non-negative")
    size = int(s.max()) + 1 if s.size else 0
    if alphabet_size is not None:
        if size > alphabet_size:
            raise ValueError(f"symbol {size - 1} is outside the alphabet of {alphabet_size}")
    counts = np.bincount(s, minlength=size)
    lengths = code_lengths(counts, max_length)
    if np.count_nonzero(counts) <= 1:
        return HuffmanStream(lengths, b"", int(s.size), 0, np.zeros(0, dtype=np.uint32))
    codes, _, _ = canonical_codes(lengths)
    ls = lengths.astype(np.int64)[s]  # (n,)
    cs = codes[s]
    ends = np.cumsum(ls)
    starts = ends - ls
    n_bits = int(ends[-1])
    bits = np.zeros(n_bits, dtype=np.uint8)
    for j in range(int(ls.max())):  # bit j of every code longer than j
        sel = ls > j
        shift = (ls[sel] - 1 - j).astype(np.uint64)
        bits[starts[sel] + j] = ((cs[sel] >> shift) & np.uint64(1)).astype(np.uint8)
    if n_bits >= 2**32:
        raise ValueError(f"a Huffman stream of {n_bits} bits exceeds the 2**32-bit limit of sync offsets")
    sync = starts[SYNC_INTERVAL::SYNC_INTERVAL].astype(np.uint32)
    return HuffmanStream(lengths, np.packbits(bits).tobytes(), int(s.size), n_bits, sync)


def decode(lengths: np.ndarray, data: bytes, n_symbols: int, n_bits: int, sync: np.ndarray | None = None) -> np.ndarray:
    """Decode ``n_symbols`` symbols from a canonical-Huffman bit stream (vectorised, see the module docstring).

    ``sync`` holds the bit offsets recorded by :func:`encode`; long streams with them decode in lockstep, others by
    pointer doubling (same result).

    Raises:
        ValueError: if the table is not a valid prefix code or the bits do not decode to exactly ``n_symbols``
            symbols filling ``n_bits`` bits.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    used = np.flatnonzero(lengths)
    if n_symbols == 0:
        if n_bits:
            raise ValueError("an empty Huffman stream must have no bits")
        return np.zeros(0, dtype=np.int64)
    if used.size == 0:
        raise ValueError("Huffman table is empty but the stream holds symbols")
    if used.size == 1:
        if n_bits:
            raise ValueError("a single-symbol Huffman stream must have no bits")
        return np.full(n_symbols, used[0], dtype=np.int64)
    lmax = int(lengths.max())
    if lmax > 32 or float(np.sum(2.0 ** -lengths[used])) > 1.0 + 1e-12:
        raise ValueError("Huffman code lengths do not form a prefix code")
    if len(data) * 8 < n_bits or n_bits < n_symbols:
        raise ValueError(f"Huffman stream too short: {len(data)} bytes for {n_bits} bits and {n_symbols} symbols")
    _, order, left = canonical_codes(lengths)
    if sync is not None and n_symbols >= _LOCKSTEP_MIN_SYMBOLS:
        return _decode_lockstep(lengths, order, left, lmax, data, n_symbols, n_bits, np.asarray(sync, np.int64))
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n_bits)
    padded = np.concatenate([bits, np.zeros(lmax, dtype=np.uint8)])
    window = np.zeros(n_bits, dtype=np.uint64)
    for j in range(lmax):  # the lmax-bit window starting at every position
        window = (window << np.uint64(1)) | padded[j : j + n_bits]
    rank = np.searchsorted(left, window, side="right") - 1  # (n_bits,) code starting here, if one does
    pos_dtype = np.int32 if n_bits < 2**31 - lmax else np.int64
    nxt = np.empty(n_bits + 1, dtype=pos_dtype)
    nxt[:n_bits] = np.arange(n_bits, dtype=pos_dtype) + lengths[order][rank].astype(pos_dtype)
    nxt[n_bits] = n_bits
    np.minimum(nxt, n_bits, out=nxt)  # a code running past the end points at the sentinel
    starts = np.zeros(1, dtype=pos_dtype)  # the first 2**k code starts ...
    jump = nxt  # ... and next applied 2**k times
    while starts.size < n_symbols:
        starts = np.concatenate([starts, jump[starts]])
        if starts.size < n_symbols:
            jump = jump[jump]
    starts = starts[:n_symbols]
    if starts[-1] >= n_bits or nxt[starts[-1]] != n_bits or (n_symbols > 1 and starts[-1] <= starts[-2]):
        raise ValueError("Huffman stream does not decode to the recorded number of symbols and bits")
    return order[rank[starts]].astype(np.int64)


def _decode_lockstep(
    lengths: np.ndarray,
    order: np.ndarray,
    left: np.ndarray,
    lmax: int,
    data: bytes,
    n_symbols: int,
    n_bits: int,
    sync: np.ndarray,
) -> np.ndarray:
    """One lane per sync interval; each step decodes one symbol in every lane by a table lookup."""
    if sync.size != sync_count(n_symbols, n_bits):
        raise ValueError(f"expected {sync_count(n_symbols, n_bits)} sync offsets, got {sync.size}")
    use_table = lmax <= 16  # a lookup table of 2**lmax entries; longer codes search the sorted codes instead
    if use_table:
        table_rank = np.searchsorted(left, np.arange(1 << lmax, dtype=np.uint64), side="right") - 1  # (2**lmax,)
    sym_by_rank = order
    len_by_rank = lengths[order]
    b = np.concatenate([np.frombuffer(data, dtype=np.uint8), np.zeros(8, dtype=np.uint8)]).astype(np.uint64)
    words = (b[:-3] << np.uint64(24)) | (b[1:-2] << np.uint64(16)) | (b[2:-1] << np.uint64(8)) | b[3:]  # big-endian
    starts = np.concatenate([[0], sync])  # (lanes,)
    if (np.diff(starts) <= 0).any() or starts[-1] >= n_bits:
        raise ValueError("sync offsets are not increasing positions inside the stream")
    lanes = starts.size
    pos = starts.copy()
    out = np.zeros((lanes, SYNC_INTERVAL), dtype=np.int64)
    limit = np.int64(n_bits)
    shift = np.uint64(32 - lmax)
    mask32 = np.uint64(0xFFFFFFFF)
    for step in range(SYNC_INTERVAL):  # one symbol of every lane per step (lmax + 7 <= 32 bits per word)
        w = words[np.minimum(pos, limit) >> 3]
        window = ((w << (pos & 7).astype(np.uint64)) & mask32) >> shift
        rank = table_rank[window] if use_table else np.searchsorted(left, window, side="right") - 1
        out[:, step] = sym_by_rank[rank]
        pos += len_by_rank[rank]
        if step == (n_symbols - 1) % SYNC_INTERVAL:
            last_end = int(pos[-1])  # the last lane is complete here
    ends = np.concatenate([starts[1:], [n_bits]])
    if not np.array_equal(pos[:-1], ends[:-1]) or last_end != n_bits:
        raise ValueError("Huffman stream does not decode to the recorded number of symbols and bits")
    return out.reshape(-1)[:n_symbols]
