"""Pure coding functions: Huffman, relative indices, k-means, pruning masks, against naive float64 references."""

from __future__ import annotations

import heapq

import numpy as np
import pytest
import torch

from distill.compress import huffman
from distill.compress.kmeans import clusters_for_bits, kmeans_1d, quantize_weight
from distill.compress.pruning import magnitude_threshold, prune_mask, sparsity_mask
from distill.compress.sparse import best_index_bits, decode_positions, encode_positions, stream_counts


def naive_huffman_cost(counts: np.ndarray) -> int:
    """Total coded bits of an optimal prefix code: sum of the merged weights (classic identity)."""
    heap = [int(c) for c in counts if c > 0]
    if len(heap) <= 1:
        return 0
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        cost += a + b
        heapq.heappush(heap, a + b)
    return cost


def roundtrip(s: np.ndarray) -> huffman.HuffmanStream:
    st = huffman.encode(s)
    out = huffman.decode(st.lengths, st.data, st.n_symbols, st.n_bits)
    np.testing.assert_array_equal(out, s)
    return st


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_huffman_optimal_and_lossless_on_random_input(seed: int) -> None:
    rng = np.random.default_rng(seed)
    s = rng.integers(0, rng.integers(2, 300), size=5000)
    st = roundtrip(s)
    assert st.n_bits == naive_huffman_cost(np.bincount(s))
    assert st.n_bits >= huffman.entropy_bits(np.bincount(s))


def test_huffman_skewed_input() -> None:
    s = np.zeros(10000, dtype=np.int64)
    s[::97] = 1
    s[::1009] = 2
    st = roundtrip(s)
    assert st.n_bits == naive_huffman_cost(np.bincount(s))
    assert st.n_bits < 1.2 * s.size  # about one bit per symbol, the zero symbol's code


def test_huffman_fibonacci_counts_respect_length_limit() -> None:
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib)
    lengths = huffman.code_lengths(counts, max_length=16)
    assert lengths.max() <= 16
    assert np.sum(2.0 ** -lengths.astype(float)) <= 1.0 + 1e-12  # still a prefix code
    s = np.repeat(np.arange(25), counts[:25])
    st = huffman.encode(s, max_length=12)
    assert st.lengths.max() <= 12
    np.testing.assert_array_equal(huffman.decode(st.lengths, st.data, st.n_symbols, st.n_bits), s)


def test_huffman_single_symbol_costs_no_bits() -> None:
    s = np.full(1234, 7)
    st = roundtrip(s)
    assert st.n_bits == 0 and st.data == b""
    empty = roundtrip(np.zeros(0, dtype=np.int64))
    assert empty.n_symbols == 0


def test_huffman_decode_rejects_inconsistent_stream() -> None:
    st = huffman.encode(np.array([0, 1, 2, 2, 2, 1]))
    with pytest.raises(ValueError, match="does not decode|too short"):
        huffman.decode(st.lengths, st.data, st.n_symbols + 3, st.n_bits)
    with pytest.raises(ValueError, match="prefix code"):
        huffman.decode(np.array([1, 1, 1], np.uint8), st.data, st.n_symbols, st.n_bits)


def naive_relative(positions: list[int], bits: int) -> list[int]:
    """Han's Figure 2 by hand: walk the positions, insert a filler every time the gap overflows."""
    gaps, prev = [], -1
    span = 2**bits
    for p in positions:
        while p - prev - 1 > span - 1:
            gaps.append(span - 1)
            prev += span
        gaps.append(p - prev - 1)
        prev = p
    return gaps


def test_relative_indices_bridge_gaps_longer_than_the_span() -> None:
    positions = [1, 4, 30, 31, 100, 101]
    gaps, real = encode_positions(np.array(positions), 3)
    assert gaps.tolist() == naive_relative(positions, 3)
    assert max(gaps) <= 7
    assert len(gaps) - len(positions) == 3 + 8  # fillers for gaps 25 (3) and 68 (8)
    np.testing.assert_array_equal(decode_positions(gaps)[real], positions)
    gaps0, real0 = encode_positions(np.array(positions), 0)  # b = 0: every position stored
    assert gaps0.size == 102 and not gaps0.any()
    np.testing.assert_array_equal(decode_positions(gaps0)[real0], positions)


def test_relative_indices_random_against_naive() -> None:
    rng = np.random.default_rng(3)
    positions = np.flatnonzero(rng.random(5000) < 0.03)
    for b in (1, 2, 4, 5, 8):
        gaps, real = encode_positions(positions, b)
        assert gaps.tolist() == naive_relative(positions.tolist(), b)
        np.testing.assert_array_equal(decode_positions(gaps)[real], positions)


def test_relative_indices_reject_unsorted_positions() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        encode_positions(np.array([3, 2]), 4)


def test_best_index_bits_matches_brute_force() -> None:
    rng = np.random.default_rng(4)
    positions = np.flatnonzero(rng.random(20000) < 0.08)
    codes = rng.integers(1, 32, positions.size)
    best, sizes = best_index_bits(positions, codes, max_bits=10)
    for b in (0, 3, best):
        gaps, real = encode_positions(positions, b)
        entry_codes = np.zeros(gaps.size, dtype=np.int64)
        entry_codes[real] = codes
        gc, cc = stream_counts(positions, codes, b)
        np.testing.assert_array_equal(gc[: gaps.max() + 1], np.bincount(gaps))
        g, c = huffman.encode(gaps), huffman.encode(entry_codes)
        tables = huffman.table_bytes(g.lengths) + huffman.table_bytes(c.lengths)  # 4 bits per length when it fits
        assert sizes[b] == g.n_bits + c.n_bits + 8 * tables + 32 * (g.sync.size + c.sync.size)
    assert sizes[best] == min(sizes.values())
    assert 2 <= best <= 6  # ~8% density: mean gap ~12


def naive_kmeans(x: np.ndarray, c: np.ndarray, iters: int) -> np.ndarray:
    for _ in range(iters):
        lab = np.abs(x[:, None] - c[None, :]).argmin(1)  # (n, k) distances
        c = np.array([x[lab == k].mean() if (lab == k).any() else c[k] for k in range(len(c))])
    return c


def test_kmeans_linear_init_matches_naive_lloyd() -> None:
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(-1, 0.1, 300), rng.normal(0.5, 0.2, 500), rng.normal(2, 0.05, 50)])
    c, labels = kmeans_1d(x, 7, max_iter=300)
    ref = naive_kmeans(x, np.linspace(x.min(), x.max(), 7), 300)
    owners = np.unique([np.argmin(np.abs(v - ref)) for v in x])  # centroids that own values
    np.testing.assert_allclose(c, np.sort(ref[owners]), atol=1e-9)
    np.testing.assert_allclose(c[labels], [c[np.argmin(np.abs(v - c))] for v in x])  # every value at its nearest


def test_kmeans_fewer_distinct_values_than_clusters() -> None:
    c, labels = kmeans_1d(np.array([1.0, 1.0, 2.0, 2.0, 5.0]), 16)
    np.testing.assert_array_equal(c, [1.0, 2.0, 5.0])
    np.testing.assert_array_equal(c[labels], [1, 1, 2, 2, 5])


def test_quantize_weight_keeps_zeros_and_respects_bits() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g)
    w[w.abs() < 0.8] = 0
    q, codebook, labels = quantize_weight(w, bits=3)
    assert codebook[0] == 0 and len(codebook) <= clusters_for_bits(3) + 1
    assert torch.equal(q == 0, w == 0)
    assert torch.equal(q, codebook[labels])
    with pytest.raises(ValueError, match="bits must be an integer in 1..16"):
        clusters_for_bits(0)


def test_pruning_threshold_against_naive() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(50, 40, generator=g)
    x = w.double().flatten().tolist()
    mean = sum(x) / len(x)
    std = (sum((v - mean) ** 2 for v in x) / len(x)) ** 0.5
    assert magnitude_threshold(w, 0.7) == pytest.approx(0.7 * std, rel=1e-12)
    mask, thr = prune_mask(w, quality=0.7)
    assert torch.equal(mask, w.abs() >= thr)
    mask2, _ = prune_mask(w * mask, quality=1.2, previous=mask)
    assert not (mask2 & ~mask).any()  # pruned weights never come back
    with pytest.raises(ValueError, match="exactly one of quality or sparsity"):
        prune_mask(w)
    with pytest.raises(ValueError, match="quality must be a finite number"):
        magnitude_threshold(w, -1.0)


def test_sparsity_mask_hits_target_exactly() -> None:
    w = torch.arange(1, 101, dtype=torch.float32).view(10, 10) * torch.tensor([1.0, -1.0]).repeat(50).view(10, 10)
    m = sparsity_mask(w, 0.37)
    assert int((~m).sum()) == 37
    assert (w.abs()[~m].max() < w.abs()[m].min()).item()
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\]"):
        sparsity_mask(w, 1.5)


def test_huffman_lockstep_decoding_with_sync_points_matches_pointer_doubling() -> None:
    rng = np.random.default_rng(6)
    s = np.minimum(rng.geometric(0.15, size=16 * huffman.SYNC_INTERVAL + 123), 40)
    st = huffman.encode(s)
    assert st.sync.size == huffman.sync_count(s.size, st.n_bits) == 16
    np.testing.assert_array_equal(huffman.decode(st.lengths, st.data, st.n_symbols, st.n_bits, st.sync), s)
    np.testing.assert_array_equal(huffman.decode(st.lengths, st.data, st.n_symbols, st.n_bits), s)
    bad = st.sync.copy()
    bad[3] += 1  # a sync point off by one bit no longer meets the previous lane's end
    with pytest.raises(ValueError, match="does not decode"):
        huffman.decode(st.lengths, st.data, st.n_symbols, st.n_bits, bad)
    with pytest.raises(ValueError, match="expected 16 sync offsets"):
        huffman.decode(st.lengths, st.data, st.n_symbols, st.n_bits, st.sync[:-1])


def test_sparsity_mask_breaks_ties_by_position() -> None:
    w = torch.tensor([3.0, 1.0, -1.0, 1.0, 2.0, 0.0])
    assert sparsity_mask(w, 0.5).tolist() == [True, False, False, True, True, False]


def test_length_tables_pack_into_nibbles_when_they_fit() -> None:
    for n in (0, 1, 2, 7, 256):
        lengths = np.random.default_rng(n).integers(0, 16, n).astype(np.uint8)
        data, bits = huffman.pack_lengths(lengths)
        assert bits == 4 and len(data) == huffman.table_bytes(lengths) == (n + 1) // 2
        np.testing.assert_array_equal(huffman.unpack_lengths(data, n, bits), lengths)
    long = np.array([1, 16, 3], dtype=np.uint8)  # a 16-bit code does not fit a nibble: one byte per length
    data, bits = huffman.pack_lengths(long)
    assert bits == 8 and huffman.table_bytes(long) == 3
    np.testing.assert_array_equal(huffman.unpack_lengths(data, 3, bits), long)
    with pytest.raises(ValueError, match="4 or 8 bits"):
        huffman.unpack_lengths(data, 3, 5)
    with pytest.raises(ValueError, match="expected 2"):
        huffman.unpack_lengths(b"\x00", 3, 4)
