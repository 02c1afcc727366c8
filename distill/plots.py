"""The figures of the compression papers, as pure functions returning :class:`matplotlib.figure.Figure` objects.

Each function takes plain data (arrays, the JSON artifacts of a run as dicts, state dicts) and draws one figure,
numbered as in the project's issue:

1. :func:`weight_change_figure`: weight distribution before and after retraining, and each weight's change.
2. :func:`mixture_dynamics_figure`: the mixture's means (+- 2 std) and mixing weights over training
   (Soft Weight-Sharing for Neural Network Compression, Ullrich, Meeds & Welling 2017, figure 3).
3. :func:`prior_scatter_figure`: initial vs final weights, the final components as bands, the prior's density
   (ibid., figure 1).
4. :func:`filters_figure`: convolution filters / first-layer dense features before and after compression.
5. :func:`compression_figure`: per-layer kept vs pruned weights and bits, and accuracy vs compression over
   pruning iterations (Deep Compression, Han, Mao & Dally 2016, and Learning both Weights and Connections,
   Han et al. 2015).
6. :func:`hyperprior_figure`: the Gamma (precisions) and Beta (zero component's mixing weight) hyper-priors.
7. :func:`pareto_figure`: accuracy loss vs compression rate for our runs, with the published points.

Figures are built with the object-oriented API on the Agg canvas (no pyplot state, no display needed), so they
render in tests, on servers and in TensorBoard. :func:`save_figure` writes a PNG atomically and
:func:`log_figure` sends a figure to a TensorBoard logger.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from distill.io import atomic_path

__all__ = [
    "DPI",
    "PUBLISHED",
    "PublishedResult",
    "beta_log_pdf",
    "compression_figure",
    "filters_figure",
    "gamma_log_pdf",
    "hyperprior_figure",
    "log_figure",
    "mixture_density",
    "mixture_dynamics_figure",
    "parse_hyperprior",
    "pareto_figure",
    "pareto_front",
    "pick_feature_layer",
    "prior_scatter_figure",
    "save_figure",
    "weight_change_figure",
]

DPI = 100  # every figure is figsize * DPI pixels: tests check the PNG size


@dataclass(frozen=True)
class PublishedResult:
    """One row of a literature table: a compressed network's test error against its own baseline.

    Attributes:
        method: the method's short name (legend label).
        network: the network (point label).
        rate: compression rate (original size / compressed size).
        error: top-1 test error of the compressed network, in percent.
        baseline_error: top-1 test error of the uncompressed reference in the same table, in percent.
    """

    method: str
    network: str
    rate: float
    error: float
    baseline_error: float

    @property
    def accuracy_loss(self) -> float:
        """Accuracy lost by compression, in percentage points (negative: the compressed network is better)."""
        return self.error - self.baseline_error


# Deep Compression (Han, Mao & Dally 2016) table 1; Dynamic Network Surgery (Guo, Yao & Chen 2016) as reported in
# Soft Weight-Sharing (Ullrich et al. 2017) table 1, which also gives its own results.
PUBLISHED: tuple[PublishedResult, ...] = (
    PublishedResult("Deep Compression", "LeNet-300-100", 40.0, 1.58, 1.64),
    PublishedResult("Deep Compression", "LeNet-5", 39.0, 0.74, 0.80),
    PublishedResult("DNS", "LeNet-300-100", 56.0, 1.99, 2.28),
    PublishedResult("DNS", "LeNet-5", 108.0, 0.91, 0.91),
    PublishedResult("Soft weight-sharing", "LeNet-300-100", 64.0, 1.94, 1.89),
    PublishedResult("Soft weight-sharing", "LeNet-5-Caffe", 162.0, 0.97, 0.88),
)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attach a canvas: savefig/draw work without pyplot
    return fig


def _flat(values: Any, argument: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError(f"{argument} is empty: expected at least one weight")
    return arr


def _subsample(n: int, max_points: int, seed: int = 0) -> np.ndarray | slice:
    """Indices of at most ``max_points`` of ``n`` points (a fixed seed: the same weights every time)."""
    if n <= max_points:
        return slice(None)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


# -------------------------------------------------------------------------------------------------------------------
# 1. weight distribution before/after retraining
# -------------------------------------------------------------------------------------------------------------------
def weight_change_figure(
    initial: Any, final: Any, *, bins: int = 100, max_points: int = 20_000, title: str | None = None
) -> Figure:
    """Figure 1: histograms of the weights before and after retraining, and a scatter of each weight's change.

    Args:
        initial: the weights of the pretrained network (any shape; flattened).
        final: the same weights after retraining, in the same order.
        bins: histogram bins.
        max_points: at most this many weights are drawn in the scatter (a fixed random subset).
        title: optional figure title.

    Returns:
        A 12x4.5 inch figure with two axes: the histograms (log counts) and the scatter.

    Raises:
        ValueError: if ``initial`` and ``final`` differ in size or are empty.
    """
    w0, w1 = _flat(initial, "initial"), _flat(final, "final")
    if w0.shape != w1.shape:
        raise ValueError(f"initial and final must hold the same weights, got sizes {w0.size} and {w1.size}")
    fig = _figure(12, 4.5)
    ax_hist, ax_scatter = fig.subplots(1, 2)
    lo, hi = float(min(w0.min(), w1.min())), float(max(w0.max(), w1.max()))
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
    ax_hist.hist(w0, bins=edges, alpha=0.6, label="pretrained", color="tab:blue")
    ax_hist.hist(w1, bins=edges, alpha=0.6, label="retrained", color="tab:red")
    ax_hist.set_yscale("log")
    ax_hist.set_xlabel("weight value")
    ax_hist.set_ylabel("count")
    ax_hist.set_title("weight distribution")
    ax_hist.legend()
    idx = _subsample(w0.size, max_points)
    ax_scatter.scatter(w0[idx], w1[idx], s=2, alpha=0.4, color="tab:purple", rasterized=True)
    ax_scatter.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--")
    ax_scatter.set_xlabel("pretrained weight")
    ax_scatter.set_ylabel("retrained weight")
    ax_scatter.set_title(f"change of each weight ({w0.size:,} weights)")
    if title:
        fig.suptitle(title)
    return fig


# -------------------------------------------------------------------------------------------------------------------
# 2. mixture dynamics
# -------------------------------------------------------------------------------------------------------------------
def _history_array(history: Mapping[str, Any], key: str) -> np.ndarray:
    if key not in history:
        raise KeyError(f"mixture history has no {key!r}: expected the gmm_history.json keys means/stds/pis")
    arr = np.asarray(history[key], dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"history[{key!r}] must be a non-empty list of per-record lists, got shape {arr.shape}")
    return arr  # (records, J + 1)


def mixture_dynamics_figure(history: Mapping[str, Any], *, title: str | None = None) -> Figure:
    """Figure 2: every component's mean with its spread (mean +- 2 std) and its mixing weight over training.

    Components being absorbed show as curves merging in the top panel and mixing weights falling to ~0 below.

    Args:
        history: the ``gmm_history.json`` mapping: ``means``, ``stds``, ``pis`` (one list of J+1 values per record,
            component 0 the zero component) and optionally ``epochs`` (x axis; record index otherwise) and
            ``significant`` (number of significant components per record, shown in the title).
        title: optional figure title.

    Returns:
        A 10x7 inch figure with two axes sharing x: one mean line per component (with a +-2 std band) and one
        mixing-weight line per component.

    Raises:
        KeyError: if a key is missing. ValueError: if the lists disagree in shape.
    """
    means, stds, pis = (_history_array(history, k) for k in ("means", "stds", "pis"))
    if not (means.shape == stds.shape == pis.shape):
        raise ValueError(f"means, stds and pis must have the same shape, got {means.shape}, {stds.shape}, {pis.shape}")
    records, components = means.shape
    x = np.asarray(history.get("epochs") or range(records), dtype=np.float64)
    if x.shape[0] != records:
        x = np.arange(records, dtype=np.float64)
    fig = _figure(10, 7)
    ax_mu, ax_pi = fig.subplots(2, 1, sharex=True)
    colors = [f"C{j % 10}" for j in range(components)]
    for j in range(components):
        label = "zero component" if j == 0 else None
        ax_mu.plot(x, means[:, j], color=colors[j], lw=1.2, label=label)
        ax_mu.fill_between(x, means[:, j] - 2 * stds[:, j], means[:, j] + 2 * stds[:, j], color=colors[j], alpha=0.15)
        ax_pi.plot(x, pis[:, j], color=colors[j], lw=1.2)
    ax_mu.set_ylabel("component mean +- 2 std")
    ax_mu.legend(loc="upper right")
    ax_pi.set_yscale("log")
    ax_pi.set_ylabel("mixing weight")
    ax_pi.set_xlabel("epoch" if history.get("epochs") else "record")
    sig = history.get("significant")
    head = f"mixture dynamics: {components} components"
    if sig:
        head += f", {sig[0]} -> {sig[-1]} significant"
    fig.suptitle(title or head)
    return fig


# -------------------------------------------------------------------------------------------------------------------
# 3. initial vs final scatter with the prior
# -------------------------------------------------------------------------------------------------------------------
def mixture_density(x: Any, means: Any, stds: Any, pis: Any) -> np.ndarray:
    r"""Density of a one-dimensional Gaussian mixture, in float64.

    .. math:: p(x) = \sum_j \pi_j \, \mathcal{N}(x \mid \mu_j, \sigma_j^2)

    Args:
        x: points (any shape).
        means: component means, shape (J,).
        stds: component standard deviations (> 0), shape (J,).
        pis: mixing weights, shape (J,).

    Returns:
        The density at each point, the shape of ``x``.

    Raises:
        ValueError: if the components disagree in length or a std is not positive.
    """
    mu, sd, pi = (np.asarray(a, dtype=np.float64).ravel() for a in (means, stds, pis))
    if not (mu.shape == sd.shape == pi.shape):
        raise ValueError(f"means, stds and pis must have the same length, got {mu.size}, {sd.size}, {pi.size}")
    if np.any(sd <= 0):
        raise ValueError(f"stds must be positive, got {sd.tolist()}")
    xs = np.asarray(x, dtype=np.float64)
    z = (xs[..., None] - mu) / sd  # (..., J)
    return np.sum(pi * np.exp(-0.5 * z**2) / (sd * math.sqrt(2 * math.pi)), axis=-1)


def prior_scatter_figure(
    initial: Any,
    final: Any,
    means: Any,
    stds: Any,
    pis: Any,
    *,
    max_points: int = 20_000,
    title: str | None = None,
) -> Figure:
    """Figure 3: initial vs final weights, the final mixture's components as bands, and the prior's density.

    Args:
        initial: weights at the start of retraining (flattened).
        final: the same weights at the end.
        means: the final components' means (zero component included).
        stds: their standard deviations.
        pis: their mixing weights.
        max_points: at most this many weights are drawn (a fixed random subset).
        title: optional figure title.

    Returns:
        A 10x6 inch figure: the scatter with one band (mean +- 2 std) per component, and beside it the prior's
        density with a histogram of the final weights, sharing the weight axis.

    Raises:
        ValueError: if ``initial`` and ``final`` differ in size, or the components are inconsistent.
    """
    w0, w1 = _flat(initial, "initial"), _flat(final, "final")
    if w0.shape != w1.shape:
        raise ValueError(f"initial and final must hold the same weights, got sizes {w0.size} and {w1.size}")
    mu, sd, pi = (np.asarray(a, dtype=np.float64).ravel() for a in (means, stds, pis))
    fig = _figure(10, 6)
    ax_scatter, ax_density = fig.subplots(1, 2, sharey=True, width_ratios=[3, 1])
    for j in range(mu.size):
        color = "0.3" if j == 0 else f"C{j % 10}"
        ax_scatter.axhspan(mu[j] - 2 * sd[j], mu[j] + 2 * sd[j], color=color, alpha=0.2, lw=0)
        ax_scatter.axhline(mu[j], color=color, lw=0.6)
    idx = _subsample(w0.size, max_points)
    ax_scatter.scatter(w0[idx], w1[idx], s=2, alpha=0.5, color="k", rasterized=True)
    ax_scatter.set_xlabel("initial weight")
    ax_scatter.set_ylabel("final weight")
    ax_scatter.set_title(f"{mu.size} components (bands: mean +- 2 std)")
    lo = float(min(w1.min(), (mu - 3 * sd).min()))
    hi = float(max(w1.max(), (mu + 3 * sd).max()))
    grid = np.linspace(lo, hi, 1000)
    ax_density.hist(w1, bins=100, orientation="horizontal", density=True, color="0.7", log=True)
    ax_density.plot(mixture_density(grid, mu, sd, pi), grid, color="tab:red", lw=1.2, label="prior")
    ax_density.set_xscale("log")
    ax_density.set_xlabel("density")
    ax_density.legend(loc="upper right")
    if title:
        fig.suptitle(title)
    return fig


# -------------------------------------------------------------------------------------------------------------------
# 4. filters / first-layer features
# -------------------------------------------------------------------------------------------------------------------
def pick_feature_layer(state: Mapping[str, Any]) -> str:
    """Name of the layer whose filters figure 4 shows: the first 4-D weight, else the first 2-D weight whose input
    size is a square (a dense layer on images, e.g. 784 = 28 x 28).

    Raises:
        ValueError: if the state dict has no such weight.
    """
    for name, value in state.items():
        if name.endswith("weight") and getattr(value, "ndim", 0) == 4:
            return name
    for name, value in state.items():
        if (
            name.endswith("weight")
            and getattr(value, "ndim", 0) == 2
            and math.isqrt(value.shape[1]) ** 2 == value.shape[1]
        ):
            return name
    raise ValueError(f"no convolution or image-input dense weight among {list(state)}: pass name= explicitly")


def _filter_images(weight: Any, max_filters: int) -> np.ndarray:
    w = weight.detach().cpu().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight)
    w = w.astype(np.float64)
    if w.ndim == 4:  # (out, in, k, k): the first input channel of each filter
        images = w[:max_filters, 0]
    elif w.ndim == 2:  # (out, in) with in = side * side: each unit's input weights as an image
        side = math.isqrt(w.shape[1])
        if side * side != w.shape[1]:
            raise ValueError(f"a dense weight needs a square input size to be drawn as images, got {w.shape[1]}")
        images = w[:max_filters].reshape(-1, side, side)  # (n, 28, 28)
    else:
        raise ValueError(f"expected a 4-D convolution or 2-D dense weight, got shape {tuple(w.shape)}")
    return images


def filters_figure(
    before: Mapping[str, Any] | Any,
    after: Mapping[str, Any] | Any,
    *,
    name: str | None = None,
    max_filters: int = 16,
    title: str | None = None,
) -> Figure:
    """Figure 4: a layer's filters (convolution kernels, or a dense layer's input weights as images) before and
    after compression, on a shared colour scale per row.

    Args:
        before: the layer's weight (tensor/array) or a state dict holding it.
        after: the same after compression.
        name: the parameter's name when state dicts are given (default: :func:`pick_feature_layer`).
        max_filters: at most this many filters are drawn (the first ones).
        title: optional figure title (default: the layer's name).

    Returns:
        A figure 1.1 inch per filter wide and 2.6 inches tall: row 0 before, row 1 after.

    Raises:
        KeyError: if ``name`` is missing from a state dict. ValueError: for weights that cannot be drawn.
    """
    if max_filters < 1:
        raise ValueError(f"max_filters must be >= 1, got {max_filters}")
    if isinstance(before, Mapping):
        name = name or pick_feature_layer(before)
        if name not in before or not isinstance(after, Mapping) or name not in after:
            raise KeyError(f"parameter {name!r} must be in both state dicts")
        before, after = before[name], after[name]
    top, bottom = _filter_images(before, max_filters), _filter_images(after, max_filters)
    if top.shape != bottom.shape:
        raise ValueError(f"before and after differ in shape: {top.shape} vs {bottom.shape}")
    n = top.shape[0]
    fig = _figure(max(1.1 * n, 3.0), 2.6)
    axes = np.atleast_2d(fig.subplots(2, n, squeeze=False))
    for row, (images, label) in enumerate(((top, "before"), (bottom, "after"))):
        limit = float(np.abs(images).max()) or 1.0
        for i in range(n):
            ax: Axes = axes[row, i]
            ax.imshow(images[i], cmap="seismic", vmin=-limit, vmax=limit, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(label)
    fig.suptitle(title or (f"filters of {name}" if name else "filters"))
    return fig


# -------------------------------------------------------------------------------------------------------------------
# 5. compression per layer and over pruning iterations
# -------------------------------------------------------------------------------------------------------------------
def compression_figure(
    report: Mapping[str, Any] | None,
    pruning_history: Mapping[str, Any] | None = None,
    *,
    title: str | None = None,
) -> Figure:
    """Figure 5: what each layer keeps, and how accuracy evolves as pruning compresses the network.

    Args:
        report: ``compression_report.json`` (``layers``: name, params, nonzero, bits_per_weight, ...), or None.
        pruning_history: ``pruning_history.json`` (``iterations``: zero_rate, val_acc, ...), or None.
        title: optional figure title.

    Returns:
        A figure 5 inches wide per panel, 4.5 tall. With a report: kept vs pruned fraction of each layer (stacked bars,
        one pair per layer) and the bits per weight / per index of each layer. With a pruning history: validation
        accuracy against the pruned fraction (zero weights / all parameters) and against the compression of the
        weights (all parameters / non-zero weights).

    Raises:
        ValueError: if both inputs are None or empty.
    """
    layers = list(report.get("layers", [])) if report else []
    iterations = [it for it in (pruning_history or {}).get("iterations", [])]
    panels = (2 if layers else 0) + (2 if iterations else 0)
    if panels == 0:
        raise ValueError("compression_figure needs a compression report with layers or a pruning history")
    fig = _figure(5 * panels, 4.5)
    axes = list(np.atleast_1d(fig.subplots(1, panels)))
    if layers:
        names = [str(layer["name"]) for layer in layers]
        params = np.array([float(layer["params"]) for layer in layers])
        kept = np.array([float(layer["nonzero"]) for layer in layers])
        pos = np.arange(len(names))
        ax = axes.pop(0)
        frac = np.divide(kept, params, out=np.zeros_like(kept), where=params > 0)  # layers differ in size by 100x
        ax.bar(pos, frac, color="tab:green", label="kept")
        ax.bar(pos, 1.0 - frac, bottom=frac, color="tab:gray", alpha=0.6, label="pruned")
        for p, f, k, total in zip(pos, frac, kept, params, strict=True):
            ax.text(p, 1.0, f"{100 * f:.1f}%\n{int(k):,}/{int(total):,}", ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, 1.15)
        ax.set_xticks(pos, names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("fraction of the layer's weights")
        ax.set_title("kept vs pruned per layer")
        ax.legend()
        ax = axes.pop(0)
        width = 0.4
        bpw = [float(layer.get("bits_per_weight") or 0.0) for layer in layers]
        bpi = [float(layer.get("bits_per_index") or 0.0) for layer in layers]
        ax.bar(pos - width / 2, bpw, width, label="bits per weight", color="tab:blue")
        ax.bar(pos + width / 2, bpi, width, label="bits per index", color="tab:orange")
        ax.set_xticks(pos, names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("bits")
        rate = (report or {}).get("totals", {}).get("compression_rate")
        ax.set_title("bits per layer" + (f" (total {float(rate):.1f}x)" if rate else ""))
        ax.legend()
    if iterations:
        zero = np.array([float(it["zero_rate"]) for it in iterations])
        acc = np.array([np.nan if it.get("val_acc") is None else float(it["val_acc"]) for it in iterations])
        rate = 1.0 / np.clip(1.0 - zero, 1e-12, None)
        for ax, xs, label in (
            (axes[0], 100 * zero, "zero weights / all parameters (%)"),
            (axes[1], rate, "all parameters / non-zero weights"),
        ):
            ax.plot(xs, 100 * acc, marker="o", color="tab:red")
            for it, xv, yv in zip(iterations, xs, acc, strict=True):
                if np.isfinite(yv):
                    ax.annotate(
                        str(it.get("iteration", "")),
                        (xv, 100 * yv),
                        fontsize=7,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
            ax.set_xlabel(label)
            ax.set_ylabel("validation accuracy (%)")
            ax.set_title("accuracy over pruning iterations")
    if title:
        fig.suptitle(title)
    return fig


# -------------------------------------------------------------------------------------------------------------------
# 6. hyper-priors
# -------------------------------------------------------------------------------------------------------------------
def gamma_log_pdf(x: Any, alpha: float, beta: float) -> np.ndarray:
    r"""Log density of the Gamma distribution with shape ``alpha`` and rate ``beta``, in float64.

    .. math:: \log p(\lambda) = \alpha \log\beta - \log\Gamma(\alpha) + (\alpha - 1)\log\lambda - \beta\lambda

    Raises:
        ValueError: if ``alpha`` or ``beta`` is not positive.
    """
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"Gamma parameters must be positive, got alpha={alpha}, beta={beta}")
    lam = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return alpha * math.log(beta) - math.lgamma(alpha) + (alpha - 1) * np.log(lam) - beta * lam


def beta_log_pdf(x: Any, a: float, b: float) -> np.ndarray:
    r"""Log density of the Beta distribution with parameters ``a``, ``b``, in float64.

    .. math:: \log p(\pi) = (a-1)\log\pi + (b-1)\log(1-\pi) - \log B(a, b)

    Raises:
        ValueError: if ``a`` or ``b`` is not positive.
    """
    if a <= 0 or b <= 0:
        raise ValueError(f"Beta parameters must be positive, got a={a}, b={b}")
    p = np.asarray(x, dtype=np.float64)
    log_b = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    with np.errstate(divide="ignore"):
        return (a - 1) * np.log(p) + (b - 1) * np.log1p(-p) - log_b


_PARAM_NAMES = (
    ("alpha", "beta"),
    ("a", "b"),
    ("shape", "rate"),
    ("concentration", "rate"),
    ("concentration1", "concentration0"),
)


def _pair(value: Any) -> tuple[float, float] | None:
    if isinstance(value, Mapping):
        for first, second in _PARAM_NAMES:
            if first in value and second in value:
                return float(value[first]), float(value[second])
        return None
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return float(value[0]), float(value[1])
    return None


def parse_hyperprior(hyperprior: Mapping[str, Any]) -> list[tuple[str, str, float, float]]:
    """Read the hyper-prior parameters out of ``gmm_history.json["hyperprior"]`` (or a callback's arguments).

    Accepted shapes: nested ``{"gamma": {"alpha": 250, "beta": 0.1}, "beta": {"alpha": 1, "beta": 1}}`` (any key
    starting with ``gamma``/``beta``, parameters named alpha/beta, a/b, shape/rate, or a 2-list), or flat
    ``{"gamma_alpha": 250, "gamma_beta": 0.1, "beta_alpha": ..., "beta_beta": ...}`` (any prefix, e.g.
    ``gamma_zero_alpha``). Keys that do not match are ignored; values of None (a hyper-prior switched off) too.

    Returns:
        ``(kind, label, p1, p2)`` per distribution, kind ``"gamma"`` or ``"beta"``.

    Raises:
        ValueError: if no Gamma or Beta parameters are found.
    """
    found: list[tuple[str, str, float, float]] = []
    flat: dict[str, dict[str, Any]] = {}
    for key, value in hyperprior.items():
        kind = "gamma" if key.lower().startswith("gamma") else "beta" if key.lower().startswith("beta") else None
        if kind is None or value is None:
            continue
        pair = _pair(value)
        if pair is not None:
            found.append((kind, key, *pair))
        elif isinstance(value, (int, float)) and "_" in key:
            prefix, _, param = key.rpartition("_")
            flat.setdefault(prefix, {})[param] = value
    for prefix, params in flat.items():
        pair = _pair(params)
        if pair is not None:
            found.append(("gamma" if prefix.lower().startswith("gamma") else "beta", prefix, *pair))
    if not found:
        raise ValueError(f"no Gamma/Beta hyper-prior parameters found in {dict(hyperprior)!r}")
    return found


def hyperprior_figure(hyperprior: Mapping[str, Any] | Sequence[tuple[str, str, float, float]]) -> Figure:
    r"""Figure 6: the hyper-prior densities in use: Gamma on the components' precisions :math:`\lambda = 1/\sigma^2`
    and Beta on the zero component's mixing weight :math:`\pi_0`.

    Args:
        hyperprior: a mapping as accepted by :func:`parse_hyperprior`, or its parsed list.

    Returns:
        A 10x4 inch figure: Gamma densities on a log precision axis (left), Beta densities on [0, 1] (right);
        one curve per distribution. A panel without distributions says so.
    """
    dists = parse_hyperprior(hyperprior) if isinstance(hyperprior, Mapping) else list(hyperprior)
    fig = _figure(10, 4)
    ax_gamma, ax_beta = fig.subplots(1, 2)
    for kind, label, p1, p2 in dists:
        if kind == "gamma":
            mean, sd = p1 / p2, math.sqrt(p1) / p2
            lo, hi = max(mean - 6 * sd, mean * 1e-3, 1e-12), mean + 6 * sd
            lam = np.geomspace(lo, hi, 600)
            ax_gamma.plot(lam, np.exp(gamma_log_pdf(lam, p1, p2)), label=f"{label}: Gamma({p1:g}, {p2:g})")
        else:
            p = np.linspace(1e-4, 1 - 1e-4, 2000)
            ax_beta.plot(p, np.exp(beta_log_pdf(p, p1, p2)), label=f"{label}: Beta({p1:g}, {p2:g})")
    ax_gamma.set_xscale("log")
    ax_gamma.set_xlabel("precision 1/std^2")
    ax_gamma.set_ylabel("density")
    ax_gamma.set_title("Gamma hyper-prior on precisions")
    ax_beta.set_xlabel("zero component's mixing weight")
    ax_beta.set_title("Beta hyper-prior on pi_0")
    for ax in (ax_gamma, ax_beta):
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not used", ha="center", va="center", transform=ax.transAxes)
    return fig


# -------------------------------------------------------------------------------------------------------------------
# 7. accuracy loss vs compression rate
# -------------------------------------------------------------------------------------------------------------------
def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the Pareto-optimal points when minimising accuracy loss and maximising compression rate.

    Args:
        points: ``(accuracy_loss, compression_rate)`` pairs.

    Returns:
        Indices of the non-dominated points, sorted by compression rate.
    """
    front = []
    for i, (loss_i, rate_i) in enumerate(points):
        dominated = any(
            loss_j <= loss_i and rate_j >= rate_i and (loss_j < loss_i or rate_j > rate_i)
            for j, (loss_j, rate_j) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][1])


def pareto_figure(
    runs: Sequence[tuple[str, float, float]],
    *,
    published: Sequence[PublishedResult] = PUBLISHED,
    title: str | None = None,
) -> Figure:
    """Figure 7: accuracy loss vs compression rate of our runs, their Pareto front, and the published points.

    Args:
        runs: ``(label, accuracy_loss_in_percentage_points, compression_rate)`` per run (may be empty).
        published: literature points (default :data:`PUBLISHED`).
        title: optional figure title.

    Returns:
        An 8x5.5 inch figure: compression rate (log x) against accuracy loss; one marker style per published
        method, our runs as black dots with the Pareto front as a line.
    """
    fig = _figure(8, 5.5)
    ax = fig.subplots()
    methods = list(dict.fromkeys(res.method for res in published))
    labelled: set[str] = set()
    for res in published:
        k = methods.index(res.method)
        label = None if res.method in labelled else res.method
        labelled.add(res.method)
        ax.scatter(res.rate, res.accuracy_loss, marker="s^Dv<>ph"[k % 8], s=50, color=f"C{k}", label=label)
        ax.annotate(res.network, (res.rate, res.accuracy_loss), fontsize=7, xytext=(4, -8), textcoords="offset points")
    if runs:
        pts = [(float(loss), float(rate)) for _, loss, rate in runs]
        ax.scatter([p[1] for p in pts], [p[0] for p in pts], color="k", s=18, label="our runs", zorder=3)
        front = pareto_front(pts)
        ax.plot(
            [pts[i][1] for i in front],
            [pts[i][0] for i in front],
            color="k",
            lw=1,
            ls="--",
            label="Pareto front",
            zorder=2,
        )
        for i in front:
            ax.annotate(str(runs[i][0]), (pts[i][1], pts[i][0]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("compression rate (original size / compressed size)")
    ax.set_ylabel("accuracy loss (percentage points)")
    ax.set_title(title or "accuracy loss vs compression rate")
    ax.legend(fontsize=8)
    return fig


# -------------------------------------------------------------------------------------------------------------------
# output
# -------------------------------------------------------------------------------------------------------------------
def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: int = DPI) -> Path:
    """Write ``fig`` as a PNG atomically (a temporary file in the same folder, then :func:`os.replace`).

    The image is ``figsize * dpi`` pixels (no tight cropping), so its size is known in advance.

    Returns:
        The path written.
    """
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=dpi)
    return path


def log_figure(logger: Any, tag: str, fig: Figure, step: int = 0) -> bool:
    """Log ``fig`` to a TensorBoard logger (``logger.experiment.add_figure``) under ``tag``.

    Args:
        logger: a Lightning logger (e.g. ``trainer.logger``) or a ``SummaryWriter``; None and loggers without
            ``add_figure`` (CSV, ...) are skipped.
        tag: the image tag, e.g. ``figures/mixture_dynamics``.
        fig: the figure (not closed: it can still be saved).
        step: global step of the image.

    Returns:
        Whether the figure was logged.
    """
    if logger is None:
        return False
    writer = getattr(logger, "experiment", logger)
    add_figure = getattr(writer, "add_figure", None)
    if not callable(add_figure):
        return False
    add_figure(tag, fig, global_step=step, close=False)
    return True
