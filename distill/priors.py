"""The Gaussian-mixture prior of soft weight-sharing: pure functions and a small ``nn.Module``.

Ullrich, Meeds & Welling, "Soft Weight-Sharing for Neural Network Compression" (ICLR 2017). All compressed weights
``w_1..w_N`` share one mixture of ``J + 1`` Gaussians; component 0 has its mean fixed at 0 and a large mixing weight
``pi_0`` so most weights collapse onto it (pruning), the other ``J`` components become the shared values
(quantization).

.. math::

    p(w) = \\sum_{j=0}^{J} \\pi_j \\, \\mathcal{N}(w \\mid \\mu_j, \\lambda_j^{-1}), \\qquad
    \\mathcal{L}_{prior} = -\\sum_i \\log p(w_i) - \\sum_j \\log \\mathrm{Gamma}(\\lambda_j \\mid \\alpha_j, \\beta_j)
    \\; [- \\log \\mathrm{Beta}(\\pi_0 \\mid a, b)]

The per-weight gradient only depends on the weight itself (given the mixture):

.. math::

    \\frac{\\partial(-\\log p(w))}{\\partial w} = \\sum_j r_j(w) \\, \\lambda_j (w - \\mu_j), \\qquad
    r_j(w) = \\frac{\\pi_j \\mathcal{N}(w \\mid \\mu_j, \\lambda_j^{-1})}{p(w)}

so nothing here materialises an ``N x (J+1)`` tensor: :func:`mixture_nll_grad` works on chunks of weights
(``O(chunk * (J+1))`` extra memory) and :class:`MixtureTable` tabulates the per-weight functions on a fine grid once
per step and interpolates them (``O(grid * (J+1)) + O(N)``), which is what makes the prior cheap next to a
training step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

__all__ = [
    "GaussianMixturePrior",
    "MixtureGrad",
    "MixtureTable",
    "assign_components",
    "beta_log_prob",
    "gamma_log_prob",
    "merge_components",
    "mixture_log_prob",
    "mixture_nll_grad",
    "quantize_weights",
    "responsibilities",
]

_LOG_2PI = math.log(2.0 * math.pi)
_CPU = torch.device("cpu")
_Array = TypeVar("_Array", torch.Tensor, np.ndarray)
DEFAULT_CHUNK = 1 << 16


# ----------------------------------------------------------------------------------------------------------------------
# Densities
# ----------------------------------------------------------------------------------------------------------------------


def _component_log_terms(
    means: torch.Tensor, log_precisions: torch.Tensor, log_pis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log pi_j + log N(.|mu_j, 1/lambda_j)`` splits into ``const_j - 0.5 lambda_j (w - mu_j)^2``."""
    const = log_pis + 0.5 * log_precisions - 0.5 * _LOG_2PI  # (J+1,)
    return const, log_precisions.exp()


def _component_log_joint(w: torch.Tensor, means: torch.Tensor, const: torch.Tensor, prec: torch.Tensor) -> torch.Tensor:
    """``log pi_j N(w_i | mu_j, 1/lambda_j)`` for a chunk of weights: ``(C, J+1)``."""
    d = w.unsqueeze(-1) - means  # (C, J+1)
    return const - 0.5 * prec * d * d


def mixture_log_prob(
    w: torch.Tensor,
    means: torch.Tensor,
    log_precisions: torch.Tensor,
    log_pis: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Log-density of each weight under the mixture, computed in chunks of weights.

    Args:
        w: weights, any shape (flattened).
        means: component means ``(J+1,)``.
        log_precisions: ``log lambda_j`` ``(J+1,)``.
        log_pis: log mixing weights ``(J+1,)`` (normalised).
        chunk_size: weights processed at once (extra memory ``chunk_size * (J+1)``).

    Returns:
        ``log p(w_i)`` with the shape of ``w`` flattened, ``(N,)``.
    """
    const, prec = _component_log_terms(means, log_precisions, log_pis)
    flat = w.reshape(-1)
    out = [torch.logsumexp(_component_log_joint(c, means, const, prec), dim=-1) for c in flat.split(chunk_size)]
    return torch.cat(out) if out else flat.new_zeros(0)


def responsibilities(
    w: torch.Tensor, means: torch.Tensor, log_precisions: torch.Tensor, log_pis: torch.Tensor
) -> torch.Tensor:
    """Posterior probability of each component for each weight, ``(N, J+1)``.

    This one does materialise ``N x (J+1)``: it is for small inputs, plots and tests. Use :func:`assign_components`
    for the most responsible component of many weights.
    """
    const, prec = _component_log_terms(means, log_precisions, log_pis)
    return torch.softmax(_component_log_joint(w.reshape(-1), means, const, prec), dim=-1)


def assign_components(
    w: torch.Tensor,
    means: torch.Tensor,
    log_precisions: torch.Tensor,
    log_pis: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Index of the most responsible component of each weight, ``(N,)`` int64, in chunks."""
    const, prec = _component_log_terms(means, log_precisions, log_pis)
    flat = w.reshape(-1)
    out = [_component_log_joint(c, means, const, prec).argmax(dim=-1) for c in flat.split(chunk_size)]
    return torch.cat(out) if out else flat.new_zeros(0, dtype=torch.long)


def gamma_log_prob(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Log-density of ``Gamma(shape=alpha, rate=beta)`` at ``x > 0`` (elementwise).

    The normalising constant is computed in Python: the prior evaluates this every training step, and tensor ops on
    0-d constants cost more than the density itself.
    """
    log_norm = alpha * math.log(beta) - math.lgamma(alpha)
    return log_norm + (alpha - 1.0) * x.log() - beta * x


def beta_log_prob(x: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Log-density of ``Beta(a, b)`` at ``0 < x < 1`` (elementwise; constant in Python, as :func:`gamma_log_prob`)."""
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    return log_norm + (a - 1.0) * x.log() + (b - 1.0) * torch.log1p(-x)


# ----------------------------------------------------------------------------------------------------------------------
# The analytic gradient of -sum_i log p(w_i)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class MixtureGrad:
    """Value and gradients of ``-sum_i log p(w_i)`` (no hyper-prior, no scaling).

    Attributes:
        nll: ``-sum_i log p(w_i)`` (0-dim).
        grad_w: ``d nll / d w`` per weight, one tensor per input tensor (same shapes).
        grad_means: ``d nll / d mu_j`` ``(J+1,)``.
        grad_log_precisions: ``d nll / d log lambda_j`` ``(J+1,)``.
        grad_log_pis: ``d nll / d log pi_j`` ``(J+1,)`` (treating the log-weights as free; chain through the
            parameterisation with autograd on the ``J+1`` vector).
    """

    nll: torch.Tensor
    grad_w: list[torch.Tensor]
    grad_means: torch.Tensor
    grad_log_precisions: torch.Tensor
    grad_log_pis: torch.Tensor


def _mixture_param_grads(sums: Sequence[_Array] | _Array, prec: _Array) -> tuple[_Array, _Array, _Array]:
    """Gradients of the mixture parameters from ``R_j = sum r``, ``S_j = sum r d``, ``Q_j = sum r d^2`` (d = w - mu);
    torch tensors or NumPy arrays alike."""
    r, s, q = sums  # each (J+1,)
    grad_means = -prec * s
    grad_log_precisions = -0.5 * r + 0.5 * prec * q
    grad_log_pis = -r
    return grad_means, grad_log_precisions, grad_log_pis


def mixture_nll_grad(
    weights: Sequence[torch.Tensor],
    means: torch.Tensor,
    log_precisions: torch.Tensor,
    log_pis: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK,
) -> MixtureGrad:
    """Exact value and gradients of ``-sum_i log p(w_i)``, in chunks of weights (``O(chunk * (J+1))`` memory).

    Computed in the mixture's dtype (use float32 or float64 mixture tensors); weights are cast to it.

    Args:
        weights: the compressed weight tensors.
        means: ``(J+1,)`` component means.
        log_precisions: ``(J+1,)`` log precisions.
        log_pis: ``(J+1,)`` normalised log mixing weights.
        chunk_size: weights processed at once.

    Returns:
        :class:`MixtureGrad`.
    """
    dtype = means.dtype
    const, prec = _component_log_terms(means, log_precisions, log_pis)
    nll = means.new_zeros(())
    sums = means.new_zeros(3, means.numel())
    grads: list[torch.Tensor] = []
    for w in weights:
        flat = w.detach().reshape(-1).to(dtype)
        parts = []
        for c in flat.split(chunk_size):
            d = c.unsqueeze(-1) - means  # (C, J+1)
            logj = const - 0.5 * prec * d * d
            lse = torch.logsumexp(logj, dim=-1, keepdim=True)  # (C, 1)
            r = (logj - lse).exp_()  # responsibilities (C, J+1)
            rd = r * d
            parts.append((rd * prec).sum(-1))
            nll = nll - lse.sum()
            sums[0] += r.sum(0)
            sums[1] += rd.sum(0)
            sums[2] += (rd * d).sum(0)
        g = torch.cat(parts) if parts else flat.new_zeros(0)
        grads.append(g.view_as(w))
    gm, gl, gp = _mixture_param_grads(sums, prec)
    return MixtureGrad(nll, grads, gm, gl, gp)


MIN_GRID, MAX_GRID, SUBBINS = 1024, 1 << 16, 4  # MixtureTable's defaults (also the callback's one-call CPU step's)


class MixtureTable:
    """The per-weight functions of the mixture tabulated on a uniform grid, for fast gradients of many weights.

    Given the mixture, ``d(-log p(w))/dw``, ``-log p(w)`` and the per-component sufficient statistics
    ``r_j(w)``, ``r_j(w)(w - mu_j)``, ``r_j(w)(w - mu_j)^2`` are functions of the single number ``w``. They are
    evaluated exactly (float64) at ``G`` grid points over ``[lo, hi]``; per weight, only a handful of elementwise
    passes remain:

    * per-weight gradient, linearly interpolated: ``g(w) = g[k] + t (g[k+1] - g[k])``, tabulated per sub-cell (below)
      -- two gathers from tables of ``(G - 1) * subbins`` floats (cache-resident for typical grids) and two
      multiply-adds;
    * sums over weights: ``sum_i f(w_i) ~= sum_k c_k f(x_k)`` with ``c`` the linear-binning histogram of the weights.
      Each cell is split into ``subbins`` sub-cells and the weights are counted per sub-cell with one integer
      ``bincount`` (no float scatter); a sub-cell's count is split between the cell's two grid points at its centre.
      The mixture's gradients are then one ``(G, 3(J+1)+1)`` product.

    The grid spacing is ``h = spacing * min_j sigma_j`` (at most ``max_grid`` points; ``needed`` says how many the
    spacing asked for), so the interpolation error is ``O(spacing^2)``: the steepest places are the transitions
    between a narrow component and its neighbours; for the default ``spacing = 0.025`` the relative error of the
    gradients is about ``5e-5`` on a mixture with a 10x narrower zero component (measured in the tests).

    On a CPU with numba installed (``kernel="auto"``), building the table, the per-weight pass and the binned sums
    run as fused loops (:mod:`distill.prior_kernels`): one pass over the weights instead of about ten, split over
    torch's own OpenMP threads when it runs more than one (:class:`~distill.prior_kernels.TeamPass`; a table of more
    than ~4k points is built that way too, bit for bit as on one thread); elsewhere (CUDA,
    16-bit weights, ``kernel="torch"``) the same algorithm runs as plain ATen ops.

    Args:
        means, log_precisions, log_pis: the mixture, ``(J+1,)`` each.
        lo, hi: range of the weights to cover (``lo < hi``).
        spacing: grid spacing in units of the smallest component standard deviation.
        min_grid, max_grid: bounds on the number of grid points.
        chunk_size: weights processed at once in :meth:`accumulate_grad` (extra memory ~28 bytes per chunk weight).
        subbins: sub-cells per cell for the histogram (a power of two). 4: the table of ``(G - 1) * subbins``
            entries and the histogram stay in the L1/L2 caches (8 took 8% longer on LeNet-300-100 for mixture
            gradients ~1.5x closer to exact, both within ~4e-5 of it; 2 moved the prior's loss value ~1e-4).
        workspace: a dict kept by the caller across steps, holding the per-chunk scratch tensors and (fused path) the
            table, statistics and histogram buffers: fresh megabyte-sized allocations every step cost page faults that
            were a third of the prior's time on a CPU. A table built on a workspace is valid until the next one built
            on it (the callback builds one a step).
        kernel: ``"auto"`` (the fused numba loops for CPU float32 tensors when numba is installed, else ATen) or
            ``"torch"`` (ATen ops only).
    """

    def __init__(
        self,
        means: torch.Tensor | np.ndarray,
        log_precisions: torch.Tensor | np.ndarray,
        log_pis: torch.Tensor | np.ndarray,
        lo: float,
        hi: float,
        spacing: float = 0.025,
        min_grid: int = MIN_GRID,
        max_grid: int = MAX_GRID,
        chunk_size: int = 1 << 20,
        subbins: int = SUBBINS,
        workspace: dict[str, Any] | None = None,
        kernel: str = "auto",
    ) -> None:
        if subbins < 1 or subbins & (subbins - 1):
            raise ValueError(f"subbins must be a power of two, got {subbins}")
        if kernel not in ("auto", "torch"):
            raise ValueError(f"kernel must be 'auto' or 'torch', got {kernel!r}")
        self.device = means.device if isinstance(means, torch.Tensor) else _CPU
        # numba is imported here, on the first table built, not with the package (it adds ~0.35 s to every start)
        from distill import prior_kernels

        self._kernels = prior_kernels
        self.fused = kernel == "auto" and prior_kernels.AVAILABLE and self.device.type == "cpu"
        self.chunk = chunk_size
        self.subbins = subbins
        self.fine_counts: torch.Tensor | None = None  # histogram of sub-cell counts, from the first bincount
        self._counted = 0
        self.weight_range: tuple[float, float] | None = None  # set by accumulate_all_host
        self.outside_count = 0  # weights accumulate_all_host found outside the grid (NaN and inf among them)
        self.workspace = workspace if workspace is not None else {}
        self._g_start: torch.Tensor | None = None
        self._slope: torch.Tensor | None = None
        self._offset: torch.Tensor | None = None
        if self.fused:  # the small vectors in NumPy: a torch op on a 17-vector costs more than its arithmetic
            m_np, lp_np, lpi_np = (_host(t) for t in (means, log_precisions, log_pis))
            prec_np, const_np, lp_max = prior_kernels.component_terms(lp_np, lpi_np)
        else:
            # float32 tables for a mixture given as NumPy arrays, as for the callback's float32 mixture tensors
            tensors = [a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a, dtype=np.float32))
                       for a in (means, log_precisions, log_pis)]
            m, lp, lpi = (t.detach().double() for t in tensors)
            lp_max = float(lp.max())
        # positions are measured in sub-cells: u = (w - lo) / h * subbins, clamped just inside the last one at u_max
        lo, hi, h, n, needed, inv_h, u_scale, u_max = prior_kernels.grid_geometry(
            float(lo), float(hi), float(spacing), float(lp_max), int(min_grid), int(max_grid), int(subbins))
        lo, hi, n = float(lo), float(hi), int(n)
        self.needed, self.size = int(needed), n
        self.lo, self.h, self.inv_h = lo, float(h), float(inv_h)
        self._u_scale, self._u_max = float(u_scale), float(u_max)
        n_fine = (n - 1) * subbins
        self.n_fine = n_fine
        # Per sub-cell f (cell k = f // S, position t = frac(u) in [0, 1) within the sub-cell):
        # g(w) = g_start[f] + t * slope[f], the linear interpolation between grid points k and k + 1 written per
        # sub-cell, so that one integer index serves both the gathers and the histogram, and frac() gives the position.
        # stats: columns -log p, then R_j, S_j, Q_j at each grid point: (G, 1 + 3(J+1)) in float64 for the sums
        # (fused: log p as m + log s and the R_j of the components that matter in each block of grid points, listed
        # in self._active; the kernel that sums forms -log p, S_j and Q_j: see prior_kernels.build_table).
        if self.fused:
            self.prec = torch.from_numpy(prec_np)
            k1 = m_np.shape[0]
            out = (self._host_scratch("table", (n - 1) * subbins * 2, np.float32),
                   self._host_scratch("stats", prior_kernels.stats_length(n, k1), np.float64),
                   self._host_scratch("active", prior_kernels.blocks(n) * (1 + k1), np.int32))
            self._table, stats, self._active = self._kernels.build_table(m_np, prec_np, const_np, lo, self.h, n,
                                                                         subbins, out)
            self.stats = torch.from_numpy(stats)  # compact: prior_kernels.point_stats expands it
            self._means = m_np
            # the kernels' views, made once: a tensor -> NumPy conversion costs ~1 us, and a step makes dozens
            self._table_host = self._table.numpy().view(np.complex64).reshape(-1)
            # the per-weight pass's constants (alpha, index 3, is set per call): accumulate_all_host takes the exact
            # path outside the grid's range [lo, lo + (G - 1) h]; accumulate_host clamps there, as the ATen path does
            self._consts = prior_kernels.pass_constants(self._u_scale, -lo * self._u_scale, self._u_max, 0.0, lo,
                                                        lo + (n - 1) * self.h)
            self._consts_clamped = prior_kernels.pass_constants(self._u_scale, -lo * self._u_scale, self._u_max, 0.0,
                                                                -np.inf, np.inf)
            mix = self._host_scratch("mix", 3 * k1, np.float64)[: 3 * k1].reshape(3, k1)
            mix[0], mix[1], mix[2] = m_np, prec_np, const_np
            self._mix = mix  # (3, J+1): the exact path's mixture
            self._dtype = torch.float32
        else:
            const, prec = _component_log_terms(m, lp, lpi)
            self.prec = prec
            x = torch.linspace(lo, hi, n, dtype=torch.float64, device=self.device)
            d = x.unsqueeze(-1) - m  # (G, J+1)
            logj = torch.addcmul(const, d * d, prec, value=-0.5)
            lse = torch.logsumexp(logj, dim=-1, keepdim=True)
            r = logj.sub_(lse).exp_()
            rd = r * d
            g = rd @ prec
            slope = torch.diff(g) / subbins  # (G-1,) per sub-cell unit
            steps = torch.arange(subbins, dtype=torch.float64, device=self.device)
            self._dtype = tensors[0].dtype
            self._g_start = (g[:-1, None] + steps * slope[:, None]).reshape(-1).to(self._dtype).contiguous()
            self._slope = slope.repeat_interleave(subbins).to(self._dtype).contiguous()
            self.stats = torch.cat([-lse, r, rd, rd * d], dim=-1)
            self._offset = torch.tensor(-lo * self._u_scale, dtype=self._dtype, device=self.device)

    # built on first use in the fused mode, whose per-weight pass reads the interleaved table instead
    @property
    def g_start(self) -> torch.Tensor:
        """Interpolated gradient at the start of each sub-cell, ``((G - 1) * subbins,)``."""
        if self._g_start is None:
            self._g_start = self._table[:, 0]
        return self._g_start

    @property
    def slope(self) -> torch.Tensor:
        """Gradient slope per sub-cell unit in each sub-cell, ``((G - 1) * subbins,)``."""
        if self._slope is None:
            self._slope = self._table[:, 1]
        return self._slope

    @property
    def _u_offset_t(self) -> torch.Tensor:
        if self._offset is None:
            self._offset = torch.tensor(-self.lo * self._u_scale, dtype=self._dtype, device=self.device)
        return self._offset

    def _host_scratch(self, name: str, n: int, dtype: type) -> np.ndarray:
        """A flat NumPy buffer of at least ``n`` elements from the workspace (grown by half again when too short)."""
        buf = self.workspace.get("host_" + name)
        if buf is None or buf.shape[0] < n or buf.dtype != dtype:
            buf = np.empty(n + n // 2, dtype=dtype)
            self.workspace["host_" + name] = buf
        return buf  # type: ignore[no-any-return]

    def _scratch(self, name: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self.workspace.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(max(n, min(self.chunk, 1 << 16)), dtype=dtype, device=device)
            self.workspace[name] = buf
        return buf[:n]

    def _locate(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sub-cell index ``f`` (int32) and position ``t`` in it, ``[0, 1)``, of each weight (clamped to the grid:
        weights beyond ``[lo, hi]`` get the edge values). Four elementwise passes.

        int32, not int64: float -> int64 conversion has no vectorised CPU path (5x slower than -> int32 here),
        ``bincount`` is 1.5x faster on int32, and ``index_select`` is as fast with either (measured, one thread).
        """
        flat = w.reshape(-1)
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()  # positions run to (G - 1) * subbins (up to ~500k): beyond 16-bit range and precision
        n, dev = flat.numel(), flat.device
        u = torch.add(self._u_offset_t, flat, alpha=self._u_scale, out=self._scratch("u", n, flat.dtype, dev))
        u.clamp_(0.0, self._u_max)
        fine = self._scratch("fine", n, torch.int32, dev)
        fine.copy_(u)  # truncation = floor for these non-negative positions
        return fine, u.frac_()

    def accumulate_grad(self, w: torch.Tensor, grad: torch.Tensor, alpha: float) -> None:
        """``grad += alpha * d(-log p)/dw`` for every weight of ``w``, and add ``w`` to the binning histogram.

        Fused (CPU float32, numba): one pass, :meth:`accumulate_host`. Otherwise nine elementwise
        ATen passes per weight (position, clamp, index, fraction, two gathers from tables of a few hundred KB at
        most, two multiply-adds into ``grad``, one ``bincount``). Weights outside ``[lo, hi]`` get the
        edge values and are counted in the edge sub-cells: build the table over the weights' range.
        """
        flat_w, flat_g = w.detach().reshape(-1), grad.view(-1)
        if self.fused and self._kernels.usable(flat_w, flat_g):
            self.accumulate_host(flat_w.numpy(), flat_g.numpy(), alpha)
            return
        for wc, gc in zip(flat_w.split(self.chunk), flat_g.split(self.chunk), strict=True):  # O(chunk) extra memory
            fine, t = self._locate(wc)
            n, dev = fine.numel(), fine.device
            g0 = torch.index_select(self.g_start, 0, fine, out=self._scratch("g", n, self.g_start.dtype, dev))
            slope = torch.index_select(self.slope, 0, fine, out=self._scratch("slope", n, self.slope.dtype, dev))
            gc.add_(g0, alpha=alpha).addcmul_(t, slope, value=alpha)
            counts = torch.bincount(fine, minlength=self.n_fine)
            if self.fine_counts is None:
                self.fine_counts = counts
            else:
                self.fine_counts += counts

    def accumulate_host(self, w: np.ndarray, grad: np.ndarray, alpha: float) -> None:
        """:meth:`accumulate_grad` for flat float32 C-contiguous NumPy arrays (views of CPU tensors: the caller has
        checked them) on the fused path, without the per-call tensor checks and conversions: one pass,
        ``grad += alpha * g(w)`` interpolated from the table and ``counts[sub-cell of w] += 1``
        (:func:`distill.prior_kernels._accumulate_kernel`; int32 counts, int64 past 2^31 weights)."""
        if self.fine_counts is None:
            self.fine_counts = torch.zeros(self.n_fine, dtype=torch.int32)
            self._counts_host = self.fine_counts.numpy()
        self._counted += w.shape[0]
        if self._counted >= 2**31 and self.fine_counts.dtype == torch.int32:
            self.fine_counts = self.fine_counts.long()  # a sub-cell could overflow int32
            self._counts_host = self.fine_counts.numpy()
        consts = self._consts_clamped
        consts[3] = alpha
        outside = self.workspace.get("host_outside_clamped")  # only a NaN weight reaches it: not read
        if outside is None or outside.shape[0] != self._kernels.outside_length(self._mix.shape[1]):
            outside = self.workspace["host_outside_clamped"] = self._kernels.new_outside(self._mix.shape[1])[0]
        self._kernels._accumulate_kernel(w, grad, self._table_host, self._counts_host, consts, self._mix, outside)

    def accumulate_all_host(
        self, ws: tuple[np.ndarray, ...], grads: tuple[np.ndarray, ...], alpha: float
    ) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`accumulate_host` for every ``(w, grad)`` pair and the binned sums in one compiled call
        (:func:`distill.prior_kernels.host_pass`; fused path only, on a table nothing was accumulated into yet), then
        what :meth:`result` computes from them.

        Unlike :meth:`accumulate_host`, a weight outside the grid's range is not clamped to it: its gradient and its
        terms of the sums are computed exactly (float64, every component), so the result holds for any weights, and
        a table built over a range that misses a few of them (the callback's, built over the range of the previous
        step's weights) costs those few an exact evaluation. Afterwards :attr:`weight_range` holds the weights' range
        (to within a sub-cell), as the pass saw it.

        Returns:
            ``(nll, grad_means, grad_log_precisions, grad_log_pis)``, float64 NumPy values.
        """
        if not self.fused or self._counted:
            raise RuntimeError("accumulate_all_host needs a fresh table on the fused (numba) path")
        counted = sum(w.shape[0] for w in ws)
        if counted >= 2**31:  # a sub-cell's int32 count could overflow: the int64 path
            for w, g in zip(ws, grads, strict=True):
                self.accumulate_host(w, g, alpha)
            return self._result()  # type: ignore[no-any-return]
        threads = self._kernels.team_size(counted)
        if threads > 1:  # split over torch's own OpenMP threads (bit-identical results)
            team = self.workspace.get("team_pass")
            if team is None:
                team = self.workspace["team_pass"] = self._kernels.TeamPass()
        consts = self._consts
        consts[3] = alpha
        if threads > 1:  # split over torch's own OpenMP threads (bit-identical results)
            team = self.workspace.get("team_pass")
            if team is None:
                team = self.workspace["team_pass"] = self._kernels.TeamPass()
            counts, tot, spread, first, last, outside = team.run(
                threads, ws, grads, self._table_host, self.n_fine, consts, self._mix, self.subbins, self.stats.numpy(),
                self._active, self.lo, self.h)
        else:
            counts = self._host_scratch("counts", self.n_fine, np.int32)[: self.n_fine]
            outside = self.workspace.get("host_outside")
            if outside is None or outside.shape[1] != self._kernels.outside_length(self._mix.shape[1]):
                outside = self.workspace["host_outside"] = self._kernels.new_outside(self._mix.shape[1])
            tot, spread, first, last = self._kernels.host_pass(ws, grads, self._table_host, counts, consts, self._mix,
                                                               outside, self.subbins, self.stats.numpy(),
                                                               self._active, self.lo, self.h)
            outside = outside[0]
        self.fine_counts = torch.from_numpy(counts)
        self._counts_host = counts
        self._counted = counted
        lo, hi = self._kernels.pass_range(self.lo, self.h / self.subbins, first, last, outside)
        self.weight_range = (float(lo), float(hi))
        n_out = outside[1 + 3 * self._mix.shape[1]]
        self.outside_count = int(n_out)
        # weights outside the grid (rare): their exact sums join the binned ones
        return self._grads_from_sums(tot, spread, self.prec.numpy(), outside if n_out else None)

    def grad(self, w: torch.Tensor) -> torch.Tensor:
        """``d(-log p)/dw`` per weight (interpolated, clamped to ``[lo, hi]``), shape of ``w``; does not touch the
        histogram."""
        fine, t = self._locate(w.detach())
        return torch.addcmul(self.g_start.index_select(0, fine), t, self.slope.index_select(0, fine)).view(w.shape)

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(nll, grad_means, grad_log_precisions, grad_log_pis)`` of all weights passed to :meth:`accumulate_grad`."""
        nll, gm, gl, gp = self._result()
        if self.fused:
            return (torch.tensor(nll, dtype=torch.float64), torch.from_numpy(gm), torch.from_numpy(gl),
                    torch.from_numpy(gp))
        return nll, gm, gl, gp

    def _result(self) -> tuple[Any, Any, Any, Any]:
        """:meth:`result`; float64 NumPy arrays (and a float) on the fused path, for the mixture's compiled update."""
        counts = self.fine_counts if self.fine_counts is not None else self.g_start.new_zeros(self.n_fine)
        tot: Any  # (1 + 3(J+1),) sums, and the precisions: NumPy arrays on the fused path, tensors otherwise
        prec: Any
        if self.fused:
            tot, spread = self._kernels.bin_sums(counts, self.subbins, self.stats, self._active, self._means, self.lo,
                                                 self.h)
            prec = self.prec.numpy()  # NumPy on the CPU path: no dispatch cost on 17-vectors
        else:
            c = counts.view(self.size - 1, self.subbins).double()
            t = (torch.arange(self.subbins, dtype=torch.float64, device=c.device) + 0.5) / self.subbins
            stat_sum = torch.zeros(self.size, dtype=torch.float64, device=c.device)
            stat_sum[:-1] += c @ (1.0 - t)
            stat_sum[1:] += c @ t
            tot = stat_sum @ self.stats  # (1 + 3(J+1),)
            spread = float((c @ (t * (1.0 - t))).sum() / c.sum().clamp_min(1.0))
            prec = self.prec
        return self._grads_from_sums(tot, spread, prec)

    def _grads_from_sums(self, tot: Any, spread: float, prec: Any, outside: np.ndarray | None = None
                         ) -> tuple[Any, Any, Any, Any]:
        """``(nll, grad_means, grad_log_precisions, grad_log_pis)`` from the binned sums ``(-log p, R, S, Q)``, and the
        exact ones of the weights outside the grid (``outside``, :func:`distill.prior_kernels.new_outside`'s layout)."""
        r, s, q = tot[1:].reshape(3, -1)
        # Sheppard's correction: interpolating d^2 linearly between grid points overestimates it by t(1-t) h^2
        q = q - r * (self.h**2 * spread)
        nll = tot[0]
        if outside is not None:
            k1 = r.shape[0]
            nll = nll + outside[0]
            r, s, q = r + outside[1 : 1 + k1], s + outside[1 + k1 : 1 + 2 * k1], q + outside[1 + 2 * k1 : 1 + 3 * k1]
        gm, gl, gp = _mixture_param_grads((r, s, q), prec)
        return nll, gm, gl, gp


# ----------------------------------------------------------------------------------------------------------------------
# Merging and quantization
# ----------------------------------------------------------------------------------------------------------------------


def _sym_kl(m1: float, v1: float, m2: float, v2: float) -> float:
    """Symmetric KL divergence between two univariate Gaussians (variances ``v``)."""
    d2 = (m1 - m2) ** 2
    return 0.5 * ((v1 + d2) / v2 + (v2 + d2) / v1) - 1.0


def merge_components(
    means: torch.Tensor,
    stds: torch.Tensor,
    pis: torch.Tensor,
    threshold: float = 0.1,
    criterion: str = "kl",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge mixture components that are too close, conserving the mixing mass (moment matching).

    Repeatedly merges the closest pair while its distance is below ``threshold``. A merged pair keeps
    ``pi = pi_a + pi_b``, the mass-weighted mean and the moment-matched variance; a pair that contains the zero
    component (index 0) stays the zero component, with mean exactly 0.

    Args:
        means, stds, pis: the mixture, ``(K,)`` each, zero component at index 0.
        threshold: merge while the distance is below this value.
        criterion: ``"kl"`` (symmetric KL divergence) or ``"mean"`` (absolute distance of the means).

    Returns:
        ``(means, stds, pis)`` of the merged mixture, zero component first, the others sorted by mean.

    Raises:
        ValueError: on an unknown ``criterion`` or inconsistent shapes.
    """
    if criterion not in ("kl", "mean"):
        raise ValueError(f"criterion must be 'kl' or 'mean', got {criterion!r}")
    if not (means.shape == stds.shape == pis.shape) or means.dim() != 1 or means.numel() < 1:
        raise ValueError(f"means, stds, pis must be 1-D of equal length, got {means.shape}, {stds.shape}, {pis.shape}")
    comps = [
        [float(m), float(s) ** 2, float(p)]
        for m, s, p in zip(means.double().tolist(), stds.double().tolist(), pis.double().tolist(), strict=True)
    ]
    comps[0][0] = 0.0

    def dist(a: list[float], b: list[float]) -> float:
        return _sym_kl(a[0], a[1], b[0], b[1]) if criterion == "kl" else abs(a[0] - b[0])

    while len(comps) > 1:
        best, pair = math.inf, (0, 0)
        for i in range(len(comps)):
            for j in range(i + 1, len(comps)):
                dij = dist(comps[i], comps[j])
                if dij < best:
                    best, pair = dij, (i, j)
        if not best < threshold:
            break
        i, j = pair
        (ma, va, pa), (mb, vb, pb) = comps[i], comps[j]
        p = pa + pb
        m = (pa * ma + pb * mb) / p if p > 0 else 0.5 * (ma + mb)
        second = (pa * (va + ma * ma) + pb * (vb + mb * mb)) / p if p > 0 else 0.5 * (va + vb + ma * ma + mb * mb)
        if i == 0:
            m = 0.0  # the zero component absorbs its neighbour and stays at 0
        comps[i] = [m, max(second - m * m, 1e-30), p]
        del comps[j]
    rest = sorted(comps[1:], key=lambda c: c[0])
    out = torch.tensor([comps[0], *rest], dtype=torch.float64)
    return (
        out[:, 0].to(means.dtype),
        out[:, 1].sqrt().to(stds.dtype),
        out[:, 2].to(pis.dtype),
    )


def quantize_weights(
    w: torch.Tensor,
    means: torch.Tensor,
    stds: torch.Tensor,
    pis: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Set each weight to the mean of its most responsible component; the zero component's members to exactly 0.

    Idempotent: a weight already equal to one of the means (or exactly 0) keeps its value, so quantizing twice
    changes nothing.

    Args:
        w: weights (any shape).
        means, stds, pis: the (merged) mixture, zero component at index 0.
        chunk_size: weights processed at once.

    Returns:
        ``(quantized weights with the shape and dtype of w, component index per weight (N,))``.
    """
    means64 = means.detach().double().clone()
    means64[0] = 0.0
    log_prec = -2.0 * stds.detach().double().log()
    log_pis = pis.detach().double().clamp_min(1e-300).log()
    flat = w.detach().reshape(-1).double()
    codebook, log_prec, log_pis = (t.to(flat.device) for t in (means64, log_prec, log_pis))
    idx = assign_components(flat, codebook, log_prec, log_pis, chunk_size)
    # keep weights already on a codebook value (idempotence even where a wide component would win at that value)
    values = codebook.to(w.dtype).double()
    for j in range(codebook.numel()):
        on = flat == values[j]
        idx[on] = j
    out = codebook[idx].to(w.dtype)
    out[idx == 0] = 0.0
    return out.view_as(w), idx


# ----------------------------------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------------------------------


def _host_view(t: torch.Tensor) -> np.ndarray:
    """A small CPU float tensor as a NumPy view (no copy, no cast; the kernels take float32 or float64), else a
    float64 copy on the host."""
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        return t.detach().numpy()
    return t.detach().to("cpu", torch.float64).numpy()


def _host(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """A small tensor (or array) as a float64 NumPy array on the host."""
    if isinstance(t, np.ndarray):
        return t.astype(np.float64, copy=False)
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        return t.detach().numpy().astype(np.float64, copy=False)  # no torch dispatch on the per-step path
    return t.detach().to("cpu", torch.float64).numpy()


class GaussianMixturePrior(nn.Module):
    """A mixture of ``J`` learned Gaussians plus a zero component (index 0, mean fixed at 0).

    Unconstrained parameters: the ``J`` free means, ``J+1`` log-precisions ``log lambda_j`` (variances stay
    positive) and ``J`` mixing logits; ``pi_0`` is fixed (default 0.999) or, with ``pi_zero_beta=(a, b)``, learned
    through a logit with a ``Beta(a, b)`` hyper-prior. ``Gamma(alpha, beta)`` hyper-priors on the precisions, one for
    the zero component and one for the others, keep components from collapsing (the tutorial's values:
    ``(5000, 2)`` and ``(250, 0.1)``, on the precision itself, without the log-Jacobian, as in the tutorial).

    Args:
        num_components: ``J >= 1``, the number of non-zero components.
        init_range: ``(lo, hi)``: the means start evenly spaced over it (the pretrained weights' range).
        init_std: initial standard deviation of every component (tutorial: 0.25).
        pi_zero: (initial) mixing weight of the zero component, ``0 < pi_zero < 1``.
        pi_zero_beta: ``(a, b)`` to learn ``pi_0`` under a Beta hyper-prior, or ``None`` to keep it fixed.
        gamma_zero: ``(alpha, beta)`` of the Gamma hyper-prior on the zero component's precision (or ``None``).
        gamma: ``(alpha, beta)`` of the Gamma hyper-prior on the other precisions (or ``None``).

    Raises:
        ValueError: on an argument outside its range.
    """

    def __init__(
        self,
        num_components: int = 16,
        init_range: tuple[float, float] = (-0.6, 0.6),
        init_std: float = 0.25,
        pi_zero: float = 0.999,
        pi_zero_beta: tuple[float, float] | None = None,
        gamma_zero: tuple[float, float] | None = (5000.0, 2.0),
        gamma: tuple[float, float] | None = (250.0, 0.1),
    ) -> None:
        super().__init__()
        if int(num_components) < 1:
            raise ValueError(f"num_components must be >= 1 (J non-zero components), got {num_components}")
        if not 0.0 < pi_zero < 1.0:
            raise ValueError(f"pi_zero must be in (0, 1), got {pi_zero}")
        if not init_std > 0:
            raise ValueError(f"init_std must be > 0, got {init_std}")
        for name, ab in (("pi_zero_beta", pi_zero_beta), ("gamma_zero", gamma_zero), ("gamma", gamma)):
            if ab is not None and (len(ab) != 2 or not (ab[0] > 0 and ab[1] > 0)):
                raise ValueError(f"{name} must be None or two positive numbers (a, b), got {ab}")
        lo, hi = float(init_range[0]), float(init_range[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and hi >= lo):
            raise ValueError(f"init_range must be finite (lo, hi) with lo <= hi, got {init_range}")
        j = int(num_components)
        self.num_components = j
        self.pi_zero_init = float(pi_zero)
        self.pi_zero_beta = tuple(pi_zero_beta) if pi_zero_beta is not None else None
        self.gamma_zero = tuple(gamma_zero) if gamma_zero is not None else None
        self.gamma = tuple(gamma) if gamma is not None else None
        means = torch.linspace(lo, hi, j) if j > 1 else torch.tensor([0.5 * (lo + hi)])
        self.free_means = nn.Parameter(means.float())
        self.log_precisions = nn.Parameter(torch.full((j + 1,), -2.0 * math.log(init_std)))
        self.mixing_logits = nn.Parameter(torch.zeros(j))
        if self.pi_zero_beta is not None:
            self.zero_logit: nn.Parameter | None = nn.Parameter(torch.tensor(math.log(pi_zero / (1.0 - pi_zero))))
        else:
            self.zero_logit = None

    # -- the mixture ---------------------------------------------------------------------------------------------------
    @property
    def means(self) -> torch.Tensor:
        """``(J+1,)`` means, zero component first."""
        return torch.cat([self.free_means.new_zeros(1), self.free_means])

    def log_pis(self) -> torch.Tensor:
        """``(J+1,)`` normalised log mixing weights."""
        if self.zero_logit is not None:
            log_p0 = nn.functional.logsigmoid(self.zero_logit).reshape(1)
            log_rest = nn.functional.logsigmoid(-self.zero_logit)
        else:
            log_p0 = self.free_means.new_full((1,), math.log(self.pi_zero_init))
            log_rest = torch.tensor(math.log1p(-self.pi_zero_init))
        return torch.cat([log_p0, log_rest + torch.log_softmax(self.mixing_logits, dim=0)])

    @property
    def pis(self) -> torch.Tensor:
        """``(J+1,)`` mixing weights (sum to 1)."""
        return self.log_pis().exp()

    @property
    def stds(self) -> torch.Tensor:
        """``(J+1,)`` standard deviations ``lambda^{-1/2}``."""
        return torch.exp(-0.5 * self.log_precisions)

    def groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimizer group: ``means``, ``log_precisions``, ``mixing`` (logits, and pi_0's logit)."""
        mixing = [self.mixing_logits] + ([self.zero_logit] if self.zero_logit is not None else [])
        return {"means": [self.free_means], "log_precisions": [self.log_precisions], "mixing": mixing}

    # -- losses --------------------------------------------------------------------------------------------------------
    def hyperprior_nll(self) -> torch.Tensor:
        """``-log`` of the Gamma hyper-priors on the precisions (and the Beta on ``pi_0``), differentiable."""
        total = self.log_precisions.new_zeros(())
        prec = self.log_precisions.exp()
        if self.gamma_zero is not None:
            total = total - gamma_log_prob(prec[:1], *self.gamma_zero).sum()
        if self.gamma is not None:
            total = total - gamma_log_prob(prec[1:], *self.gamma).sum()
        if self.zero_logit is not None and self.pi_zero_beta is not None:
            total = total - beta_log_prob(torch.sigmoid(self.zero_logit), *self.pi_zero_beta)
        return total

    def nll(self, weights: Iterable[torch.Tensor]) -> torch.Tensor:
        """Differentiable ``-sum_i log p(w_i)`` over all weights (chunked; for references and small models)."""
        means, lp, lpi = self.means, self.log_precisions, self.log_pis()
        total = lp.new_zeros(())
        for w in weights:
            total = total - mixture_log_prob(w, means, lp, lpi).sum()
        return total

    def loss(self, weights: Iterable[torch.Tensor], scale: float = 1.0) -> torch.Tensor:
        """``scale * (-sum_i log p(w_i) + hyper-prior terms)``, differentiable (the reference for the callback)."""
        return scale * (self.nll(weights) + self.hyperprior_nll())

    def host_mixture(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(means, log_precisions, log_pis)``, ``(J+1,)`` float64 NumPy arrays (what the CPU kernels take),
        computed as :attr:`means` and :meth:`log_pis` compute them."""
        return self._host_mixture()[:3]  # type: ignore[return-value]

    def _host_mixture(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """:meth:`host_mixture`, and whether all three are finite."""
        from distill import prior_kernels  # numba: imported on first use, not with the package

        _, log_p0, log_rest = self._zero_share_logs()
        free, lp, logits = self._param_views()
        return prior_kernels.host_mixture(free, lp, logits, log_p0, log_rest)

    def _zero_share_logs(self) -> tuple[float, float, float]:
        """``(zero logit or 0, log pi_0, log(1 - pi_0))`` as floats (pi_0 learned through the logit, or fixed)."""
        if self.zero_logit is not None:
            z = float(self.zero_logit.detach())
            return z, -float(np.logaddexp(0.0, -z)), -float(np.logaddexp(0.0, z))
        return 0.0, math.log(self.pi_zero_init), math.log1p(-self.pi_zero_init)

    def _param_views(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Host arrays of the free means, log-precisions and mixing logits: NumPy views of CPU parameters, kept
        while each parameter keeps its memory (``.to()``, ``.double()`` or ``.data = ...`` make new ones; every
        method call on an ``nn.Parameter`` costs 1-4 us, and a step made about ten of them here), else copies."""
        ps = (self.free_means, self.log_precisions, self.mixing_logits)
        cached: tuple[tuple[Any, ...], tuple[np.ndarray, ...]] | None = self.__dict__.get("_pviews")
        if cached is not None and all(p is q and p.data_ptr() == ptr
                                      for p, (q, ptr) in zip(ps, cached[0], strict=True)):
            return cached[1]  # type: ignore[return-value]
        views = tuple(_host_view(p) for p in ps)
        if all(p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) for p in ps):
            self.__dict__["_pviews"] = (tuple((p, p.data_ptr()) for p in ps), views)
        return views  # type: ignore[return-value]

    def backward_from_stats(
        self, grad_means: _Array, grad_log_precisions: _Array, grad_log_pis: _Array, scale: float
    ) -> float:
        """Set ``.grad`` of the mixture's parameters to ``scale * (d nll + d hyper-prior)``; return the hyper-prior.

        ``grad_*`` are the gradients of ``-sum log p(w_i)`` w.r.t. the full ``(J+1,)`` means, log precisions and
        log mixing weights (e.g. from :func:`mixture_nll_grad`), tensors or arrays. The chain rule through the
        parameterisation (fixed zero mean, logits -> log mixing weights, Gamma/Beta hyper-priors) is written out by
        hand, in float64, compiled (:func:`distill.prior_kernels.chain_rule`): autograd on these ``J+1`` vectors
        cost ~0.5 ms a step on a CPU (graph building for ~30 tiny ops), plain torch ops ~0.3 ms, NumPy ~0.1 ms (a
        tenth of a LeNet-300-100 step at the time), the compiled loop a few microseconds. :meth:`loss` is the
        autograd reference it is tested against.
        """
        return self._backward_from_stats(grad_means, grad_log_precisions, grad_log_pis, scale)[0]

    def _backward_from_stats(
        self, grad_means: _Array, grad_log_precisions: _Array, grad_log_pis: _Array, scale: float
    ) -> tuple[float, bool]:
        """:meth:`backward_from_stats`, and whether every gradient it set is finite."""
        from distill import prior_kernels

        params = (self.free_means, self.log_precisions, self.mixing_logits, self.zero_logit)
        outs: list[np.ndarray] = []
        in_place: list[bool] = []
        # NumPy views of the gradients, kept while the same tensors hold them (the checks and conversions cost more
        # than the compiled chain rule); a plain attribute, not module state
        views: list[tuple[torch.Tensor, int, np.ndarray] | None] = self.__dict__.setdefault("_grad_views", [None] * 4)
        for i, p in enumerate(params):
            g = None if p is None else p.grad
            cached = views[i]
            if g is not None and cached is not None and cached[0] is g and cached[1] == g.data_ptr():
                outs.append(cached[2])
                in_place.append(True)
            # in place where possible: the mixture's optimizer never sets its gradients to None
            elif g is not None and g.device.type == "cpu" and g.dtype in (torch.float32, torch.float64) \
                    and g.is_contiguous():
                outs.append(g.detach().numpy().reshape(-1))
                views[i] = (g, g.data_ptr(), outs[-1])
                in_place.append(True)
            else:
                outs.append(np.zeros(max(p.numel(), 1) if p is not None else 1))
                in_place.append(False)
        grads = (_host(grad_means), _host(grad_log_precisions), _host(grad_log_pis))
        zero_logit = float(self.zero_logit.detach()) if self.zero_logit is not None else None
        _, lp, logits = self._param_views()
        hyper, finite = prior_kernels.chain_rule(
            grads, _host(lp), _host(logits), zero_logit, self.gamma_zero, self.gamma,
            self.pi_zero_beta, scale, (outs[0], outs[1], outs[2], outs[3]),
        )
        for p, out, done in zip(params, outs, in_place, strict=True):
            if p is None:
                continue
            if not p.requires_grad:
                p.grad = None
            elif not done:
                p.grad = torch.from_numpy(out.reshape(p.shape)).to(p.device, p.dtype)
        return hyper, finite

    def extra_repr(self) -> str:
        return f"J={self.num_components}, pi_zero={'learned' if self.zero_logit is not None else self.pi_zero_init}"
