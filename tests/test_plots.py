"""The figures: each a non-empty image of the expected size, drawing the data it was given."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.image import imread
from run_artifacts import compression_report, gmm_history, pruning_history

from distill import plots


def assert_png(fig: Figure, path: Path) -> np.ndarray:
    plots.save_figure(fig, path)
    image = imread(path)
    w, h = fig.get_size_inches()
    assert image.shape[:2] == (round(h * plots.DPI), round(w * plots.DPI))
    assert image[..., :3].std() > 0.01, "blank image"
    assert not list(path.parent.glob(".*")), "temporary file left behind"
    return image


def test_weight_change_figure(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w0 = rng.normal(0, 0.1, 500)
    w1 = w0 * 0.5
    fig = plots.weight_change_figure(torch.from_numpy(w0), w1, max_points=200)
    assert_png(fig, tmp_path / "fig1.png")
    ax_hist, ax_scatter = fig.axes
    assert sum(p.get_height() for p in ax_hist.patches) == pytest.approx(2 * 500)  # both histograms, all weights
    offsets = ax_scatter.collections[0].get_offsets()
    assert len(offsets) == 200
    np.testing.assert_allclose(offsets[:, 1], 0.5 * offsets[:, 0])
    with pytest.raises(ValueError, match="same weights"):
        plots.weight_change_figure(w0, w1[:-1])
    with pytest.raises(ValueError, match="initial is empty"):
        plots.weight_change_figure([], [])


def test_mixture_dynamics_figure(tmp_path: Path) -> None:
    history = gmm_history()
    fig = plots.mixture_dynamics_figure(history)
    assert_png(fig, tmp_path / "fig2.png")
    ax_mu, ax_pi = fig.axes
    components = len(history["means"][0])
    assert len(ax_mu.lines) == components and len(ax_pi.lines) == components
    assert sum(isinstance(c, PolyCollection) for c in ax_mu.collections) == components
    for j, line in enumerate(ax_mu.lines):
        np.testing.assert_allclose(line.get_xdata(), history["epochs"])
        np.testing.assert_allclose(line.get_ydata(), [m[j] for m in history["means"]])
    np.testing.assert_allclose(ax_pi.lines[0].get_ydata(), [p[0] for p in history["pis"]])
    assert f"{history['significant'][0]} -> {history['significant'][-1]} significant" in fig.get_suptitle()
    with pytest.raises(KeyError, match="stds"):
        plots.mixture_dynamics_figure({"means": history["means"], "pis": history["pis"]})
    with pytest.raises(ValueError, match="same shape"):
        plots.mixture_dynamics_figure({**history, "stds": [s[:-1] for s in history["stds"]]})


def test_mixture_density_matches_naive_reference() -> None:
    mu, sd, pi = [0.0, -0.3, 0.2], [0.01, 0.05, 0.1], [0.8, 0.1, 0.1]
    xs = np.linspace(-0.5, 0.5, 11)
    naive = [
        sum(
            p / (s * math.sqrt(2 * math.pi)) * math.exp(-0.5 * ((x - m) / s) ** 2)
            for m, s, p in zip(mu, sd, pi, strict=True)
        )
        for x in xs
    ]
    np.testing.assert_allclose(plots.mixture_density(xs, mu, sd, pi), naive, rtol=1e-12)
    with pytest.raises(ValueError, match="positive"):
        plots.mixture_density(xs, mu, [0.0, 1.0, 1.0], pi)


def test_prior_scatter_figure(tmp_path: Path) -> None:
    history = gmm_history()
    rng = np.random.default_rng(0)
    w0 = rng.normal(0, 0.1, 300)
    fig = plots.prior_scatter_figure(w0, w0 * 0.9, history["means"][-1], history["stds"][-1], history["pis"][-1])
    assert_png(fig, tmp_path / "fig3.png")
    ax_scatter, ax_density = fig.axes
    components = len(history["means"][-1])
    bands = [p for p in ax_scatter.patches]
    assert len(bands) == components  # one band per component
    assert len(ax_scatter.lines) == components
    np.testing.assert_allclose(sorted(line.get_ydata()[0] for line in ax_scatter.lines), sorted(history["means"][-1]))
    density = ax_density.lines[0]
    np.testing.assert_allclose(
        density.get_xdata(),
        plots.mixture_density(density.get_ydata(), history["means"][-1], history["stds"][-1], history["pis"][-1]),
    )


def test_filters_figure_conv_and_dense(tmp_path: Path) -> None:
    conv = torch.randn(8, 3, 5, 5)
    fig = plots.filters_figure(
        {"conv1.weight": conv, "fc.weight": torch.randn(10, 7)},
        {"conv1.weight": conv * 0, "fc.weight": torch.randn(10, 7)},
        max_filters=6,
    )
    assert_png(fig, tmp_path / "fig4_conv.png")
    images = [ax.images[0].get_array() for ax in fig.axes]
    assert len(images) == 12 and images[0].shape == (5, 5)
    np.testing.assert_allclose(images[0], conv[0, 0].numpy(), rtol=1e-6)
    assert "conv1.weight" in fig.get_suptitle()
    dense = torch.randn(300, 784)  # LeNet-300-100's first layer: features as 28x28 images
    fig = plots.filters_figure(dense, dense.sign() * 0.1, max_filters=4)
    assert_png(fig, tmp_path / "fig4_dense.png")
    assert fig.axes[0].images[0].get_array().shape == (28, 28)
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), dense[0].reshape(28, 28).numpy(), rtol=1e-6)
    assert plots.pick_feature_layer({"fc1.weight": dense, "fc2.weight": torch.randn(10, 300)}) == "fc1.weight"
    with pytest.raises(ValueError, match="square input"):
        plots.filters_figure(torch.randn(4, 10), torch.randn(4, 10))
    with pytest.raises(KeyError, match="both state dicts"):
        plots.filters_figure({"a.weight": conv}, {"b.weight": conv}, name="a.weight")


def test_compression_figure(tmp_path: Path) -> None:
    report, history = compression_report(), pruning_history()
    fig = plots.compression_figure(report, history)
    assert_png(fig, tmp_path / "fig5.png")
    assert len(fig.axes) == 4
    bars, bits, acc_zero, acc_rate = fig.axes
    kept = [p.get_height() for p in bars.patches[: len(report["layers"])]]
    assert kept == pytest.approx([layer["nonzero"] / layer["params"] for layer in report["layers"]])
    assert [p.get_height() for p in bits.patches[: len(report["layers"])]] == [
        layer["bits_per_weight"] for layer in report["layers"]
    ]
    zero = np.array([it["zero_rate"] for it in history["iterations"]])
    np.testing.assert_allclose(acc_zero.lines[0].get_xdata(), 100 * zero)
    np.testing.assert_allclose(acc_rate.lines[0].get_xdata(), 1 / (1 - zero))
    assert len(plots.compression_figure(report).axes) == 2
    assert len(plots.compression_figure(None, history).axes) == 2
    with pytest.raises(ValueError, match="needs a compression report"):
        plots.compression_figure(None, None)


def test_hyperprior_densities_match_torch() -> None:
    lam = np.array([0.5, 10.0, 2500.0])
    ref = torch.distributions.Gamma(torch.tensor(250.0, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64))
    np.testing.assert_allclose(
        plots.gamma_log_pdf(lam, 250.0, 0.1), ref.log_prob(torch.from_numpy(lam)).numpy(), rtol=1e-10
    )
    p = np.array([0.01, 0.5, 0.999])
    ref_b = torch.distributions.Beta(torch.tensor(5.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    np.testing.assert_allclose(plots.beta_log_pdf(p, 5.0, 2.0), ref_b.log_prob(torch.from_numpy(p)).numpy(), rtol=1e-10)
    with pytest.raises(ValueError, match="alpha=-1"):
        plots.gamma_log_pdf(lam, -1, 1)


def test_hyperprior_figure_and_parsing(tmp_path: Path) -> None:
    history = gmm_history()
    fig = plots.hyperprior_figure(history["hyperprior"])
    assert_png(fig, tmp_path / "fig6.png")
    ax_gamma, ax_beta = fig.axes
    assert len(ax_gamma.lines) == 2 and len(ax_beta.lines) == 1
    flat = plots.parse_hyperprior({"gamma_alpha": 250, "gamma_beta": 0.1, "beta_a": 2, "beta_b": 3, "tau": 1e-3})
    assert sorted(flat) == [("beta", "beta", 2.0, 3.0), ("gamma", "gamma", 250.0, 0.1)]
    assert plots.parse_hyperprior({"gamma": [1, 2], "beta": None}) == [("gamma", "gamma", 1.0, 2.0)]
    with pytest.raises(ValueError, match="no Gamma/Beta"):
        plots.parse_hyperprior({"tau": 0.1})


def test_pareto_front_and_figure(tmp_path: Path) -> None:
    points = [(1.0, 10.0), (0.5, 5.0), (2.0, 8.0), (0.5, 4.0), (3.0, 50.0)]
    assert plots.pareto_front(points) == [1, 0, 4]
    runs = [(f"#{i}", loss, rate) for i, (loss, rate) in enumerate(points)]
    fig = plots.pareto_figure(runs)
    assert_png(fig, tmp_path / "fig7.png")
    ax = fig.axes[0]
    published = [c for c in ax.collections][: len(plots.PUBLISHED)]
    assert [tuple(c.get_offsets()[0]) for c in published] == [
        (r.rate, pytest.approx(r.accuracy_loss)) for r in plots.PUBLISHED
    ]
    front = [line for line in ax.lines if line.get_label() == "Pareto front"][0]
    assert list(front.get_xdata()) == [5.0, 10.0, 50.0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend.count("Deep Compression") == 1 and "DNS" in legend and "Soft weight-sharing" in legend
    sws = [r for r in plots.PUBLISHED if r.method == "Soft weight-sharing" and r.network == "LeNet-5-Caffe"][0]
    assert (sws.rate, sws.accuracy_loss) == (162.0, pytest.approx(0.09))
    assert_png(plots.pareto_figure([]), tmp_path / "fig7_empty.png")


def test_log_figure_to_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    fig = plots.hyperprior_figure({"gamma": [2.0, 1.0]})
    assert plots.log_figure(writer, "figures/hyperprior", fig, step=3)
    writer.close()
    assert not plots.log_figure(None, "x", fig)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert acc.Tags()["images"] == ["figures/hyperprior"]
    image = acc.Images("figures/hyperprior")[0]
    assert (image.step, image.width, image.height) == (3, 1000, 400)
