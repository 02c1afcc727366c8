"""Fused CPU kernels for the soft weight-sharing prior (:class:`distill.priors.MixtureTable`), compiled with numba.

Why hand-written: the prior's work per weight is tiny (a position on a grid, two table reads, a multiply-add into
``.grad``, one histogram count), so as a chain of ATen ops it is bound by the ~10 passes over memory and their dispatch,
not by arithmetic: the prior cost ~1.9x a LeNet-300-100 step on a CPU that way. Fused, it is one read of each weight
and one read-modify-write of its gradient (in blocks of 4096 weights: a vectorised loop for the positions, then a
scalar one for the gathers and the histogram). No library offers this fusion on CPU: ``torch.compile`` produced a
kernel of about the same speed after ~40 s of compilation per process, and a C++ extension needs a compiler at run
time. numba compiles these loops in 1-2 s, once (cached on disk), and is optional: without it, or for tensors that are
not contiguous float32 on the CPU, :class:`~distill.priors.MixtureTable` runs the same algorithm as ATen ops.

The kernels are single-threaded and release the GIL; the per-weight pass with its binned sums, and the build of a big
table, also run split over torch's own OpenMP threads when torch uses more than one (:class:`TeamPass`,
:func:`build_table`; the reasons beside them). :class:`HostStep` does the callback's whole CPU step in one call.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

try:  # pragma: no cover - exercised by whichever environment runs the tests
    import numba

    AVAILABLE = True
except ImportError:  # pragma: no cover
    numba = None  # type: ignore[assignment]
    AVAILABLE = False

__all__ = [
    "AVAILABLE", "HostStep", "TeamPass", "adam_update", "adam_update_all", "bin_sums", "block_width", "blocks",
    "build_table", "build_team_size", "component_terms", "grid_geometry", "host_pass", "new_outside", "one_thread",
    "outside_length", "pass_constants", "pass_range", "point_stats", "reset_outside", "stats_length", "team_size",
    "usable", "work_length",
]


def _jit(fn: Any) -> Any:
    if not AVAILABLE:
        return fn
    return numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")(fn)


def _jit_fast(fn: Any) -> Any:
    """For the per-weight loop: float reassociation lets LLVM vectorise; no NaN can reach it (checked before)."""
    if not AVAILABLE:
        return fn
    return numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath=True)(fn)


def _jit_nan_safe(fn: Any) -> Any:
    """Fast math without its no-NaN/no-inf assumptions: for the loops that route a NaN, an infinity or a weight outside
    the table to the exact path, whose comparisons must hold for those values too."""
    if not AVAILABLE:
        return fn
    return numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy",
                      fastmath={"nsz", "arcp", "contract", "reassoc"})(fn)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can work on these tensors in place: CPU, float32, contiguous, numba installed."""
    return AVAILABLE and all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and not t.requires_grad
        for t in tensors
    )


_RUN = 64  # grid points per block: most points between two exact evaluations of the mixture in _build_kernel
_DRIFT = 300.0  # the most a component's log term may change over a run (float64 holds e^+-700)
_NEGLIGIBLE = 40.0  # a component whose log term stays this far below the largest over a block is left out there


@_jit
def work_length(components: int, points: int) -> int:
    """float64 scratch :func:`_build_kernel` needs for ``points`` grid points of a mixture of ``components``."""
    return 8 * components + points + 1


@_jit
def blocks(size: int) -> int:
    """How many blocks of ``_RUN`` grid points a grid of ``size`` points has (rows of :func:`build_table`'s lists)."""
    return (size + _RUN - 1) // _RUN


@_jit
def stats_length(size: int, components: int) -> int:
    """float64 numbers :func:`build_table`'s compact statistics take for a grid of ``size`` points."""
    return blocks(size) * _RUN * (2 + components)


@_jit
def _row(k: int, components: int, na: int) -> int:  # pragma: no cover - compiled
    """Where grid point ``k``'s row (``2 + na`` numbers) starts in the flat statistics."""
    block = k // _RUN
    return block * _RUN * (2 + components) + (k - block * _RUN) * (2 + na)  # type: ignore[no-any-return]


@_jit_fast
def _block_active(
    means: np.ndarray, prec: np.ndarray, const: np.ndarray, xa: float, xb: float, idx: np.ndarray
) -> int:  # pragma: no cover - compiled
    # The components that matter somewhere in [xa, xb]: component j's share of the mixture there is at most
    # exp(max v_j - max_i min v_i) (v_j = log pi_j + log N(x | mu_j), concave: its minimum over the interval lies at an
    # end), so those with a bound below e^-_NEGLIGIBLE (< 1.1e-16, where _build_kernel drops a share anyway) are left
    # out. The component largest at any point of the interval is always kept. Returns how many, their indices in idx.
    k1 = means.shape[0]
    floor = -1e300
    for j in range(k1):
        da = xa - means[j]
        db = xb - means[j]
        floor = max(floor, const[j] - 0.5 * prec[j] * max(da * da, db * db))
    na = 0
    for j in range(k1):
        d = 0.0 if xa <= means[j] <= xb else min(abs(xa - means[j]), abs(xb - means[j]))
        if const[j] - 0.5 * prec[j] * d * d - floor > -_NEGLIGIBLE:
            idx[na] = j
            na += 1
    return na


@_jit_fast
def _build_kernel(
    means: np.ndarray, prec: np.ndarray, const: np.ndarray, lo: float, h: float, subbins: int,
    table: np.ndarray, stats: np.ndarray, active: np.ndarray, k_start: int, k_end: int, work: np.ndarray,
) -> None:  # pragma: no cover - compiled
    # On a uniform grid each Gaussian term follows a recurrence: with d = x - mu and e(x) = exp(log pi + log N(x)),
    # e(x + h) = e(x) * rho(x) and rho(x + h) = rho(x) * q, rho(x) = exp(-p h d - p h^2 / 2), q = exp(-p h^2): two
    # multiplications instead of an exp per grid point and component (which, unvectorised without SVML, were two thirds
    # of the build: 1.1 ms on a trained LeNet-300-100 mixture of 12,417 points). The terms are re-anchored with exact
    # exps every run of at most _RUN points, scaled by the largest at the anchor; a run is shortened until no term's
    # log changes by more than _DRIFT along it, so nothing overflows and the rounding drift stays ~1e-14 relative.
    # Only the components that matter in a block of _RUN points are carried (_block_active): a trained mixture's narrow
    # components leave ~3 of 17 per point, and the build was the prior's largest cost there (BENCHMARKS.md, session 16).
    # stats is flat and compact: block b's region starts at b * _RUN * (J+3) and holds, per point, m and s
    # (log p = m + log s), then the responsibilities of the block's components in the order active[b, 1:] lists them
    # (na = active[b, 0] of them): rows of 2 + na numbers (_row), the rest of the region never written, so that the
    # memory written and read back is that of ~3 components, not J+1 (writing the dense rows was a third of the
    # build's time on that mixture). The log of each point's sum is left to _bin_kernel, which needs it only where
    # weights lie.
    # Grid points k_start <= k < k_end are written (the table's cells among them, and the lists of the blocks they
    # start), computing one more point for the last cell's right end. Runs never cross a block, so a range starting at
    # a block is computed exactly as in the whole grid: the team's threads (_team_build_worker) write what one thread
    # would, bit for bit.
    # work: work_length(J+1, k_end - k_start) float64 of scratch (no allocation: it also runs in a cfunc).
    n = table.shape[0] // subbins + 1
    k1 = means.shape[0]
    q = work[:k1]
    e = work[k1 : 2 * k1]  # per active component, in the block's order
    rho = work[2 * k1 : 3 * k1]
    qa = work[3 * k1 : 4 * k1]
    ma = work[4 * k1 : 5 * k1]
    pa = work[5 * k1 : 6 * k1]
    ca = work[6 * k1 : 7 * k1]
    idx = work[7 * k1 : 8 * k1]
    g = work[8 * k1 :]
    last = min(k_end + 1, n)
    for j in range(k1):
        q[j] = math.exp(-prec[j] * h * h)
    block = -1
    na = 0
    k = k_start
    while k < last:
        x0 = lo + k * h
        if k // _RUN != block:
            block = k // _RUN
            first = block * _RUN
            na = _block_active(means, prec, const, lo + first * h, lo + min(first + _RUN - 1, n - 1) * h, idx)
            keep_list = k < k_end
            if keep_list:
                active[block, 0] = na
            for a in range(na):
                j = int(idx[a])
                if keep_list:
                    active[block, 1 + a] = j
                qa[a] = q[j]
                ma[a] = means[j]
                pa[a] = prec[j]
                ca[a] = const[j]
        run = _RUN - k % _RUN
        for a in range(na):
            da = pa[a] * h * abs(x0 - ma[a])
            c = 0.5 * pa[a] * h * h
            while run > 1 and run * (da + run * c) > _DRIFT:
                run //= 2
        mx = -1e300
        for a in range(na):
            d = x0 - ma[a]
            v = ca[a] - 0.5 * pa[a] * d * d
            e[a] = v
            mx = max(mx, v)
        for a in range(na):
            v = e[a] - mx
            e[a] = math.exp(v) if v > -700.0 else 0.0
            # within +-700 whatever the run (a run of one point never uses it; longer ones keep it within +-_DRIFT)
            rho[a] = math.exp(min(max(-pa[a] * h * (x0 - ma[a]) - 0.5 * pa[a] * h * h, -700.0), 700.0))
        end = min(k + run, last)
        for kk in range(k, end):
            x = lo + kk * h
            s = 0.0
            for a in range(na):
                s += e[a]
            inv = 1.0 / s
            keep = kk < k_end
            row = _row(kk, k1, na)
            if keep:
                stats[row] = mx
                stats[row + 1] = s
            gk = 0.0
            for a in range(na):
                r = e[a] * inv
                r = r if r > 1.1e-16 else 0.0  # below 2^-53 of the sum: lost in it; zeros are skipped when summing
                if keep:
                    stats[row + 2 + a] = r  # r d and r d^2 are formed in _bin_kernel: a third of the memory traffic
                gk += r * (x - ma[a]) * pa[a]
                e[a] *= rho[a]
                rho[a] *= qa[a]
            g[kk - k_start] = gk
        k = end
    for k in range(k_start, min(k_end, n - 1)):
        gk = g[k - k_start]
        slope = (g[k + 1 - k_start] - gk) / subbins
        for s_ in range(subbins):
            table[k * subbins + s_, 0] = gk + s_ * slope
            table[k * subbins + s_, 1] = slope


@_jit
def _component_terms_kernel(
    lp: np.ndarray, lpi: np.ndarray, prec: np.ndarray, const: np.ndarray
) -> float:  # pragma: no cover - compiled
    half_log_2pi = 0.5 * math.log(2.0 * math.pi)
    lp_max = lp[0]
    for j in range(lp.shape[0]):
        prec[j] = math.exp(lp[j])
        const[j] = lpi[j] + 0.5 * lp[j] - half_log_2pi
        lp_max = max(lp_max, lp[j])
    return lp_max


def component_terms(lp: np.ndarray, lpi: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """``(precisions, log pi_j + log N(mu_j | mu_j) constants, max log precision)`` of a mixture's float64
    ``(J+1,)`` log precisions and log mixing weights, in one call (four NumPy operations took ~10 us)."""
    prec, const = np.empty(lp.shape[0]), np.empty(lp.shape[0])
    lp_max = _component_terms_kernel(lp, lpi, prec, const)
    return prec, const, float(lp_max)


def build_table(
    means: np.ndarray, prec: np.ndarray, const: np.ndarray, lo: float, h: float, size: int, subbins: int,
    out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Tabulate the mixture (float64 ``(J+1,)`` means, precisions and ``log pi_j + log N`` constants) at
    ``lo + k h``, ``k < size``, in float64.

    Returns:
        ``(table, stats, active)``: ``table`` ``((size - 1) * subbins, 2)`` float32 holds, per sub-cell, the
        interpolated gradient at its start and its slope per sub-cell unit. ``stats`` (flat float64,
        :func:`stats_length`) holds, at each grid point, ``m`` and ``s`` with ``log p = m + log s``, then the
        responsibilities of the components that matter in the point's block of ``_RUN`` points, in the order of
        ``active[k // _RUN, 1:]`` (``active[k // _RUN, 0]`` of them, the others being below 1e-16 there), compactly
        (:func:`point_stats` expands them); :func:`bin_sums` forms ``-log p``, ``r_j d_j`` and ``r_j d_j^2`` from them
        where weights lie. ``active`` is ``(blocks(size), 1 + (J+1))`` int32. Written into ``out`` (flat float32,
        float64 and int32 buffers at least that long, kept by the caller: fresh megabyte-sized arrays every step cost
        page faults) when given.

    A grid of at least ``_TEAM_MIN_TABLE`` points x components (a trained mixture's narrow components ask for 10k+
    points) is built in blocks of ``_RUN`` points split over torch's OpenMP threads (:func:`build_team_size`; the
    reasons beside :class:`TeamPass`), giving the same numbers bit for bit.
    """
    k1 = means.shape[0]
    nb = blocks(size)
    if out is None:
        table = np.empty(((size - 1) * subbins, 2), dtype=np.float32)
        stats = np.empty(stats_length(size, k1), dtype=np.float64)
        active = np.empty((nb, 1 + k1), dtype=np.int32)
    else:
        table = out[0][: (size - 1) * subbins * 2].reshape(-1, 2)
        stats = out[1][: stats_length(size, k1)]
        active = out[2][: nb * (1 + k1)].reshape(nb, 1 + k1)
    threads = build_team_size(size, k1)
    if threads > 1:
        _team_build(threads, means, prec, const, float(lo), float(h), int(subbins), table, stats, active)
    else:
        work = np.empty(work_length(k1, size))
        _build_kernel(means, prec, const, float(lo), float(h), int(subbins), table, stats, active, 0, size, work)
    return torch.from_numpy(table), stats, active


def point_stats(stats: np.ndarray, active: np.ndarray, size: int, components: int) -> np.ndarray:
    """:func:`build_table`'s compact statistics as a dense ``(size, 2 + components)`` array: ``m``, ``s``, then every
    component's responsibility (zero where its block leaves it out). For tests and inspection; the kernels read the
    compact form."""
    dense = np.zeros((size, 2 + components))
    for k in range(size):
        lst = active[k // _RUN]
        row = int(_row(k, components, int(lst[0])))
        dense[k, :2] = stats[row : row + 2]
        dense[k, 2 + lst[1 : 1 + lst[0]]] = stats[row + 2 : row + 2 + lst[0]]
    return dense


_BLOCK = 4096  # weights per block: the block's positions stay in L1 between the two loops


@_jit
def grid_geometry(
    lo: float, hi: float, spacing: float, lp_max: float, min_grid: int, max_grid: int, subbins: int
) -> tuple[float, float, float, int, int, float, float, float]:
    """The grid of a table over ``[lo, hi]`` (padded by 1e-6 of its width; one standard deviation wide if empty) for a
    mixture whose largest log precision is ``lp_max``: spacing ``spacing`` times the smallest standard deviation, at
    least ``min_grid`` and at most ``max_grid`` points. Returns ``(lo, hi, h, points, points needed, 1 / h, u_scale,
    u_max)``: positions in sub-cells are ``u = (w - lo) u_scale``, clamped just inside the last sub-cell at ``u_max``
    (float32 positions have an ulp of up to 1/16 sub-cell on big grids). :class:`distill.priors.MixtureTable` and
    :class:`HostStep` size their grids with it."""
    sigma_min = math.exp(-0.5 * lp_max)
    if not hi > lo:
        hi = lo + sigma_min
    pad = 1e-6 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    needed = int(math.ceil((hi - lo) / (spacing * sigma_min)) + 1)
    n = min(max(needed, min_grid), max_grid)
    inv_h = (n - 1) / (hi - lo)
    n_fine = (n - 1) * subbins
    u_max = float(n_fine) - max(1e-3, 4.0 * math.ldexp(1.0, math.frexp(float(n_fine))[1] - 24))
    return lo, hi, (hi - lo) / (n - 1), n, needed, inv_h, inv_h * subbins, u_max


@_jit
def pass_range(lo: float, cell: float, first: int, last: int, outside: np.ndarray) -> tuple[float, float]:
    """The weights' range as a pass over a grid starting at ``lo`` saw it: its first and last non-empty sub-cells (of
    width ``cell``; ``first`` -1: none) and the weights outside the grid (``outside``, one row of
    :func:`new_outside`)."""
    k1 = (outside.shape[0] - 4) // 3
    r_lo, r_hi = (lo + first * cell, lo + (last + 1) * cell) if first >= 0 else (np.inf, -np.inf)
    if outside[1 + 3 * k1]:
        r_lo, r_hi = min(r_lo, outside[2 + 3 * k1]), max(r_hi, outside[3 + 3 * k1])
    return r_lo, r_hi


@_jit
def outside_length(components: int) -> int:
    """float64 numbers of the sums over the weights outside a table (:func:`new_outside`)."""
    return 4 + 3 * components


def new_outside(components: int, rows: int = 1) -> np.ndarray:
    """Zeroed sums for the weights outside a table's range, ``(rows, outside_length)``: ``-log p``, ``r_j``,
    ``r_j d_j``, ``r_j d_j^2`` (as :func:`bin_sums`), then how many weights, their minimum and maximum."""
    out = np.zeros((rows, outside_length(components)))
    reset_outside(out)
    return out


@_jit
def reset_outside(out: np.ndarray) -> None:  # pragma: no cover - compiled
    """Zero the rows of :func:`new_outside` sums in place."""
    k = out.shape[1]
    for r in range(out.shape[0]):
        for i in range(k - 2):
            out[r, i] = 0.0
        out[r, k - 2] = np.inf
        out[r, k - 1] = -np.inf


@_jit
def _exact_point(x: float, mix: np.ndarray, out: np.ndarray) -> float:  # pragma: no cover - compiled
    """``d(-log p)/dw`` at one weight, exactly (float64), its terms added to ``out`` (:func:`new_outside`'s layout).

    ``mix``: ``(3, J+1)`` float64 means, precisions and ``log pi_j + log N(mu_j | mu_j)`` constants. For the weights
    the table does not cover; a NaN or infinite weight makes every sum NaN (no fast math here). The log terms are
    formed twice rather than kept: this runs for a few weights a step, and needs no scratch."""
    k1 = mix.shape[1]
    m = -np.inf
    for j in range(k1):
        d = x - mix[0, j]
        v = mix[2, j] - 0.5 * mix[1, j] * d * d
        if v > m:
            m = v
    s = 0.0
    for j in range(k1):
        d = x - mix[0, j]
        s += math.exp(mix[2, j] - 0.5 * mix[1, j] * d * d - m)
    inv = 1.0 / s
    g = 0.0
    for j in range(k1):
        d = x - mix[0, j]
        r = math.exp(mix[2, j] - 0.5 * mix[1, j] * d * d - m) * inv
        g += r * d * mix[1, j]
        out[1 + j] += r
        out[1 + k1 + j] += r * d
        out[1 + 2 * k1 + j] += r * d * d
    out[0] -= m + math.log(s)
    out[1 + 3 * k1] += 1.0
    if x < out[2 + 3 * k1]:
        out[2 + 3 * k1] = x
    if x > out[3 + 3 * k1]:
        out[3 + 3 * k1] = x
    return g


@_jit_nan_safe
def _positions(
    w: np.ndarray, cell: np.ndarray, frac: np.ndarray, u_scale: np.float32, u_offset: np.float32, u_max: np.float32,
    w_lo: np.float32, w_hi: np.float32,
) -> None:  # pragma: no cover - compiled
    # cell -1: the weight is outside [w_lo, w_hi] or NaN (the comparisons are false for NaN: no fast-math NaN
    # assumption in this loop), and goes to the exact path; its position is never read
    zero = np.float32(0.0)
    for i in range(w.shape[0]):
        wi = w[i]
        u = min(max(wi * u_scale + u_offset, zero), u_max)
        f = np.int32(u)  # truncation = floor for these non-negative positions
        cell[i] = f if (wi >= w_lo) & (wi <= w_hi) else np.int32(-1)
        frac[i] = u - np.float32(f)


@_jit_nan_safe
def _gather_count(
    grad: np.ndarray, cell: np.ndarray, frac: np.ndarray, table: np.ndarray, counts: np.ndarray, alpha: np.float32,
    w: np.ndarray, mix: np.ndarray, outside: np.ndarray,
) -> None:  # pragma: no cover - compiled
    # table: the (start, slope) pairs as complex64, one 8-byte load instead of two (the loop is bound by its loads)
    for i in range(grad.shape[0]):
        f = cell[i]
        if f < 0:  # outside the table: exact, into the separate sums (rare: the table spans last step's range)
            grad[i] += np.float32(alpha * _exact_point(float(w[i]), mix, outside))
            continue
        entry = table[f]
        grad[i] += alpha * (entry.real + frac[i] * entry.imag)
        counts[f] += 1


@_jit_nan_safe
def _accumulate_blocks(
    w: np.ndarray, grad: np.ndarray, table: np.ndarray, counts: np.ndarray, cell: np.ndarray, frac: np.ndarray,
    consts: np.ndarray, mix: np.ndarray, outside: np.ndarray,
) -> None:  # pragma: no cover - compiled
    # two loops per block: the positions vectorise (SIMD), the gathers and the histogram cannot; fused in one loop,
    # neither does (measured: 20% slower), and over the whole tensor the positions would leave the cache.
    # cell, frac: scratch of _BLOCK each (given, not allocated: the team's workers run this in a cfunc).
    # consts: float32 u_scale, u_offset, u_max, alpha, and the range [w_lo, w_hi] the table covers; a weight outside
    # it (or NaN) gets its exact gradient and its terms in `outside` (mix: (3, J+1) float64, see _exact_point)
    n = w.shape[0]
    for start in range(0, n, _BLOCK):
        end = min(start + _BLOCK, n)
        m = end - start
        _positions(w[start:end], cell[:m], frac[:m], consts[0], consts[1], consts[2], consts[4], consts[5])
        _gather_count(grad[start:end], cell[:m], frac[:m], table, counts, consts[3], w[start:end], mix, outside)


@_jit_nan_safe
def _accumulate_kernel(
    w: np.ndarray, grad: np.ndarray, table: np.ndarray, counts: np.ndarray, consts: np.ndarray, mix: np.ndarray,
    outside: np.ndarray,
) -> None:  # pragma: no cover - compiled
    cell = np.empty(_BLOCK, dtype=np.int32)
    frac = np.empty(_BLOCK, dtype=np.float32)
    _accumulate_blocks(w, grad, table, counts, cell, frac, consts, mix, outside)


def pass_constants(u_scale: float, u_offset: float, u_max: float, alpha: float, w_lo: float, w_hi: float
                   ) -> np.ndarray:
    """The per-weight pass's float32 constants: positions ``u = w u_scale + u_offset`` clamped to ``[0, u_max]``, the
    factor ``alpha`` on the gradient, and the weights' range ``[w_lo, w_hi]`` the table covers (outside: exact)."""
    return np.array([u_scale, u_offset, u_max, alpha, w_lo, w_hi], dtype=np.float32)


@_jit
def block_width(components: int) -> int:
    """float64 numbers per block of grid points in :func:`_bin_blocks`' partial sums."""
    return 5 + 3 * components


@_jit
def _bin_blocks(
    counts: np.ndarray, b_start: int, b_end: int, subbins: int, stats: np.ndarray, active: np.ndarray,
    means: np.ndarray, lo: float, h: float, part: np.ndarray,
) -> None:  # pragma: no cover - compiled
    # The linear-binning sums of the grid blocks b_start <= b < b_end (of _RUN points each) into part[b]: -log p,
    # sum t(1 - t), count, first and last non-empty sub-cell (-1: none) of the block's cells, then r, r d and r d^2
    # of the block's carried components in active[b]'s order. A point's binned weight is formed from the sub-cell
    # counts of its two cells in the order a scan of the whole histogram would add them (the cell before, then its
    # own), so that blocks can be summed on different threads and give the same numbers. No allocation (it also
    # runs on the team's threads in a cfunc).
    n = counts.shape[0] // subbins + 1
    k1 = means.shape[0]
    for block in range(b_start, b_end):
        row = part[block]
        for i in range(row.shape[0]):
            row[i] = 0.0
        row[3] = -1.0
        row[4] = -1.0
        na = active[block, 0]
        first = block * _RUN
        for k in range(first, min(first + _RUN, n)):
            wk = 0.0
            if k >= 1:
                for s_ in range(subbins):
                    cnt = counts[(k - 1) * subbins + s_]
                    if cnt != 0:
                        wk += cnt * ((s_ + 0.5) / subbins)
            if k < n - 1:
                for s_ in range(subbins):
                    f = k * subbins + s_
                    cnt = counts[f]
                    if cnt != 0:
                        t = (s_ + 0.5) / subbins
                        wk += cnt * (1.0 - t)
                        row[1] += cnt * t * (1.0 - t)
                        row[2] += cnt
                        if row[3] < 0.0:
                            row[3] = f
                        row[4] = f
            if wk == 0.0:
                continue
            x = lo + k * h
            r = _row(k, k1, na)
            row[0] -= wk * (stats[r] + math.log(stats[r + 1]))
            for a in range(na):
                wr = wk * stats[r + 2 + a]
                d = x - means[active[block, 1 + a]]
                row[5 + a] += wr
                row[5 + k1 + a] += wr * d
                row[5 + 2 * k1 + a] += wr * d * d


@_jit
def _sum_blocks(
    part: np.ndarray, nb: int, active: np.ndarray, k1: int, out: np.ndarray
) -> tuple[float, float, int, int]:  # pragma: no cover - compiled
    # the blocks' partial sums added in block order into out (-log p, r_j, r_j d_j, r_j d_j^2); returns the count,
    # sum t(1 - t), first and last non-empty sub-cells
    total = 0.0
    spread = 0.0
    first_cell = -1
    last_cell = -1
    for block in range(nb):
        row = part[block]
        if row[2] == 0.0:
            continue
        out[0] += row[0]
        spread += row[1]
        total += row[2]
        if first_cell < 0:
            first_cell = int(row[3])
        last_cell = int(row[4])
        for a in range(active[block, 0]):
            j = active[block, 1 + a]
            out[1 + j] += row[5 + a]
            out[1 + k1 + j] += row[5 + k1 + a]
            out[1 + 2 * k1 + j] += row[5 + 2 * k1 + a]
    return total, spread, first_cell, last_cell


@_jit
def _bin_kernel(
    counts: np.ndarray, subbins: int, stats: np.ndarray, active: np.ndarray, means: np.ndarray, lo: float, h: float,
    out: np.ndarray,
) -> tuple[float, float, int, int]:  # pragma: no cover - compiled
    # returns the count, the sum of t(1 - t), and the first and last sub-cells holding a weight (-1: none)
    n = counts.shape[0] // subbins + 1
    nb = blocks(n)
    part = np.empty((nb, block_width(means.shape[0])))
    _bin_blocks(counts, 0, nb, subbins, stats, active, means, lo, h, part)
    return _sum_blocks(part, nb, active, means.shape[0], out)  # type: ignore[no-any-return]


def bin_sums(
    counts: torch.Tensor, subbins: int, stats: torch.Tensor, active: np.ndarray, means: np.ndarray, lo: float, h: float
) -> tuple[np.ndarray, float]:
    """Linear-binning sums over the weights of ``-log p``, ``r_j``, ``r_j d_j``, ``r_j d_j^2`` (``(1 + 3(J+1),)``,
    with ``d_j = x - mu_j`` at the grid points ``lo + k h``) from the sub-cell histogram and :func:`build_table`'s
    ``stats``, and the mean of ``t(1 - t)`` over the counted weights (for Sheppard's correction)."""
    out = np.zeros(1 + 3 * means.shape[0], dtype=np.float64)
    total, spread, _, _ = _bin_kernel(counts.numpy(), int(subbins), stats.numpy(), active, means, float(lo), float(h),
                                      out)
    return out, float(spread) / max(float(total), 1.0)


@_jit
def _host_pass_kernel(
    ws: Any, gs: Any, table: np.ndarray, counts: np.ndarray, consts: np.ndarray, mix: np.ndarray,
    outside: np.ndarray, subbins: int, stats: np.ndarray, active: np.ndarray, lo: float, h: float, sums: np.ndarray,
) -> tuple[float, float, int, int]:  # pragma: no cover - compiled
    counts[:] = 0
    reset_outside(outside)
    for i in range(len(ws)):
        _accumulate_kernel(ws[i], gs[i], table, counts, consts, mix, outside[0])
    sums[:] = 0.0
    return _bin_kernel(counts, subbins, stats, active, mix[0], lo, h, sums)  # type: ignore[no-any-return]


def host_pass(
    ws: tuple[np.ndarray, ...], gs: tuple[np.ndarray, ...], table: np.ndarray, counts: np.ndarray,
    consts: np.ndarray, mix: np.ndarray, outside: np.ndarray, subbins: int, stats: np.ndarray, active: np.ndarray,
    lo: float, h: float,
) -> tuple[np.ndarray, float, int, int]:
    """The table's fused per-weight work in one compiled call (each Python-level call costs 1-10 us on this path):
    ``gs[i] += alpha * g(ws[i])`` for each pair of flat float32 arrays (``consts``: :func:`pass_constants`), the
    sub-cell histogram (``counts``, zeroed first), then :func:`bin_sums` over it. A weight outside the table's range
    ``[w_lo, w_hi]`` (or NaN) gets its exact gradient from ``mix`` (``(3, J+1)`` float64 means, precisions and
    constants) and its terms in ``outside[0]`` (:func:`new_outside`, reset first) instead of the histogram.

    Returns:
        ``(sums, spread, first, last)``: what :func:`bin_sums` returns, then the first and last sub-cells that hold
        a weight (-1: none).
    """
    sums = np.empty(1 + 3 * mix.shape[1])
    total, spread, first, last = _host_pass_kernel(ws, gs, table, counts, consts, mix, outside, int(subbins), stats,
                                                   active, float(lo), float(h), sums)
    return sums, float(spread) / max(float(total), 1.0), int(first), int(last)


# -- the per-weight pass on torch's own OpenMP team --------------------------------------------------------------------
# Why: when torch runs N > 1 intra-op threads, the network's kernels use every core but the pass above uses one, and
# on LeNet-300-100 it is most of the prior's cost. A second thread pool cannot help: numba's parallel layers bring
# their own OpenMP runtime (or a work queue) whose threads compete for the cores with torch's OpenMP workers, which
# keep spinning for a while after each of torch's parallel regions; split that way the pass was slower inside a
# training step than on one thread (BENCHMARKS.md, sessions 8 and 10). So the pass is handed to the OpenMP runtime
# torch itself loaded, through ``GOMP_parallel`` (libgomp's entry point for GCC's ``#pragma omp parallel``, which
# LLVM's and Intel's runtimes export too), and runs on the very workers that are spinning. Nothing else offers this:
# no library exposes torch's ``at::parallel_for`` to Python. The worker is a numba ``cfunc``; the runtime's
# thread-number functions reach it as addresses in its argument block, so the compiled code holds no
# process-specific pointer and is cached on disk like the other kernels. Each thread takes a contiguous share of
# every tensor and counts into its own histogram row: results are bit-identical to :func:`host_pass` (tested).

_TEAM_MIN_WEIGHTS = 1 << 15  # fewer weights: waking the team costs more than it saves
_ARGS = 25  # the argument block: int64 slots, see _team_worker and _team_build_worker

if AVAILABLE:  # pragma: no branch
    from llvmlite import ir as _ir
    from numba.core import types as _nt
    from numba.extending import intrinsic as _intrinsic

    def _address_intrinsic(ty: Any) -> Any:
        """An intrinsic's typing function: an integer address (or ``void *``) as a typed pointer, for ``carray``."""

        def impl(typingctx: Any, addr: Any) -> Any:
            sig = _nt.CPointer(ty)(addr)

            def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
                llty = context.get_value_type(_nt.CPointer(ty))
                if isinstance(signature.args[0], _nt.Integer):
                    return builder.inttoptr(args[0], llty)
                return builder.bitcast(args[0], llty)

            return sig, codegen

        impl.__name__ = f"_as_{ty}_pointer"
        return impl

    _as_i64 = _intrinsic(_address_intrinsic(_nt.int64))
    _as_i32 = _intrinsic(_address_intrinsic(_nt.int32))
    _as_f32 = _intrinsic(_address_intrinsic(_nt.float32))
    _as_c64 = _intrinsic(_address_intrinsic(_nt.complex64))
    _as_f64 = _intrinsic(_address_intrinsic(_nt.float64))

    @_intrinsic
    def _call_int_fn(typingctx: Any, addr: Any) -> Any:
        """Call the C function ``int f(void)`` at an address (the runtime's ``omp_get_thread_num`` and kin)."""
        sig = _nt.int32(addr)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            fn = builder.inttoptr(args[0], _ir.FunctionType(_ir.IntType(32), []).as_pointer())
            return builder.call(fn, [])

        return sig, codegen

    @_intrinsic
    def _call_void_fn(typingctx: Any, addr: Any) -> Any:
        """Call the C function ``void f(void)`` at an address (the runtime's ``GOMP_barrier``)."""
        sig = _nt.void(addr)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            fn = builder.inttoptr(args[0], _ir.FunctionType(_ir.VoidType(), []).as_pointer())
            builder.call(fn, [])
            return context.get_dummy_value()

        return sig, codegen

    @numba.njit(cache=True, nogil=True)
    def _thread_share(a: np.ndarray, slot: int) -> tuple[int, int]:  # pragma: no cover - compiled
        """``(this thread's number, threads sharing the work)`` in a parallel region; ``a[slot]``, ``a[slot + 1]``: the
        addresses of ``omp_get_thread_num``, ``omp_get_num_threads``; ``a[slot + 2]``: the threads asked for (rows of
        scratch); ``a[0]`` receives the team's size."""
        t = np.int64(_call_int_fn(a[slot]))  # type: ignore[call-arg]
        team = np.int64(_call_int_fn(a[slot + 1]))
        if t == 0:
            a[0] = team
        return t, min(team, a[slot + 2])

    @numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def _team_pass_share(a: np.ndarray, t: int, parts: int) -> None:  # pragma: no cover - compiled
        # thread t's share of the per-weight pass (_team_worker's argument block a)
        nt = a[1]
        wptr = numba.carray(_as_i64(a[2]), (nt,))
        gptr = numba.carray(_as_i64(a[3]), (nt,))
        sizes = numba.carray(_as_i64(a[4]), (nt,))
        table = numba.carray(_as_c64(a[5]), (a[6],))
        n_fine = a[8]
        counts = numba.carray(_as_i32(a[7] + t * n_fine * 4), (n_fine,))
        cell = numba.carray(_as_i32(a[9] + t * _BLOCK * 4), (_BLOCK,))
        frac = numba.carray(_as_f32(a[10] + t * _BLOCK * 4), (_BLOCK,))
        c = numba.carray(_as_f32(a[11]), (6,))
        k1 = a[16]
        mix = numba.carray(_as_f64(a[15]), (3, k1))
        width = outside_length(k1)
        outside = numba.carray(_as_f64(a[17] + t * width * 8), (width,))
        counts[:] = 0
        for k in range(nt):
            n = sizes[k]
            lo = n * t // parts
            hi = n * (t + 1) // parts
            w = numba.carray(_as_f32(wptr[k]), (n,))
            g = numba.carray(_as_f32(gptr[k]), (n,))
            _accumulate_blocks(w[lo:hi], g[lo:hi], table, counts, cell, frac, c, mix, outside)

    @numba.cfunc(_nt.void(_nt.voidptr), cache=True, error_model="numpy")
    def _team_worker(data: Any) -> None:  # pragma: no cover - compiled, runs on the OpenMP threads
        # argument block: 0 team size (out), 1 tensors, 2/3/4 addresses of the weight pointers, gradient pointers and
        # sizes, 5/6 table address and length, 7 histogram rows address, 8 row length, 9/10 per-thread position
        # scratch (cells, fractions), 11 float32 constants (pass_constants), 12/13 the addresses of
        # omp_get_thread_num/omp_get_num_threads, 14 rows available, 15 the mixture ((3, J+1) float64), 16 J+1,
        # 17 the per-thread sums over weights outside the table (rows of outside_length(J+1) float64), 18 the address
        # of GOMP_barrier, 19/20 the table's statistics and lists of components, 21 (lo, h) float64, 22 the blocks'
        # partial sums (rows of block_width(J+1) float64), 23 subbins.
        # Then, after a barrier, each thread merges its share of the histogram's sub-cells into row 0, and after
        # another, bins its share of the grid's blocks (_bin_blocks: the same numbers whatever the split). Every
        # thread of the team reaches both barriers.
        a = numba.carray(_as_i64(data), (_ARGS,))  # type: ignore[call-arg]
        t, parts = _thread_share(a, 12)
        if t < parts:
            _team_pass_share(a, t, parts)
        _call_void_fn(a[18])  # type: ignore[call-arg]
        n_fine = a[8]
        row0 = numba.carray(_as_i32(a[7]), (n_fine,))
        if t < parts:
            f0 = n_fine * t // parts
            f1 = n_fine * (t + 1) // parts
            for r in range(1, parts):
                other = numba.carray(_as_i32(a[7] + r * n_fine * 4), (n_fine,))
                for f in range(f0, f1):
                    row0[f] += other[f]
        _call_void_fn(a[18])  # type: ignore[call-arg]
        if t < parts:
            k1 = a[16]
            subbins = a[23]
            n = n_fine // subbins + 1
            nb = blocks(n)
            stats = numba.carray(_as_f64(a[19]), (stats_length(n, k1),))
            active = numba.carray(_as_i32(a[20]), (nb, 1 + k1))
            lh = numba.carray(_as_f64(a[21]), (2,))
            part = numba.carray(_as_f64(a[22]), (nb, block_width(k1)))
            mix = numba.carray(_as_f64(a[15]), (3, k1))
            _bin_blocks(row0, nb * t // parts, nb * (t + 1) // parts, subbins, stats, active, mix[0], lh[0], lh[1],
                        part)

    @numba.cfunc(_nt.void(_nt.voidptr), cache=True, error_model="numpy")
    def _team_build_worker(data: Any) -> None:  # pragma: no cover - compiled, runs on the OpenMP threads
        # argument block: 0 team size (out), 1/2/3 means, precisions, constants (float64), 4 components, 5 (lo, h)
        # (float64), 6 subbins, 7/8 table address and rows, 9 stats address, 10 grid points, 11/12 per-thread scratch
        # address and length (float64), 13/14 omp_get_thread_num/omp_get_num_threads, 15 threads asked for, 16 the
        # blocks' lists of components (int32, (blocks, 1 + components))
        a = numba.carray(_as_i64(data), (_ARGS,))  # type: ignore[call-arg]
        t, parts = _thread_share(a, 13)
        k1 = a[4]
        n = a[10]
        blocks = (n + _RUN - 1) // _RUN
        k_start = blocks * t // parts * _RUN
        k_end = min(blocks * (t + 1) // parts * _RUN, n)
        if t >= parts or k_start >= k_end:
            return
        means = numba.carray(_as_f64(a[1]), (k1,))
        prec = numba.carray(_as_f64(a[2]), (k1,))
        const = numba.carray(_as_f64(a[3]), (k1,))
        lh = numba.carray(_as_f64(a[5]), (2,))
        table = numba.carray(_as_f32(a[7]), (a[8], 2))
        stats = numba.carray(_as_f64(a[9]), (blocks * _RUN * (2 + k1),))  # stats_length(n, k1)
        work = numba.carray(_as_f64(a[11] + t * a[12] * 8), (a[12],))
        active = numba.carray(_as_i32(a[16]), (blocks, 1 + k1))
        _build_kernel(means, prec, const, lh[0], lh[1], a[6], table, stats, active, k_start, k_end, work)

    @_intrinsic
    def _call_gomp_parallel(typingctx: Any, fn: Any, worker: Any, data: Any, threads: Any) -> Any:
        """``GOMP_parallel(worker, data, threads, 0)`` through its address (all four arguments int64)."""
        sig = _nt.void(_nt.int64, _nt.int64, _nt.int64, _nt.int64)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            i8p = _ir.IntType(8).as_pointer()
            i32 = _ir.IntType(32)
            worker_ty = _ir.FunctionType(_ir.VoidType(), [i8p]).as_pointer()
            fn_ty = _ir.FunctionType(_ir.VoidType(), [worker_ty, i8p, i32, i32]).as_pointer()
            callee = builder.inttoptr(args[0], fn_ty)
            builder.call(callee, [builder.inttoptr(args[1], worker_ty), builder.inttoptr(args[2], i8p),
                                  builder.trunc(args[3], i32), _ir.Constant(i32, 0)])
            return context.get_dummy_value()

        return sig, codegen

    @numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def _team_pass_core(
        nt: int, table_address: int, table_length: int, rows: np.ndarray, cells: np.ndarray, fracs: np.ndarray,
        consts: np.ndarray, pointers: np.ndarray, args: np.ndarray, fns: np.ndarray, threads: int, subbins: int,
        stats: np.ndarray, active: np.ndarray, mix: np.ndarray, outside: np.ndarray, lo: float, h: float,
        sums: np.ndarray,
    ) -> tuple[float, float, int, int, int]:  # pragma: no cover - compiled
        # the pass over nt tensors whose weight and gradient addresses and sizes are pointers' rows, on `threads` of
        # torch's threads (one: on the calling thread), then the merged histogram's sums.
        # fns: GOMP_parallel, _team_worker, omp_get_thread_num, omp_get_num_threads, _team_build_worker, GOMP_barrier
        n_fine = rows.shape[1]
        args[0] = 0
        args[1] = nt
        args[2] = np.int64(pointers[0].ctypes.data)
        args[3] = np.int64(pointers[1].ctypes.data)
        args[4] = np.int64(pointers[2].ctypes.data)
        args[5] = table_address
        args[6] = table_length
        args[7] = np.int64(rows.ctypes.data)
        args[8] = n_fine
        args[9] = np.int64(cells.ctypes.data)
        args[10] = np.int64(fracs.ctypes.data)
        args[11] = np.int64(consts.ctypes.data)
        args[12] = fns[2]
        args[13] = fns[3]
        args[14] = threads
        args[15] = np.int64(mix.ctypes.data)
        args[16] = mix.shape[1]
        args[17] = np.int64(outside.ctypes.data)
        k1 = mix.shape[1]
        nb = active.shape[0]
        part = np.empty((nb, block_width(k1)))
        lh = np.empty(2)
        lh[0] = lo
        lh[1] = h
        args[18] = fns[5]
        args[19] = np.int64(stats.ctypes.data)
        args[20] = np.int64(active.ctypes.data)
        args[21] = np.int64(lh.ctypes.data)
        args[22] = np.int64(part.ctypes.data)
        args[23] = subbins
        reset_outside(outside)
        _call_gomp_parallel(fns[0], fns[1], np.int64(args.ctypes.data), np.int64(threads))  # type: ignore[call-arg]
        parts = min(args[0], threads)
        for r in range(1, parts):
            width = outside.shape[1]
            for i in range(width - 2):
                outside[0, i] += outside[r, i]
            outside[0, width - 2] = min(outside[0, width - 2], outside[r, width - 2])
            outside[0, width - 1] = max(outside[0, width - 1], outside[r, width - 1])
        sums[:] = 0.0
        total, spread, first, last = _sum_blocks(part, nb, active, k1, sums)
        return total, spread, parts, first, last

    @numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def _team_pass_kernel(
        ws: Any, gs: Any, table: np.ndarray, rows: np.ndarray, cells: np.ndarray, fracs: np.ndarray,
        consts: np.ndarray, pointers: np.ndarray, args: np.ndarray, fns: np.ndarray, threads: int, subbins: int,
        stats: np.ndarray, active: np.ndarray, mix: np.ndarray, outside: np.ndarray, lo: float, h: float,
        sums: np.ndarray,
    ) -> tuple[float, float, int, int, int]:  # pragma: no cover - compiled
        for i in range(len(ws)):
            pointers[0, i] = np.int64(ws[i].ctypes.data)
            pointers[1, i] = np.int64(gs[i].ctypes.data)
            pointers[2, i] = ws[i].shape[0]
        return _team_pass_core(len(ws), np.int64(table.ctypes.data), table.shape[0], rows, cells,  # type: ignore[no-any-return]
                               fracs, consts, pointers, args, fns, threads, subbins, stats, active, mix, outside, lo,
                               h, sums)

    @numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def _team_build_core(
        gomp: int, worker: int, thread_num: int, num_threads: int, threads: int, means: np.ndarray,
        prec: np.ndarray, const: np.ndarray, lh: np.ndarray, subbins: int, table: np.ndarray, stats: np.ndarray,
        active: np.ndarray, work: np.ndarray, stride: int, args: np.ndarray,
    ) -> None:  # pragma: no cover - compiled
        # _build_kernel over the grid split over `threads` of torch's threads (_team_build_worker's argument block);
        # means, prec, const: contiguous float64; lh: [lo, h]; work: threads * stride float64 of scratch
        args[0] = 0
        args[1] = np.int64(means.ctypes.data)
        args[2] = np.int64(prec.ctypes.data)
        args[3] = np.int64(const.ctypes.data)
        args[4] = means.shape[0]
        args[5] = np.int64(lh.ctypes.data)
        args[6] = subbins
        args[7] = np.int64(table.ctypes.data)
        args[8] = table.shape[0]
        args[9] = np.int64(stats.ctypes.data)
        args[10] = table.shape[0] // subbins + 1
        args[11] = np.int64(work.ctypes.data)
        args[12] = stride
        args[13] = thread_num
        args[14] = num_threads
        args[15] = threads
        args[16] = np.int64(active.ctypes.data)
        _call_gomp_parallel(gomp, worker, np.int64(args.ctypes.data), np.int64(threads))  # type: ignore[call-arg]


class _Team:
    """torch's OpenMP runtime, found among the loaded libraries: ``GOMP_parallel`` and its thread-number functions."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        self.path = path
        self.parallel = lib.GOMP_parallel
        self.parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        self.parallel.restype = None
        addresses = [ctypes.cast(f, ctypes.c_void_p).value or 0
                     for f in (lib.GOMP_parallel, lib.omp_get_thread_num, lib.omp_get_num_threads, lib.GOMP_barrier)]
        if not all(addresses):
            raise OSError(f"{path}: no address for GOMP_parallel / omp_get_thread_num / omp_get_num_threads / "
                          f"GOMP_barrier")
        self.parallel_address, self.thread_num, self.num_threads, self.barrier = addresses


_TEAM: _Team | None | bool = False  # False: not looked for yet


def _omp_runtime_path() -> str | None:
    """The OpenMP runtime torch's ATen uses, if it can be told apart: Linux, ATen's OpenMP backend, and the runtime
    shipped in torch's own folders (wheels) or the only one loaded (conda, system builds). ``None`` otherwise."""
    if not sys.platform.startswith("linux") or os.environ.get("DISTILL_PRIOR_TEAM", "1") == "0":
        return None
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = {line.split(maxsplit=5)[-1].strip() for line in f if line.count(" ") >= 5}
    except OSError:
        return None
    names = ("libgomp", "libiomp5", "libomp")
    found = sorted(p for p in paths if os.path.basename(p).startswith(names) and ".so" in os.path.basename(p))
    torch_root = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    own = [p for p in found if p.startswith(os.path.join(torch_root, "torch"))]  # torch/lib or torch.libs
    if len(own) == 1:
        return own[0]
    return found[0] if len(found) == 1 else None


def _team() -> _Team | None:
    global _TEAM
    if _TEAM is False:
        path = _omp_runtime_path() if AVAILABLE else None
        try:
            _TEAM = _Team(path) if path else None
        except (OSError, AttributeError):  # not loadable, or not exporting the GOMP entry points
            _TEAM = None
    return _TEAM  # type: ignore[return-value]


_TEAM_MIN_TABLE = 1 << 16  # grid points x components below which the table is built on one thread
_BUILD_SCRATCH = threading.local()  # _team_build's scratch, per calling thread


def _threads_for(work: int, minimum: int) -> int:
    """torch's thread count when there is a team of torch's to run ``work`` units on and ``work >= minimum``, else 1."""
    threads = torch.get_num_threads()
    if threads < 2 or work < minimum or _team() is None:
        return 1
    return threads


def build_team_size(size: int, components: int) -> int:
    """How many of torch's threads :func:`build_table` splits a grid of ``size`` points over (1: one thread)."""
    return _threads_for(size * components, _TEAM_MIN_TABLE)


def _team_build(
    threads: int, means: np.ndarray, prec: np.ndarray, const: np.ndarray, lo: float, h: float, subbins: int,
    table: np.ndarray, stats: np.ndarray, active: np.ndarray,
) -> None:
    """:func:`_build_kernel` over the whole grid, split in blocks of ``_RUN`` points over torch's OpenMP threads."""
    team = _team()
    assert team is not None
    means, prec, const = (np.ascontiguousarray(v, dtype=np.float64) for v in (means, prec, const))
    k1 = means.shape[0]
    n = table.shape[0] // subbins + 1
    # per-thread scratch long enough for the whole grid: a team smaller than asked for gives each thread more of it
    stride = work_length(k1, n)
    work = getattr(_BUILD_SCRATCH, "work", None)
    if work is None or work.shape[0] < threads * stride:
        work = _BUILD_SCRATCH.work = np.empty(threads * stride)  # kept: fresh 100 kB arrays cost page faults
    lh = np.array([lo, h])
    _team_build_core(team.parallel_address, _team_build_worker.address, team.thread_num, team.num_threads, threads,  # type: ignore[arg-type]
                     means, prec, const, lh, subbins, table, stats, active, work, stride,
                     np.zeros(_ARGS, dtype=np.int64))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Within this block the per-weight pass stays on the calling thread, as with ``DISTILL_PRIOR_TEAM=0`` (for
    comparisons: ``benchmarks/bench_prior.py`` times the step both ways)."""
    global _TEAM
    saved = _TEAM
    _TEAM = None
    try:
        yield
    finally:
        _TEAM = saved


def team_size(n_weights: int) -> int:
    """How many of torch's threads :class:`TeamPass` would split ``n_weights`` over (1: run :func:`host_pass`)."""
    return _threads_for(n_weights, _TEAM_MIN_WEIGHTS)


class TeamPass:
    """:func:`host_pass` on torch's OpenMP threads; kept across steps (the argument block and scratch are reused)."""

    def __init__(self) -> None:
        team = _team()
        if team is None:
            raise RuntimeError("no OpenMP runtime of torch's was found (check team_size() first)")
        self.fns = np.array([team.parallel_address, _team_worker.address, team.thread_num, team.num_threads,
                             _team_build_worker.address, team.barrier], dtype=np.int64)
        self.args = np.zeros(_ARGS, dtype=np.int64)
        self.rows = np.zeros(0, dtype=np.int32)
        self.cells = np.zeros(0, dtype=np.int32)
        self.fracs = np.zeros(0, dtype=np.float32)
        self.pointers = np.zeros((3, 0), dtype=np.int64)
        self.outside = np.zeros((0, 0))

    def run(
        self, threads: int, ws: tuple[np.ndarray, ...], gs: tuple[np.ndarray, ...], table: np.ndarray,
        n_fine: int, consts: np.ndarray, mix: np.ndarray, subbins: int, stats: np.ndarray, active: np.ndarray,
        lo: float, h: float,
    ) -> tuple[np.ndarray, np.ndarray, float, int, int, np.ndarray]:
        """``gs[i] += alpha * g(ws[i])`` and the histogram on ``threads`` threads, then :func:`bin_sums`, in one
        compiled call (it fills the worker's argument block and calls ``GOMP_parallel`` itself: each ``.ctypes``
        access and ctypes call from Python costs microseconds). Arguments as :func:`host_pass`'s.

        Returns:
            ``(histogram, sums, spread, first, last, outside)``: the merged sub-cell counts (a view into this
            object's buffer, valid until the next call), what :func:`host_pass` returns, and the merged sums over the
            weights outside the table (:func:`new_outside`'s layout; a view, valid until the next call).
        """
        if self.rows.shape[0] < threads * n_fine:
            self.rows = np.zeros(threads * n_fine, dtype=np.int32)
        if self.cells.shape[0] < threads * _BLOCK:
            self.cells = np.zeros(threads * _BLOCK, dtype=np.int32)
            self.fracs = np.zeros(threads * _BLOCK, dtype=np.float32)
        if self.pointers.shape[1] != len(ws):
            self.pointers = np.zeros((3, len(ws)), dtype=np.int64)
        if self.outside.shape[0] < threads or self.outside.shape[1] != outside_length(mix.shape[1]):
            self.outside = new_outside(mix.shape[1], threads)
        rows = self.rows[: threads * n_fine].reshape(threads, n_fine)
        outside = self.outside[:threads]
        sums = np.empty(1 + 3 * mix.shape[1])
        total, spread, _, first, last = _team_pass_kernel(
            ws, gs, table, rows, self.cells, self.fracs, consts, self.pointers, self.args, self.fns, threads,
            int(subbins), stats, active, mix, outside, float(lo), float(h), sums)
        return rows[0], sums, float(spread) / max(float(total), 1.0), int(first), int(last), outside[0]


# -- the mixture's own (J+1)-vectors ----------------------------------------------------------------------------------
# The parameterisation (means, log mixing weights), its chain rule with the hyper-priors, and Adam on the mixture each
# took 10-40 NumPy calls of 1-3 us on vectors of J + 1 numbers: ~0.3 ms a step together, a quarter of the prior's cost
# on LeNet-300-100. Compiled, each is one call of ~1 us. Without numba they run as Python loops (slower, same result).


@_jit
def _log_softmax(x: np.ndarray, out: np.ndarray, base: float) -> None:  # pragma: no cover - compiled
    """``out[j] = base + log_softmax(x)_j`` in float64 (float(): also for float32 inputs, compiled or not)."""
    mx = -np.inf
    for j in range(x.shape[0]):
        if float(x[j]) > mx:
            mx = float(x[j])
    s = 0.0
    for j in range(x.shape[0]):
        s += math.exp(float(x[j]) - mx)
    log_s = math.log(s)
    for j in range(x.shape[0]):
        out[j] = base + ((float(x[j]) - mx) - log_s)


@_jit
def _host_mixture_kernel(
    free: np.ndarray, lp: np.ndarray, logits: np.ndarray, log_p0: float, log_rest: float,
    means: np.ndarray, lp_out: np.ndarray, lpi: np.ndarray,
) -> bool:  # pragma: no cover - compiled
    k = free.shape[0]
    means[0] = 0.0
    lpi[0] = log_p0
    for j in range(k):
        means[j + 1] = float(free[j])
    _log_softmax(logits, lpi[1:], log_rest)
    for j in range(k + 1):
        lp_out[j] = float(lp[j])
    finite = True
    for j in range(k + 1):
        finite = finite and math.isfinite(means[j]) and math.isfinite(lp_out[j]) and math.isfinite(lpi[j])
    return finite


def host_mixture(
    free: np.ndarray, lp: np.ndarray, logits: np.ndarray, log_p0: float, log_rest: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """``(means, log_precisions, log_pis, all finite)``, float64 arrays, from the free means, log-precisions and
    mixing logits (``log pi_0 = log_p0``, ``log pi_j = log_rest + log_softmax(logits)_j``)."""
    k1 = lp.shape[0]
    means, lp_out, lpi = np.empty(k1), np.empty(k1), np.empty(k1)
    finite = _host_mixture_kernel(free, lp, logits, float(log_p0), float(log_rest), means, lp_out, lpi)
    return means, lp_out, lpi, bool(finite)


@_jit
def _chain_rule_kernel(
    gm: np.ndarray, gl: np.ndarray, gp: np.ndarray, lp: np.ndarray, logits: np.ndarray, z: float, has_z: bool,
    gz_a: float, gz_b: float, g_a: float, g_b: float, beta_a: float, beta_b: float, scale: float,
    g_free: np.ndarray, g_lp: np.ndarray, g_logits: np.ndarray, g_z: np.ndarray,
) -> tuple[float, bool]:  # pragma: no cover - compiled
    k1 = lp.shape[0]
    hyper = 0.0
    finite = True
    # -log Gamma(lambda; a, b) = -(a - 1) log lambda + b lambda + const: d/d log lambda = b lambda - (a - 1)
    for j in range(k1):
        a = gz_a if j == 0 else g_a
        b = gz_b if j == 0 else g_b
        g = gl[j]
        if a > 0.0:
            lam = math.exp(lp[j])
            hyper -= (a * math.log(b) - math.lgamma(a)) + (a - 1.0) * lp[j] - b * lam
            g += b * lam - (a - 1.0)
        g *= scale
        finite = finite and math.isfinite(g)
        g_lp[j] = g
    # log pi_j = log(1 - pi_0) + log_softmax(logits)_j for j >= 1
    rest_sum = 0.0
    for j in range(1, k1):
        rest_sum += gp[j]
    log_soft = np.empty(k1 - 1)
    _log_softmax(logits, log_soft, 0.0)
    for j in range(k1 - 1):
        g = (gp[j + 1] - math.exp(log_soft[j]) * rest_sum) * scale
        finite = finite and math.isfinite(g)
        g_logits[j] = g
        g = gm[j + 1] * scale
        finite = finite and math.isfinite(g)
        g_free[j] = g
    if has_z:
        # log pi_0 = logsigmoid(z), log(1 - pi_0) = logsigmoid(-z); Beta(a, b) hyper-prior on pi_0
        sig = 0.5 * (1.0 + math.tanh(0.5 * z))
        g = gp[0] * (1.0 - sig) - rest_sum * sig
        if beta_a > 0.0:
            log_norm = math.lgamma(beta_a + beta_b) - math.lgamma(beta_a) - math.lgamma(beta_b)
            hyper -= log_norm + (beta_a - 1.0) * math.log(sig) + (beta_b - 1.0) * math.log1p(-sig)
            g -= (beta_a - 1.0) * (1.0 - sig) - (beta_b - 1.0) * sig
        g *= scale
        finite = finite and math.isfinite(g)
        g_z[0] = g
    return hyper, finite and math.isfinite(hyper)


def chain_rule(
    grads: tuple[np.ndarray, np.ndarray, np.ndarray], lp: np.ndarray, logits: np.ndarray, zero_logit: float | None,
    gamma_zero: tuple[float, ...] | None, gamma: tuple[float, ...] | None,
    pi_zero_beta: tuple[float, ...] | None, scale: float, out: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> tuple[float, bool]:
    """The mixture parameters' gradients from the gradients of ``-sum log p(w_i)`` w.r.t. the full ``(J+1,)`` means,
    log precisions and log mixing weights (``grads``), through the parameterisation and the hyper-priors, times
    ``scale``; written into ``out = (free_means, log_precisions, mixing_logits, zero_logit)`` (any float arrays).

    Returns:
        ``(hyper-prior nll, whether every output is finite)``.
    """
    gz, g, beta = gamma_zero or (0.0, 0.0), gamma or (0.0, 0.0), pi_zero_beta or (0.0, 0.0)
    hyper, finite = _chain_rule_kernel(
        grads[0], grads[1], grads[2], lp, logits, 0.0 if zero_logit is None else float(zero_logit),
        zero_logit is not None, float(gz[0]), float(gz[1]), float(g[0]), float(g[1]), float(beta[0]),
        float(beta[1]), float(scale), *out,
    )
    return float(hyper), bool(finite)


@_jit
def _adam_kernel(
    w: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, one_minus_b1: np.float32, b2: np.float32,
    one_minus_b2: np.float32, step_size: np.float32, bc2_sqrt: np.float32, eps: np.float32,
) -> None:  # pragma: no cover - compiled
    # torch's single-tensor Adam in float32, operation for operation: lerp_, mul_ + addcmul_, sqrt / bc2 + eps, addcdiv_
    for i in range(w.shape[0]):
        gi = g[i]
        mi = m[i] + one_minus_b1 * (gi - m[i])
        vi = v[i] * b2 + one_minus_b2 * gi * gi
        m[i] = mi
        v[i] = vi
        w[i] -= step_size * (mi / (np.sqrt(vi) / bc2_sqrt + eps))


def adam_update(
    w: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, beta1: float, beta2: float, step_size: float,
    bc2_sqrt: float, eps: float,
) -> None:
    """One Adam update of float32 arrays in place (flat views), as ``torch.optim.Adam(foreach=False)`` computes it."""
    f = np.float32
    _adam_kernel(w, g, m, v, f(1.0 - beta1), f(beta2), f(1.0 - beta2), f(step_size), f(bc2_sqrt), f(eps))


@_jit
def _adam_all_kernel(
    ws: Any, gs: Any, ms: Any, vs: Any, steps: Any, hp: np.ndarray
) -> None:  # pragma: no cover - compiled
    for i in range(len(ws)):
        steps[i][0] += np.float32(1.0)
        n = float(steps[i][0])
        beta1, beta2 = hp[i, 1], hp[i, 2]
        f = np.float32
        _adam_kernel(ws[i], gs[i], ms[i], vs[i], f(1.0 - beta1), f(beta2), f(1.0 - beta2),
                     f(hp[i, 0] / (1.0 - beta1**n)), f(math.sqrt(1.0 - beta2**n)), f(hp[i, 3]))


def adam_update_all(
    ws: tuple[np.ndarray, ...], gs: tuple[np.ndarray, ...], ms: tuple[np.ndarray, ...], vs: tuple[np.ndarray, ...],
    steps: tuple[np.ndarray, ...], hp: np.ndarray,
) -> None:
    """:func:`adam_update` for several float32 parameters in one call, their step counts (one-number float32 arrays)
    incremented first and the bias corrections computed from them as :class:`torch.optim.Adam` does; ``hp``: float64
    rows ``(lr, beta1, beta2, eps)``, one per parameter."""
    _adam_all_kernel(ws, gs, ms, vs, steps, hp)


# -- the callback's whole CPU step in one compiled call ----------------------------------------------------------------
# Why: inside a training step, right after the backward pass has filled the caches with activations and gradients, the
# prior's Python-level glue (building a MixtureTable, the mixture's small vectors, the chain rule, about 60 calls of
# NumPy, numba's dispatch and tensor attributes) cost ~0.55 ms on LeNet-300-100 at 2 threads, as much as the pass
# over the weights itself, though it takes ~0.1 ms when timed alone (BENCHMARKS.md, session 20). HostStep does the same
# arithmetic as apply_prior_gradient's fused path -- the mixture from its parameters, the table, the pass on torch's
# threads, the binned sums and the chain rule into the mixture's gradients -- in one call, bit for bit (tested).

_F_LOG_P0, _F_LOG_REST, _F_LO, _F_HI, _F_SPACING, _F_ALPHA, _F_SCALE, _F_Z = 0, 1, 2, 3, 4, 5, 6, 7
_F_GAMMA = 8  # 8-13: gamma_zero (a, b), gamma (a, b), pi_zero_beta (a, b); a = 0: none
_F_LENGTH = 14
_I_MIN_GRID, _I_MAX_GRID, _I_SUBBINS, _I_THREADS, _I_AUTO, _I_HAS_Z, _I_TENSORS = 0, 1, 2, 3, 4, 5, 6
_O_NLL, _O_HYPER, _O_FINITE, _O_LO, _O_HI, _O_OUTSIDE, _O_SIZE = 0, 1, 2, 3, 4, 5, 6
_O_LENGTH = 7
STEP_DONE, STEP_MIXTURE_NONFINITE, STEP_GRID_TOO_FINE, STEP_GROW = 0, 1, 2, 3

if AVAILABLE:  # pragma: no branch

    @numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def _step_kernel(
        free: np.ndarray, lp32: np.ndarray, logits: np.ndarray, fv: np.ndarray, iv: np.ndarray,
        table: np.ndarray, stats: np.ndarray, active: np.ndarray, work: np.ndarray, mix: np.ndarray, lh: np.ndarray,
        rows: np.ndarray, cells: np.ndarray, fracs: np.ndarray, consts: np.ndarray, pointers: np.ndarray,
        args: np.ndarray, fns: np.ndarray, outside: np.ndarray, sums: np.ndarray,
        g_free: np.ndarray, g_lp: np.ndarray, g_logits: np.ndarray, g_z: np.ndarray, out: np.ndarray,
    ) -> int:  # pragma: no cover - compiled
        # fv, iv: the _F_* and _I_* settings; fns: GOMP_parallel, _team_worker, omp_get_thread_num,
        # omp_get_num_threads, _team_build_worker, GOMP_barrier (addresses). Returns a STEP_* status; nothing is
        # written to a gradient unless STEP_DONE.
        k1 = lp32.shape[0]
        means, lp, lpi = mix[0], np.empty(k1), np.empty(k1)
        prec, const = mix[1], mix[2]
        if not _host_mixture_kernel(free, lp32, logits, fv[_F_LOG_P0], fv[_F_LOG_REST], means, lp, lpi):
            return STEP_MIXTURE_NONFINITE
        lp_max = _component_terms_kernel(lp, lpi, prec, const)
        subbins = iv[_I_SUBBINS]
        lo, _, h, n, needed, _, u_scale, u_max = grid_geometry(fv[_F_LO], fv[_F_HI], fv[_F_SPACING], lp_max,
                                                               iv[_I_MIN_GRID], iv[_I_MAX_GRID], subbins)
        if iv[_I_AUTO] and needed > n:
            return STEP_GRID_TOO_FINE
        threads = iv[_I_THREADS]
        n_fine = (n - 1) * subbins
        nb = blocks(n)
        build_threads = threads if n * k1 >= _TEAM_MIN_TABLE and threads > 1 else 1
        stride = work_length(k1, n)
        out[_O_SIZE] = n
        if (table.shape[0] < 2 * n_fine or stats.shape[0] < stats_length(n, k1) or active.shape[0] < nb * (1 + k1)
                or rows.shape[0] < threads * n_fine or work.shape[0] < build_threads * stride
                or outside.shape[0] < threads or cells.shape[0] < threads * _BLOCK):
            return STEP_GROW
        tab = table[: 2 * n_fine].reshape((n_fine, 2))
        st = stats[: stats_length(n, k1)]
        act = active[: nb * (1 + k1)].reshape((nb, 1 + k1))
        if build_threads > 1:
            lh[0] = lo
            lh[1] = h
            _team_build_core(fns[0], fns[4], fns[2], fns[3], build_threads, means, prec, const, lh, subbins, tab,
                             st, act, work, stride, args)
        else:
            _build_kernel(means, prec, const, lo, h, subbins, tab, st, act, 0, n, work)
        consts[0] = u_scale
        consts[1] = -lo * u_scale
        consts[2] = u_max
        consts[3] = fv[_F_ALPHA]
        consts[4] = lo
        consts[5] = lo + (n - 1) * h
        total, spread, _, first, last = _team_pass_core(
            iv[_I_TENSORS], np.int64(table.ctypes.data), n_fine, rows[: threads * n_fine].reshape((threads, n_fine)),
            cells, fracs, consts, pointers, args, fns, threads, subbins, st, act, mix, outside[:threads], lo, h, sums)
        # MixtureTable._grads_from_sums: Sheppard's correction on the binned sums, then the exact ones of the
        # weights outside the grid
        spread = spread / max(total, 1.0)
        o = outside[0]
        n_out = o[1 + 3 * k1]
        corr = h * h * spread
        gm, gl, gp = np.empty(k1), np.empty(k1), np.empty(k1)
        nll = sums[0]
        if n_out:
            nll = nll + o[0]
        for j in range(k1):
            r, s, q = sums[1 + j], sums[1 + k1 + j], sums[1 + 2 * k1 + j]
            q = q - r * corr
            if n_out:
                r, s, q = r + o[1 + j], s + o[1 + k1 + j], q + o[1 + 2 * k1 + j]
            gm[j] = -prec[j] * s
            gl[j] = -0.5 * r + 0.5 * prec[j] * q
            gp[j] = -r
        logits64 = np.empty(logits.shape[0])
        for j in range(logits.shape[0]):
            logits64[j] = float(logits[j])
        hyper, finite = _chain_rule_kernel(gm, gl, gp, lp, logits64, fv[_F_Z], iv[_I_HAS_Z] != 0, fv[_F_GAMMA],
                                           fv[_F_GAMMA + 1], fv[_F_GAMMA + 2], fv[_F_GAMMA + 3], fv[_F_GAMMA + 4],
                                           fv[_F_GAMMA + 5], fv[_F_SCALE], g_free, g_lp, g_logits, g_z)
        r_lo, r_hi = pass_range(lo, h / subbins, first, last, o)
        out[_O_NLL] = nll
        out[_O_HYPER] = hyper
        out[_O_FINITE] = 1.0 if finite else 0.0
        out[_O_LO] = r_lo
        out[_O_HI] = r_hi
        out[_O_OUTSIDE] = n_out
        return STEP_DONE


class HostStep:
    """:meth:`distill.callbacks.GMMPrior.apply_prior_gradient`'s fused CPU path in one compiled call per step.

    Holds the buffers and the addresses of the weights; per step the caller writes its gradients' addresses into
    :attr:`grad_addresses`. Needs numba and torch's OpenMP runtime (found as for :class:`TeamPass`); on one thread
    the pass runs on the calling thread.

    Args:
        weights: the flat float32 C-contiguous arrays of the compressed weights (kept: their addresses are used).
        mixture: NumPy views ``(free means, log precisions, mixing logits)`` of the mixture's parameters.
        grads: NumPy views of the same parameters' gradients (written in place), and of the zero logit's (or a
            scratch array of one number).
        spacing, min_grid, max_grid, subbins: as :class:`distill.priors.MixtureTable`'s.
        auto: give up (``STEP_GRID_TOO_FINE``) when the grid would need more than ``max_grid`` points.
        hyper: ``(gamma_zero, gamma, pi_zero_beta)``, each ``(a, b)`` or ``None``.
    """

    def __init__(
        self, weights: list[np.ndarray], mixture: tuple[np.ndarray, np.ndarray, np.ndarray],
        grads: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], spacing: float, min_grid: int, max_grid: int,
        subbins: int, auto: bool, hyper: tuple[tuple[float, ...] | None, ...], has_zero_logit: bool,
    ) -> None:
        team = _team()
        if team is None:
            raise RuntimeError("no OpenMP runtime of torch's was found")
        self.weights, self.mixture, self.grads = weights, mixture, grads
        self.fns = np.array([team.parallel_address, _team_worker.address, team.thread_num, team.num_threads,
                             _team_build_worker.address, team.barrier], dtype=np.int64)
        self.fv = np.zeros(_F_LENGTH)
        self.fv[_F_SPACING] = spacing
        for i, ab in enumerate(hyper):
            if ab is not None:
                self.fv[_F_GAMMA + 2 * i], self.fv[_F_GAMMA + 2 * i + 1] = ab
        self.iv = np.array([min_grid, max_grid, subbins, 1, int(auto), int(has_zero_logit), len(weights)],
                           dtype=np.int64)
        self.pointers = np.zeros((3, len(weights)), dtype=np.int64)
        self.pointers[0] = [w.ctypes.data for w in weights]
        self.pointers[2] = [w.shape[0] for w in weights]
        self.grad_addresses = self.pointers[1]  # the caller writes its gradients' addresses here
        k1 = mixture[1].shape[0]
        self.mix = np.zeros((3, k1))
        self.lh = np.zeros(2)
        self.args = np.zeros(_ARGS, dtype=np.int64)
        self.cells = np.zeros(_BLOCK, dtype=np.int32)
        self.fracs = np.zeros(_BLOCK, dtype=np.float32)
        self.consts = np.zeros(6, dtype=np.float32)
        self.sums = np.zeros(1 + 3 * k1)
        self.out = np.zeros(_O_LENGTH)
        self.table = np.zeros(0, dtype=np.float32)
        self.stats = np.zeros(0)
        self.active = np.zeros(0, dtype=np.int32)
        self.work = np.zeros(0)
        self.rows = np.zeros(0, dtype=np.int32)
        self.outside = new_outside(k1, 1)

    def run(self, lo: float, hi: float, alpha: float, scale: float, log_p0: float, log_rest: float, zero_logit: float,
            threads: int) -> int:
        """One step: ``grad += alpha * d(-log p)/dw`` at the addresses in :attr:`grad_addresses`, the mixture's
        gradients (times ``scale``) into its gradient views, over a table spanning ``[lo, hi]`` (weights beyond it
        exact). Returns a ``STEP_*`` status; the results are in :attr:`out` (``STEP_DONE``)."""
        fv, iv = self.fv, self.iv
        fv[_F_LOG_P0], fv[_F_LOG_REST], fv[_F_LO], fv[_F_HI] = log_p0, log_rest, lo, hi
        fv[_F_ALPHA], fv[_F_SCALE], fv[_F_Z] = alpha, scale, zero_logit
        iv[_I_THREADS] = threads
        while True:
            status = int(_step_kernel(*self.mixture, fv, iv, self.table, self.stats, self.active, self.work, self.mix,
                                      self.lh, self.rows, self.cells, self.fracs, self.consts, self.pointers,
                                      self.args, self.fns, self.outside, self.sums, *self.grads, self.out))
            if status != STEP_GROW:
                return status
            self._grow(int(self.out[_O_SIZE]), threads)

    def _grow(self, n: int, threads: int) -> None:
        """Buffers for a grid of ``n`` points on ``threads`` threads, with half again as much room."""
        k1 = self.mix.shape[1]
        n = n + n // 2
        n_fine = (n - 1) * int(self.iv[_I_SUBBINS])
        self.table = np.zeros(2 * n_fine, dtype=np.float32)
        self.stats = np.zeros(stats_length(n, k1))
        self.active = np.zeros(blocks(n) * (1 + k1), dtype=np.int32)
        self.work = np.zeros(max(threads, 1) * work_length(k1, n))
        self.rows = np.zeros(max(threads, 1) * n_fine, dtype=np.int32)
        self.cells = np.zeros(max(threads, 1) * _BLOCK, dtype=np.int32)
        self.fracs = np.zeros(max(threads, 1) * _BLOCK, dtype=np.float32)
        self.outside = new_outside(k1, max(threads, 1))
