"""The soft weight-sharing prior's per-weight pass on CUDA, as one fused Triton kernel per weight tensor.

Why by hand: on a GPU the prior is a handful of memory-bound passes over the weights, but as ATen ops (the grid
table of :class:`distill.priors.MixtureTable`) it is ~10 kernel launches and two host syncs per megabyte-sized
chunk (``torch.bincount`` reads its input's maximum back to the host): on an H100 it took 16 ms a step on
VGG19-BN, 2.5x the network's own step (BENCHMARKS.md, "On a GPU"). No library provides a fused mixture
log-likelihood gradient; ``torch.compile`` would need a recompile per weight shape and a warm-up of tens of seconds.

A GPU has the arithmetic to spare, so the kernel evaluates the mixture **exactly** for each weight (no table, no
grid, no interpolation error): in one read of ``w`` and one read-modify-write of its gradient it computes, in float32,

* ``grad += alpha * d(-log p(w))/dw = alpha * sum_j r_j(w) prec_j (w - mu_j)``;
* the sums over weights that the mixture's gradients need, ``-log p(w)``, ``R_j = sum r_j``, ``S_j = sum r_j d_j``,
  ``Q_j = sum r_j d_j^2`` (``d_j = w - mu_j``): each row of a program's tile sums its weights in float32 (a few
  thousand per row for VGG19-BN's largest tensor), the rows and programs are summed in float64 (one atomic add per
  statistic per program: a few hundred programs, not one per weight, so no contention).

The components live in registers (``J + 1 <= 64``), the weights stream through once. Under ``TRITON_INTERPRET=1``
the same kernel runs on CPU tensors (the tests use that to check its arithmetic on a machine without a GPU).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings

import torch

from distill.errors import first_line

MAX_COMPONENTS = 64
# weights per iteration of a program ((BLOCK, KP) tiles of the components in registers), warps per program, programs
# per streaming multiprocessor: the fastest of 18 settings on an H100, 2.1 ms for VGG19-BN's 38.9M weights (2.2-4.0 ms
# for the others; BENCHMARKS.md). DISTILL_PRIOR_CUDA_TILE="block,warps,waves" overrides them.
_BLOCK, _WARPS, _WAVES = (int(v) for v in os.environ.get("DISTILL_PRIOR_CUDA_TILE", "128,4,4").split(","))


try:  # a CUDA build of torch brings Triton; a CPU-only install may not have it (then this module is unused)
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the install
    triton = None


def available(device: torch.device) -> bool:
    """Whether the fused kernel can run on ``device``: a CUDA device, Triton installed, and the kernel compiled and
    ran there once (a GPU that Triton does not support, for example, fails that probe: then a warning says so, once per
    device, and the caller keeps its ATen path: for ``GMMPrior`` the interpolated table, ~1e-5 from exact)."""
    if device.type != "cuda" or triton is None:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    failure = _probe(index)
    if failure is not None and index not in _WARNED:
        _WARNED.add(index)
        warnings.warn(f"GMMPrior: the fused CUDA kernel (distill.prior_cuda) does not run on cuda:{index} ({failure}); "
                      f"the prior runs as ATen ops there (slower; the interpolated table, ~1e-5 from exact)",
                      RuntimeWarning, stacklevel=2)
    return failure is None


_WARNED: set[int] = set()


@functools.cache
def _probe(index: int) -> str | None:
    """Compile and run the kernel once on ``cuda:index`` (float32, two components): ``None``, or the error's line."""
    try:
        dev = torch.device("cuda", index)
        w = torch.linspace(-1.0, 1.0, 256, device=dev)
        g = torch.zeros_like(w)
        out = torch.zeros(7, dtype=torch.float64, device=dev)
        comp = torch.tensor([0.0, 0.5, 4.0, 4.0, -1.0, -1.0], device=dev)
        accumulate(w, g, comp, out, 1.0)
        torch.cuda.synchronize(dev)
        if not bool(torch.isfinite(out).all()):
            return "its probe gave non-finite sums"
    except Exception as err:  # compile or launch failure: any kind, reported and left to the ATen path
        return f"{type(err).__name__}: {first_line(err)}"[:300]
    return None


if triton is not None:

    @triton.jit
    def _prior_pass(w_ptr, g_ptr, n, comp_ptr, out_ptr, alpha, K: tl.constexpr, KP: tl.constexpr,
                    BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        # component 0 (the zero component) as a row vector, components 1..K-1 as (BLOCK, KP) tiles: for the
        # default J = 16 the tiles are exactly 16 wide instead of 32 with 15 padding columns
        mu0 = tl.load(comp_ptr)
        prec0 = tl.load(comp_ptr + K)
        const0 = tl.load(comp_ptr + 2 * K)
        kk = tl.arange(0, KP)
        kmask = kk < K - 1
        mu = tl.load(comp_ptr + 1 + kk, mask=kmask, other=0.0)
        prec = tl.load(comp_ptr + K + 1 + kk, mask=kmask, other=0.0)
        const = tl.load(comp_ptr + 2 * K + 1 + kk, mask=kmask, other=float("-inf"))  # log pi_j + log N(0|0, 1/prec_j)
        # per-row accumulators, reduced over rows once at the end (a reduction across the rows of a tile is a
        # round trip through shared memory; doing three of them per tile took most of the kernel's time)
        acc_r = tl.zeros([BLOCK, KP], dtype=tl.float32)
        acc_s = tl.zeros([BLOCK, KP], dtype=tl.float32)
        acc_q = tl.zeros([BLOCK, KP], dtype=tl.float32)
        acc_r0 = tl.zeros([BLOCK], dtype=tl.float32)
        acc_s0 = tl.zeros([BLOCK], dtype=tl.float32)
        acc_q0 = tl.zeros([BLOCK], dtype=tl.float32)
        acc_nll = tl.zeros([BLOCK], dtype=tl.float32)
        rows = tl.arange(0, BLOCK)
        for start in range(pid * BLOCK, n, nprog * BLOCK):
            offs = start + rows
            m = offs < n
            g = tl.load(g_ptr + offs, mask=m, other=0.0)
            w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
            d0 = w - mu0
            logj0 = const0 - 0.5 * prec0 * d0 * d0
            d = w[:, None] - mu[None, :]  # (BLOCK, KP)
            logj = const[None, :] - 0.5 * prec[None, :] * d * d
            mx = tl.maximum(tl.max(logj, axis=1), logj0)
            e = tl.exp(logj - mx[:, None])
            e0 = tl.exp(logj0 - mx)
            s = tl.sum(e, axis=1) + e0
            inv = tl.where(m, 1.0 / s, 0.0)  # rows past n count for nothing
            r = e * inv[:, None]
            r0 = e0 * inv
            rd = r * d
            rd0 = r0 * d0
            gw = tl.sum(rd * prec[None, :], axis=1) + rd0 * prec0
            tl.store(g_ptr + offs, (g.to(tl.float32) + alpha * gw).to(g.dtype), mask=m)
            acc_r += r
            acc_s += rd
            acc_q += rd * d
            acc_r0 += r0
            acc_s0 += rd0
            acc_q0 += rd0 * d0
            acc_nll += tl.where(m, mx + tl.log(s), 0.0)
        # float32 per row (each row sums n / (programs * BLOCK) weights), float64 across rows and programs
        tl.atomic_add(out_ptr, -tl.sum(acc_nll.to(tl.float64), axis=0))
        tl.atomic_add(out_ptr + 1, tl.sum(acc_r0.to(tl.float64), axis=0))
        tl.atomic_add(out_ptr + 1 + K, tl.sum(acc_s0.to(tl.float64), axis=0))
        tl.atomic_add(out_ptr + 1 + 2 * K, tl.sum(acc_q0.to(tl.float64), axis=0))
        tl.atomic_add(out_ptr + 2 + kk, tl.sum(acc_r.to(tl.float64), axis=0), mask=kmask)
        tl.atomic_add(out_ptr + 2 + K + kk, tl.sum(acc_s.to(tl.float64), axis=0), mask=kmask)
        tl.atomic_add(out_ptr + 2 + 2 * K + kk, tl.sum(acc_q.to(tl.float64), axis=0), mask=kmask)

def _programs(device: torch.device, n: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:  # TRITON_INTERPRET=1 on CPU tensors (tests)
        sms = 2
    return max(1, min(math.ceil(n / _BLOCK), _WAVES * sms))


def components(means: torch.Tensor, prec: torch.Tensor, const: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The mixture packed for :func:`accumulate`: ``[means, precisions, constants]``, float32, on ``device``."""
    return torch.cat([means.reshape(-1), prec.reshape(-1), const.reshape(-1)]).to(device, torch.float32)


def accumulate(w: torch.Tensor, grad: torch.Tensor, comp: torch.Tensor, out: torch.Tensor, alpha: float) -> None:
    """``grad += alpha * d(-log p(w))/dw`` and ``out += [sum -log p, R_j, S_j, Q_j]`` for every weight of ``w``.

    Args:
        w: the weights (any float dtype, contiguous); ``grad`` their gradient, same shape, contiguous.
        comp: :func:`components` of the mixture, ``(3 (J+1),)`` float32 on ``w``'s device.
        out: float64 accumulator ``(1 + 3 (J+1),)`` on ``w``'s device (zeroed by the caller before the first call).
        alpha: scale of the gradient added (``tau / N``).
    """
    k = comp.numel() // 3
    if not 1 <= k <= MAX_COMPONENTS:
        raise ValueError(f"the fused CUDA prior takes 1..{MAX_COMPONENTS} components, got {k}")
    if not (w.is_contiguous() and grad.is_contiguous()):
        raise ValueError("the fused CUDA prior needs contiguous weights and gradients")
    n = w.numel()
    if n == 0:
        return
    kp = max(16, 1 << max(k - 2, 0).bit_length())  # components 1..k-1 in a power-of-two tile
    grid = (_programs(w.device, n),)
    # Triton launches on the current device and stream: make that the tensors' device (weights on cuda:1 while
    # cuda:0 is current would otherwise run on the wrong GPU, unordered with the backward pass)
    with torch.cuda.device(w.device) if w.device.type == "cuda" else contextlib.nullcontext():
        _prior_pass[grid](w.detach().view(-1), grad.view(-1), n, comp, out, float(alpha), K=k, KP=kp, BLOCK=_BLOCK,
                          num_warps=_WARPS)
