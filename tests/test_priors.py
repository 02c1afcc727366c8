"""The Gaussian-mixture prior's maths against float64 naive references (torch.distributions)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from torch import distributions as D

from distill import prior_kernels
from distill.priors import (
    GaussianMixturePrior,
    MixtureTable,
    assign_components,
    beta_log_prob,
    gamma_log_prob,
    merge_components,
    mixture_log_prob,
    mixture_nll_grad,
    quantize_weights,
    responsibilities,
)


def _mixture(j: int = 6, seed: int = 0, narrow: float = 0.02) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    means = torch.cat([torch.zeros(1), torch.linspace(-0.5, 0.5, j) + 0.02 * torch.randn(j, generator=g)])
    stds = torch.cat([torch.tensor([narrow]), 0.03 + 0.1 * torch.rand(j, generator=g)])
    pis = torch.cat([torch.tensor([0.9]), 0.1 * torch.softmax(torch.randn(j, generator=g), 0)])
    log_pis = pis.double().log()
    return means.double(), (-2 * stds.log()).double(), log_pis - log_pis.logsumexp(0)


def _naive(means: torch.Tensor, log_prec: torch.Tensor, log_pis: torch.Tensor) -> D.MixtureSameFamily:
    return D.MixtureSameFamily(D.Categorical(logits=log_pis), D.Normal(means, torch.exp(-0.5 * log_prec)))


def _weights(n: int = 5000, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([0.01 * torch.randn(n // 2, generator=g), 0.3 * torch.randn(n - n // 2, generator=g)]).double()


def test_log_prob_matches_mixture_same_family() -> None:
    means, lp, lpi = _mixture()
    w = _weights()
    ref = _naive(means, lp, lpi).log_prob(w)
    torch.testing.assert_close(mixture_log_prob(w, means, lp, lpi, chunk_size=777), ref, rtol=1e-12, atol=1e-12)


def test_exact_gradients_match_autograd_reference() -> None:
    means, lp, lpi = _mixture()
    w = _weights()
    parts = [w[:1234].reshape(2, 617), w[1234:]]
    res = mixture_nll_grad(parts, means, lp, lpi, chunk_size=500)
    leaves = [t.clone().requires_grad_(True) for t in (w, means, lp, lpi)]
    nll = -_naive(*leaves[1:]).log_prob(leaves[0]).sum()
    gw, gm, gl, gp = torch.autograd.grad(nll, leaves)
    torch.testing.assert_close(res.nll, nll.detach(), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in res.grad_w]), gw, rtol=1e-10, atol=1e-10)
    assert res.grad_w[0].shape == (2, 617)
    torch.testing.assert_close(res.grad_means, gm, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(res.grad_log_precisions, gl, rtol=1e-10, atol=1e-8)
    # Categorical(logits=...) normalises the logits: chain d/dlog_pi through that softmax
    total = res.grad_log_pis
    torch.testing.assert_close(total - lpi.exp() * total.sum(), gp, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("kernel", ["auto", "torch"])
@pytest.mark.parametrize("narrow", [0.02, 0.002])
def test_table_gradients_within_1e4_of_exact(narrow: float, kernel: str) -> None:
    means, lp, lpi = _mixture(j=16, narrow=narrow)
    w = _weights(200_000).float()
    exact = mixture_nll_grad([w], means, lp, lpi)
    table = MixtureTable(means.float(), lp.float(), lpi.float(), float(w.min()), float(w.max()), chunk_size=30_000,
                         kernel=kernel)
    assert table.fused == (kernel == "auto" and prior_kernels.AVAILABLE)
    grad = torch.zeros_like(w)
    table.accumulate_grad(w, grad, alpha=1.0)
    nll, gm, gl, gp = table.result()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b).norm() / b.norm())

    assert rel(grad, exact.grad_w[0]) < 1e-4
    assert rel(table.grad(w), exact.grad_w[0]) < 1e-4
    assert abs(float(nll) - float(exact.nll)) / abs(float(exact.nll)) < 1e-4
    assert rel(gm[1:], exact.grad_means[1:]) < 1e-4  # the zero mean is fixed: its gradient is never used
    assert rel(gl, exact.grad_log_precisions) < 1e-4
    assert rel(gp, exact.grad_log_pis) < 1e-4


@pytest.mark.skipif(not prior_kernels.AVAILABLE, reason="numba is not installed")
def test_fused_kernels_agree_with_aten_ops() -> None:
    """The numba loops and the ATen ops run the same algorithm: equal up to float32 rounding, with a mixture given as
    NumPy arrays (the callback's CPU path) or tensors, over several tensors and weights beyond the table's range."""
    means, lp, lpi = _mixture(j=16, narrow=0.005)
    ws = [_weights(70_001, seed=s).float() for s in (1, 2)]
    lo, hi = min(float(w.min()) for w in ws) + 0.01, max(float(w.max()) for w in ws)  # some weights clamp
    fused = MixtureTable(means.numpy(), lp.numpy(), lpi.numpy(), lo, hi)
    aten = MixtureTable(means.float(), lp.float(), lpi.float(), lo, hi, kernel="torch")
    assert fused.fused and not aten.fused and fused.size == aten.size
    grads = {}
    for name, table in (("fused", fused), ("aten", aten)):
        gs = [torch.full_like(w, 0.5) for w in ws]
        for w, g in zip(ws, gs, strict=True):
            table.accumulate_grad(w, g, alpha=0.3)
        grads[name] = (torch.cat(gs), table.result(), table.fine_counts)
    g_f, res_f, counts_f = grads["fused"]
    g_a, res_a, counts_a = grads["aten"]
    assert int((counts_f - counts_a).abs().sum()) <= 4  # float32 positions on a sub-cell edge may round either way
    torch.testing.assert_close(g_f, g_a, rtol=1e-5, atol=1e-5 * float(g_a.abs().max()))
    for a, b in zip(res_f, res_a, strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6 * float(b.abs().max()))
    torch.testing.assert_close(fused.grad(ws[0]), aten.grad(ws[0]), rtol=1e-5, atol=1e-5)
    # the callback's path: the same kernel on NumPy views, without the per-call checks: identical
    host = MixtureTable(means.numpy(), lp.numpy(), lpi.numpy(), lo, hi)
    gs = [torch.full_like(w, 0.5) for w in ws]
    for w, g in zip(ws, gs, strict=True):
        host.accumulate_host(w.numpy().reshape(-1), g.numpy().reshape(-1), 0.3)
    assert torch.equal(torch.cat(gs), g_f) and torch.equal(host.fine_counts, counts_f)
    for a, b in zip(host.result(), res_f, strict=True):
        assert torch.equal(a, b)
    # and all tensors in one compiled call (the callback's CPU path), with reused workspace buffers: identical for
    # the weights the table covers; those below its range are not clamped but get their exact gradient and sums
    w_all = torch.cat(ws)
    exact = mixture_nll_grad([w_all.double()], means, lp, lpi)  # for the gradients of the weights below the range
    workspace: dict[str, torch.Tensor] = {}
    for _ in range(2):
        one = MixtureTable(means.numpy(), lp.numpy(), lpi.numpy(), lo, hi, workspace=workspace)
        gs = [torch.full_like(w, 0.5) for w in ws]
        out = one.accumulate_all_host(tuple(w.numpy().reshape(-1) for w in ws),
                                      tuple(g.numpy().reshape(-1) for g in gs), 0.3)
        below = w_all < np.float32(one.lo)
        n_below = int(below.sum())
        assert n_below >= 1 and one.outside_count == n_below and not bool((w_all > np.float32(hi)).any())
        g_one = torch.cat(gs)
        assert torch.equal(g_one[~below], g_f[~below])
        torch.testing.assert_close(g_one[below].double(), 0.5 + 0.3 * exact.grad_w[0][below], rtol=1e-6, atol=1e-5)
        assert not torch.allclose(g_one[below], g_f[below])  # the clamped ones were wrong there
        expected_counts = counts_f.clone()
        expected_counts[0] -= n_below  # clamped, they had been counted in the first sub-cell
        assert torch.equal(one.fine_counts, expected_counts)
        # the sums are those of the weights inside, binned, plus the exact ones of the weights below
        inside = MixtureTable(means.numpy(), lp.numpy(), lpi.numpy(), lo, hi)
        binned = inside.accumulate_all_host((w_all[~below].numpy(),), (np.zeros(len(w_all) - n_below, np.float32),),
                                            0.3)
        assert inside.outside_count == 0
        rest = mixture_nll_grad([w_all[below].double()], means, lp, lpi)
        for a, b, c in zip(out, binned, (rest.nll, rest.grad_means, rest.grad_log_precisions, rest.grad_log_pis),
                           strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b) + c.double().numpy(), rtol=1e-9, atol=1e-9)
        assert one.weight_range is not None and one.weight_range[0] == float(w_all.min())
        assert 0 <= one.weight_range[1] - float(w_all.max()) <= one.h / one.subbins
    with pytest.raises(RuntimeError, match="fresh table"):
        one.accumulate_all_host((ws[0].numpy(),), (gs[0].numpy(),), 0.3)


@pytest.mark.skipif(not prior_kernels.AVAILABLE, reason="numba is not installed")
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_fused_pass_routes_nan_and_inf_to_the_exact_path(bad: float) -> None:
    """A non-finite weight makes the pass's loss and sums non-finite (how the callback finds it) without touching the
    table or the histogram, and leaves the other weights' gradients as they are."""
    means, lp, lpi = _mixture(j=8)
    w = _weights(10_000).float()
    lo, hi = float(w.min()), float(w.max())
    grads = []
    for value in (None, bad):
        ww = w.clone()
        if value is not None:
            ww[1234] = value
        table = MixtureTable(means.numpy(), lp.numpy(), lpi.numpy(), lo, hi)
        g = torch.zeros_like(ww)
        nll, gm, _, _ = table.accumulate_all_host((ww.numpy(),), (g.numpy(),), 0.3)
        grads.append((g, float(nll), gm, table))
    (g0, nll0, _, t0), (g1, nll1, gm1, t1) = grads
    assert np.isfinite(nll0) and not np.isfinite(nll1) and not np.isfinite(gm1).all()
    keep = torch.arange(len(w)) != 1234
    assert torch.equal(g1[keep], g0[keep]) and not torch.isfinite(g1[1234])
    assert t1.outside_count == 1 and t1.fine_counts is not None and t0.fine_counts is not None
    assert int(t1.fine_counts.sum()) == len(w) - 1


@pytest.fixture
def torch_threads():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.skipif(not prior_kernels.AVAILABLE, reason="numba is not installed")
def test_pass_on_torchs_openmp_threads_is_identical_to_one_thread(torch_threads) -> None:  # type: ignore[no-untyped-def]
    """Split over torch's OpenMP team (2 threads, and 3 on fewer cores), the per-weight pass writes the same gradients
    and histogram as on one thread, bit for bit, and the same sums (those of the weights beyond the table's range,
    computed exactly, up to the order of their additions): tensors smaller than the team, weights beyond the table's
    range on both sides, a workspace reused by a bigger grid."""
    torch_threads(2)
    if prior_kernels.team_size(1 << 20) == 1:
        if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
            pytest.fail(f"torch's OpenMP runtime was not found among the loaded libraries (torch {torch.__version__})")
        pytest.skip("torch does not run on an OpenMP runtime here")
    ws = [_weights(n, seed=n).float() for n in (1, 5, 4097, 70_001, 100_000)]
    lo, hi = min(float(w.min()) for w in ws) + 0.01, max(float(w.max()) for w in ws) - 0.01
    for narrow in (0.01, 0.002):  # the second grid is bigger than the first: the team's buffers grow
        means, lp, lpi = _mixture(j=16, narrow=narrow)
        results = {}
        workspace: dict[str, object] = {}
        for threads in (1, 2, 3, 2):
            torch_threads(threads)
            table = MixtureTable(means.numpy(), lp.numpy(), lpi.numpy(), lo, hi, workspace=workspace)
            gs = [torch.full_like(w, 0.25) for w in ws]
            out = table.accumulate_all_host(tuple(w.numpy() for w in ws), tuple(g.numpy() for g in gs), 0.3)
            assert table.fine_counts is not None and table.outside_count > 0
            assert int(table.fine_counts.sum()) + table.outside_count == sum(w.numel() for w in ws)
            results[threads] = (torch.cat(gs), table.fine_counts.clone(), [np.asarray(o) for o in out],
                                table.weight_range)
        assert "team_pass" in workspace
        for threads in (2, 3):
            assert torch.equal(results[threads][0], results[1][0])
            assert torch.equal(results[threads][1], results[1][1])
            assert results[threads][3] == results[1][3]
            # the exact sums of the weights beyond the table are added per thread, then across threads: the same
            # numbers up to the order of float64 additions
            for a, b in zip(results[threads][2], results[1][2], strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)


@pytest.mark.skipif(not prior_kernels.AVAILABLE, reason="numba is not installed")
@pytest.mark.parametrize("size", [4000, 4097, 12_289])
def test_table_build_on_torchs_openmp_threads_is_identical_to_one_thread(torch_threads, size: int) -> None:  # type: ignore[no-untyped-def]
    """A grid big enough is built split over torch's threads (in blocks of 64 points, each computed as on one
    thread): table, lists of components and statistics equal the one-thread build bit for bit, with 2 and 3 threads."""
    torch_threads(2)
    if prior_kernels.build_team_size(size, 17) == 1:
        pytest.skip("no OpenMP team of torch's here (see the per-weight pass test)")
    means, lp, lpi = _mixture(j=16, narrow=0.002)
    prec = lp.exp()
    const = lpi + 0.5 * lp - 0.5 * float(np.log(2 * np.pi))
    args = [a.numpy() for a in (means, prec, const)]
    built = {}
    for threads in (1, 2, 3):
        torch_threads(threads)
        built[threads] = prior_kernels.build_table(*args, -0.9, 1.7 / (size - 1), size, 4)

    def dense(built: tuple[torch.Tensor, np.ndarray, np.ndarray]) -> np.ndarray:
        # the compact statistics leave parts of their buffer unwritten: compare what they hold
        return prior_kernels.point_stats(built[1], built[2], size, len(means))

    for threads in (2, 3):
        assert torch.equal(built[threads][0], built[1][0])
        assert np.array_equal(built[threads][2][:, 0], built[1][2][:, 0])
        assert np.array_equal(dense(built[threads]), dense(built[1]))


_SMALL_TEAM_SCRIPT = """
import numpy as np, torch
from distill import prior_kernels
from distill.priors import MixtureTable
torch.set_num_threads(2)
assert prior_kernels.team_size(1 << 20) == 2 and prior_kernels.build_team_size(20_000, 17) == 2
rng = np.random.default_rng(0)
means = np.sort(rng.normal(0, 0.1, 17)); means[0] = 0
lp, lpi = np.full(17, 2 * np.log(1 / 0.002)), np.log(np.full(17, 1 / 17))
ws = tuple(rng.normal(0, 0.1, n).astype(np.float32) for n in (70_001, 5))
out = []
for one in (False, True):
    gs = tuple(np.full_like(w, 0.5) for w in ws)
    if one:
        with prior_kernels.one_thread():
            table = MixtureTable(means, lp, lpi, -0.4, 0.4)
            res = table.accumulate_all_host(ws, gs, 0.3)
    else:
        table = MixtureTable(means, lp, lpi, -0.4, 0.4)
        res = table.accumulate_all_host(ws, gs, 0.3)
    dense = prior_kernels.point_stats(table.stats.numpy(), table._active, table.size, 17)
    out.append((table.size, dense, np.concatenate(gs), [np.asarray(r) for r in res]))
(n1, s1, g1, r1), (n2, s2, g2, r2) = out
assert n1 == n2 > 4000 and np.array_equal(s1, s2) and np.array_equal(g1, g2)
assert all(np.array_equal(a, b) for a, b in zip(r1, r2))
print("ok")
"""


@pytest.mark.skipif(not prior_kernels.AVAILABLE or not sys.platform.startswith("linux"), reason="numba, Linux")
def test_team_smaller_than_asked_for_gives_the_same_results() -> None:
    """With ``OMP_THREAD_LIMIT=1`` the runtime hands the 2 threads asked for a team of one: that thread then takes
    all of the work (with scratch for all of it) and the results equal the one-thread path's."""
    import subprocess

    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch does not run on an OpenMP runtime here")
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    done = subprocess.run([sys.executable, "-c", _SMALL_TEAM_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_openmp_team_can_be_switched_off(monkeypatch: pytest.MonkeyPatch, torch_threads) -> None:  # type: ignore[no-untyped-def]
    """``prior_kernels.one_thread()`` and ``DISTILL_PRIOR_TEAM=0`` (read when the runtime is first looked for) keep the
    pass on one thread."""
    torch_threads(2)
    found = prior_kernels.team_size(1 << 20)
    with prior_kernels.one_thread():
        assert prior_kernels.team_size(1 << 20) == 1
    assert prior_kernels.team_size(1 << 20) == found  # restored
    monkeypatch.setattr(prior_kernels, "_TEAM", False)
    monkeypatch.setenv("DISTILL_PRIOR_TEAM", "0")
    assert prior_kernels.team_size(1 << 20) == 1
    monkeypatch.setattr(prior_kernels, "_TEAM", False)
    monkeypatch.delenv("DISTILL_PRIOR_TEAM")
    torch_threads(1)
    assert prior_kernels.team_size(1 << 20) == 1  # one torch thread: nothing to split over


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize(("narrow", "size"), [(0.002, 4000), (0.0005, 600)])
def test_table_build_matches_exact_evaluation(narrow: float, size: int, compiled: bool) -> None:
    """The table is built by a recurrence along the grid (two products per point and component, exps only every few
    points): at every grid point it equals the mixture evaluated exactly, on a fine grid (runs of 64 points) and on one
    so coarse for the narrow component that every run is one point (all exps). Also as plain Python (no numba)."""
    if compiled and not prior_kernels.AVAILABLE:
        pytest.skip("numba is not installed")
    means, lp, lpi = _mixture(j=16, narrow=narrow)
    lo, hi = -0.9, 0.8
    h = (hi - lo) / (size - 1)
    prec = lp.exp()
    const = lpi + 0.5 * lp - 0.5 * float(np.log(2 * np.pi))
    args = [a.numpy() for a in (means, prec, const)]
    if compiled:
        table, stats, active = prior_kernels.build_table(*args, lo, h, size, 4)
    else:
        table, stats = torch.empty((size - 1) * 4, 2), np.empty(prior_kernels.stats_length(size, len(means)))
        active = np.empty((prior_kernels.blocks(size), 1 + len(means)), dtype=np.int32)
        work = np.empty(prior_kernels.work_length(len(means), size))
        prior_kernels._build_kernel.py_func(*args, lo, h, 4, table.numpy(), stats, active, 0, size, work)
    dense = torch.from_numpy(prior_kernels.point_stats(stats, active, size, len(means)))
    x = lo + h * torch.arange(size, dtype=torch.float64)
    log_joint = const + (-0.5) * prec * (x[:, None] - means) ** 2
    log_p = log_joint.logsumexp(-1)
    resp = (log_joint - log_p[:, None]).exp()
    g = (resp * (x[:, None] - means) * prec).sum(-1)
    torch.testing.assert_close(dense[:, 0] + dense[:, 1].log(), log_p, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(dense[:, 2:], resp, rtol=0, atol=1e-12)
    # components that stay below 1e-16 over a block of 64 points are left out of it (the exact values above hold)
    assert 1 <= active[:, 0].min() and active[:, 0].mean() < len(means) - 2 and active[:, 0].max() <= len(means)
    torch.testing.assert_close(table[::4, 0].double(), g[:-1], rtol=1e-6, atol=1e-6 * float(g.abs().max()))


def test_table_without_numba_runs_aten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prior_kernels, "AVAILABLE", False)
    means, lp, lpi = _mixture()
    w = _weights(20_000).float()
    table = MixtureTable(means.numpy(), lp.numpy(), lpi.numpy(), float(w.min()), float(w.max()))
    assert not table.fused and table.g_start.dtype == torch.float32
    grad = torch.zeros_like(w)
    table.accumulate_grad(w, grad, alpha=1.0)
    exact = mixture_nll_grad([w], means, lp, lpi).grad_w[0]
    assert float((grad.double() - exact).norm() / exact.norm()) < 1e-4


@pytest.mark.parametrize("pi_zero_beta", [None, (2.0, 0.5)])
def test_host_mixture_equals_the_module_tensors(pi_zero_beta: tuple[float, float] | None) -> None:
    torch.manual_seed(0)
    prior = GaussianMixturePrior(5, (-0.4, 0.4), pi_zero=0.95, pi_zero_beta=pi_zero_beta)
    with torch.no_grad():
        prior.mixing_logits.normal_()
        prior.log_precisions.add_(torch.randn(6))
    means, lp, lpi = prior.host_mixture()
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float64 and a.shape == (6,) for a in (means, lp, lpi))
    np.testing.assert_allclose(means, prior.means.detach().double().numpy(), rtol=1e-7)
    np.testing.assert_allclose(lp, prior.log_precisions.detach().double().numpy(), rtol=1e-7)
    np.testing.assert_allclose(lpi, prior.log_pis().detach().double().numpy(), rtol=1e-6, atol=1e-6)
    assert np.exp(lpi).sum() == pytest.approx(1.0, abs=1e-12)


def test_host_mixture_follows_every_change_of_the_parameters() -> None:
    """The host views are kept between calls: in-place updates, new memory and new dtypes must all show."""
    prior = GaussianMixturePrior(3, (-0.3, 0.3))

    def check() -> None:
        means, lp, lpi = prior.host_mixture()
        np.testing.assert_allclose(means, prior.means.detach().double().numpy(), rtol=1e-7)
        np.testing.assert_allclose(lp, prior.log_precisions.detach().double().numpy(), rtol=1e-7)
        np.testing.assert_allclose(lpi, prior.log_pis().detach().double().numpy(), rtol=1e-6)

    check()
    with torch.no_grad():
        prior.free_means.add_(0.1)  # in place: the same memory
        prior.mixing_logits.copy_(torch.tensor([1.0, -1.0, 0.5]))
    check()
    prior.log_precisions.data = torch.full((4,), 7.0)  # new memory behind the same parameter
    check()
    prior.double()  # new memory and dtype for all three
    with torch.no_grad():
        prior.free_means.mul_(2.0)
    check()


def test_table_clamps_weights_just_outside_its_range() -> None:
    means, lp, lpi = _mixture()
    table = MixtureTable(means.float(), lp.float(), lpi.float(), -0.5, 0.5)
    w = torch.tensor([-0.50001, 0.50002])
    exact = mixture_nll_grad([w], means, lp, lpi).grad_w[0]
    torch.testing.assert_close(table.grad(w).double(), exact, rtol=1e-3, atol=1e-4)


def test_responsibilities_and_assignment() -> None:
    means, lp, lpi = _mixture()
    w = _weights(3000)
    r = responsibilities(w, means, lp, lpi)
    naive = _naive(means, lp, lpi)
    joint = naive.component_distribution.log_prob(w.unsqueeze(-1)) + lpi
    torch.testing.assert_close(r, torch.softmax(joint, -1))
    torch.testing.assert_close(r.sum(-1), torch.ones(3000, dtype=torch.float64))
    assert torch.equal(assign_components(w, means, lp, lpi, chunk_size=100), r.argmax(-1))


def test_hyperprior_densities_match_torch_distributions() -> None:
    x = torch.tensor([0.5, 3.0, 2500.0], dtype=torch.float64)
    torch.testing.assert_close(gamma_log_prob(x, 250.0, 0.1), D.Gamma(*torch.tensor([250.0, 0.1]).double()).log_prob(x))
    p = torch.tensor([0.1, 0.5, 0.999], dtype=torch.float64)
    torch.testing.assert_close(beta_log_prob(p, 2.0, 3.0), D.Beta(*torch.tensor([2.0, 3.0]).double()).log_prob(p))


@pytest.mark.parametrize(
    ("pi_zero_beta", "gamma_zero"), [(None, (5000.0, 2.0)), ((50.0, 1.0), (5000.0, 2.0)), (None, None)]
)
def test_module_gradients_from_stats_equal_autograd(
    pi_zero_beta: tuple[float, float] | None, gamma_zero: tuple[float, float] | None
) -> None:
    torch.manual_seed(0)
    prior = GaussianMixturePrior(
        5, (-0.4, 0.4), init_std=0.1, pi_zero=0.9, pi_zero_beta=pi_zero_beta, gamma_zero=gamma_zero
    ).double()
    with torch.no_grad():
        prior.mixing_logits.normal_()
        prior.log_precisions.add_(torch.randn(6, dtype=torch.float64))
    w = _weights(2000)
    scale = 0.37
    loss = prior.loss([w], scale=scale)
    names = [n for n, _ in prior.named_parameters()]
    ref = dict(zip(names, torch.autograd.grad(loss, list(prior.parameters())), strict=True))
    res = mixture_nll_grad([w], prior.means.detach(), prior.log_precisions.detach(), prior.log_pis().detach())
    hyper = prior.backward_from_stats(res.grad_means, res.grad_log_precisions, res.grad_log_pis, scale)
    torch.testing.assert_close(scale * (res.nll + hyper), loss.detach())
    for name, p in prior.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-9, atol=1e-9, msg=name)
    assert prior.means[0] == 0 and prior.means.shape == (6,)
    torch.testing.assert_close(prior.pis.sum(), torch.tensor(1.0, dtype=torch.float64))
    if pi_zero_beta is None:
        assert float(prior.pis[0]) == pytest.approx(0.9)


def test_merge_conserves_mass_and_moments() -> None:
    means = torch.tensor([0.0, 0.001, 0.3, 0.3005, 0.31, -0.4], dtype=torch.float64)
    stds = torch.tensor([0.01, 0.01, 0.02, 0.02, 0.02, 0.05], dtype=torch.float64)
    pis = torch.tensor([0.9, 0.02, 0.03, 0.01, 0.02, 0.02], dtype=torch.float64)
    m, s, p = merge_components(means, stds, pis, threshold=0.5)
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)
    assert m[0] == 0.0 and float(p[0]) == pytest.approx(0.92)
    assert m.numel() == 3  # zero(+0.001), the 0.3 cluster, -0.4
    assert torch.all(m[1:-1] <= m[2:])
    # the merged 0.3 cluster keeps the first two moments of its members
    sel = slice(2, 5)
    mass = pis[sel].sum()
    mean = (pis[sel] * means[sel]).sum() / mass
    second = (pis[sel] * (stds[sel] ** 2 + means[sel] ** 2)).sum() / mass
    k = int((m - 0.3).abs().argmin())
    assert float(p[k]) == pytest.approx(float(mass))
    assert float(m[k]) == pytest.approx(float(mean))
    assert float(s[k] ** 2) == pytest.approx(float(second - mean**2))
    again = merge_components(m, s, p, threshold=0.5)  # nothing left to merge
    for a, b in zip(again, (m, s, p), strict=True):
        torch.testing.assert_close(a, b)
    far = merge_components(means, stds, pis, threshold=0.0)
    assert far[0].numel() == 6
    mean_crit = merge_components(means, stds, pis, threshold=0.005, criterion="mean")
    assert mean_crit[0].numel() == 4


def test_merge_rejects_bad_arguments() -> None:
    x = torch.ones(3)
    with pytest.raises(ValueError, match="criterion"):
        merge_components(x, x, x, criterion="euclid")
    with pytest.raises(ValueError, match="equal length"):
        merge_components(x, torch.ones(2), x)


def test_quantize_is_idempotent_and_zeroes_exactly() -> None:
    means = torch.tensor([0.0, -0.2, 0.15, 0.3])
    stds = torch.tensor([0.01, 0.05, 0.3, 0.02])  # a wide component: its mean is not its own argmax everywhere
    pis = torch.tensor([0.9, 0.04, 0.03, 0.03])
    w = _weights(4000).float().reshape(40, 100)
    q, idx = quantize_weights(w, means, stds, pis)
    assert q.shape == w.shape and q.dtype == w.dtype
    assert set(torch.unique(q).tolist()) <= set(means.tolist())
    assert torch.all(q.reshape(-1)[idx == 0] == 0.0) and int((q == 0).sum()) == int((idx == 0).sum())
    q2, _ = quantize_weights(q, means, stds, pis)
    assert torch.equal(q2, q)
    r = responsibilities(w.reshape(-1).double(), means.double(), -2 * stds.double().log(), pis.double().log())
    assert torch.equal(idx, r.argmax(-1))


def test_prior_module_validates_arguments() -> None:
    with pytest.raises(ValueError, match="num_components"):
        GaussianMixturePrior(0)
    with pytest.raises(ValueError, match="pi_zero"):
        GaussianMixturePrior(3, pi_zero=1.0)
    with pytest.raises(ValueError, match="gamma_zero"):
        GaussianMixturePrior(3, gamma_zero=(1.0, -2.0))
    with pytest.raises(ValueError, match="init_range"):
        GaussianMixturePrior(3, init_range=(1.0, -1.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_table_handles_16_bit_weights(dtype: torch.dtype) -> None:
    """Positions on the grid run far beyond float16's range: they are computed in float32 for 16-bit weights."""
    means, lp, lpi = _mixture(narrow=0.002)
    w = _weights(5000)
    table = MixtureTable(means.float(), lp.float(), lpi.float(), float(w.min()), float(w.max()), max_grid=1 << 15)
    assert (table.size - 1) * table.subbins > 65504  # past float16's largest value
    w16 = w.to(dtype)
    grad = torch.zeros_like(w16)
    table.accumulate_grad(w16, grad, alpha=1.0)
    ref = table.grad(w16.float())
    torch.testing.assert_close(grad.float(), ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))
    assert int(table.fine_counts.sum()) == w.numel()  # type: ignore[union-attr]


@pytest.mark.skipif(not prior_kernels.AVAILABLE, reason="numba is not installed")
def test_mixture_kernels_are_correct_as_plain_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without numba the mixture's compiled loops run as Python functions: same results."""
    for name in ("_log_softmax", "_host_mixture_kernel", "_chain_rule_kernel", "_adam_kernel"):
        monkeypatch.setattr(prior_kernels, name, getattr(prior_kernels, name).py_func)
    test_host_mixture_equals_the_module_tensors((2.0, 0.5))
    test_module_gradients_from_stats_equal_autograd((50.0, 1.0), (5000.0, 2.0))
    test_module_gradients_from_stats_equal_autograd(None, None)
    w, g = np.linspace(-1, 1, 7, dtype=np.float32), np.linspace(0.5, -0.5, 7, dtype=np.float32)
    m, v = np.full(7, 0.1, np.float32), np.full(7, 0.2, np.float32)
    ref = torch.from_numpy(w.copy()).requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=1e-2, foreach=False)
    opt.state[ref] = {"step": torch.tensor(2.0), "exp_avg": torch.from_numpy(m.copy()),
                      "exp_avg_sq": torch.from_numpy(v.copy())}
    ref.grad = torch.from_numpy(g.copy())
    opt.step()
    prior_kernels.adam_update(w, g, m, v, 0.9, 0.999, 1e-2 / (1 - 0.9**3), (1 - 0.999**3) ** 0.5, 1e-8)
    np.testing.assert_allclose(w, ref.detach().numpy(), rtol=1e-6)
