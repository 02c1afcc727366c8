"""Cost of the soft weight-sharing prior next to a training step (CPU, or CUDA when available).

Side by side, interleaved in one run: a plain training step (forward, backward, Adam step) against the same step plus
the prior as ``GMMPrior`` applies it (tabulated gradient added to ``.grad``, mixture gradients, mixture Adam step),
with its fused numba kernels (``prior``, the default on a CPU) and as ATen ops only (``prior_aten``, ``kernel="torch"``,
what runs on CUDA), and with more than one torch thread the fused prior with its per-weight pass kept on one thread
(``prior_one_thread``; by default it runs on torch's OpenMP team), the table's build alone both ways, and the
weights' ranges right after a backward pass (torch's ``aminmax``, as the callback does, and NumPy);
then, separately, the naive ``N x (J+1)`` autograd version; relative error of the prior's weight gradient against the
exact float64 one; on VGG19BN the extra peak memory and the step-time ratio.

    python benchmarks/bench_prior.py                 # LeNet-300-100, LeNet5Caffe, VGG19BN (batch 8)
    python benchmarks/bench_prior.py --skip-vgg --threads 1
    python benchmarks/bench_prior.py --skip-vgg --threads 2 --fused-adam      # the network's Adam fused, as configs
    python benchmarks/bench_prior.py --skip-vgg --trained runs/lenet300_100_sws/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill import prior_kernels  # noqa: E402
from distill.callbacks.gmm_prior import GMMPrior  # noqa: E402
from distill.module_utils import skip_idle_graph_capture_check  # noqa: E402
from distill.priors import MixtureTable, mixture_nll_grad  # noqa: E402
from models.lenet import LeNet5Caffe, LeNet300100  # noqa: E402
from models.vgg import VGG19BN  # noqa: E402

FUSED_ADAM = False  # --fused-adam: the network's Adam as distill's configs build it (a shorter plain step)


def setup(model: nn.Module, device: torch.device, method: str = "auto", kernel: str = "auto"
          ) -> tuple[GMMPrior, list[nn.Parameter]]:
    cb = GMMPrior(num_components=16, quantize_on_end=False, save_weights=False, method=method, dataset_size=60000,
                  kernel=kernel)
    cb._params = cb.filter_parameters(model)  # type: ignore[arg-type]
    cb.num_weights = sum(p.numel() for p in cb._params.values())
    weights = list(cb._params.values())
    with torch.no_grad():
        lo, hi = min(float(w.min()) for w in weights), max(float(w.max()) for w in weights)
        cb.mixture.free_means.copy_(torch.linspace(lo, hi, 16))
        cb.mixture.log_precisions.fill_(-2 * torch.log(torch.tensor(0.02)).item())  # trained-like widths
    cb.mixture.to(device)
    cb.optimizer = cb._build_optimizer()
    return cb, weights


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def trained_state(path: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(network state_dict, GMMPrior mixture state)`` from a ``distill fit`` checkpoint of a run with a GMMPrior:
    late in training the components are narrow (std ~0.003-0.005) and the table has ~10x the points of the fresh
    mixture the default benchmark uses."""
    if not Path(path).is_file():
        raise SystemExit(f"--trained {path}: no such file (a distill fit checkpoint, e.g. its last.ckpt)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    prior = next((v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("GMMPrior")), None)
    if prior is None:
        raise SystemExit(f"{path}: no GMMPrior state in this checkpoint (a run with distill.callbacks.GMMPrior?)")
    net = {k.split(".", 1)[1]: v for k, v in ckpt["state_dict"].items() if k.startswith(("model.", "student."))}
    return net, prior["mixture"]


def bench(name: str, model: nn.Module, batch: int, in_shape: tuple[int, ...], device: torch.device, reps: int,
          naive: bool, state: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
    if state is not None:
        model.load_state_dict(state[0])
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=FUSED_ADAM or None)
    skip_idle_graph_capture_check(opt)  # as distill's modules build it (no per-step NVML probe without a GPU)
    x = torch.randn(batch, *in_shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    cb, weights = setup(model, device)
    cb_torch, _ = setup(model, device, kernel="torch")  # the same prior as ATen ops only (no numba kernels)
    if state is not None:
        for prior in (cb, cb_torch):
            prior.mixture.load_state_dict({k: v.to(device) for k, v in state[1].items()})
    scale = 5e-3 / 60000

    def plain() -> None:
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def prior_step(prior: GMMPrior) -> Any:
        def step() -> None:
            opt.zero_grad(set_to_none=False)
            F.cross_entropy(model(x), y).backward()
            prior.apply_prior_gradient(scale)
            prior.step_mixture()  # as the callback does in on_before_optimizer_step
            opt.step()

        return step

    with_prior, with_prior_aten = prior_step(cb), prior_step(cb_torch)

    def naive_step() -> None:
        opt.zero_grad(set_to_none=False)
        mix = cb.mixture
        loss = F.cross_entropy(model(x), y)
        w = torch.cat([p.reshape(-1) for p in weights])
        d = w.unsqueeze(-1) - mix.means  # (N, J+1) through autograd
        logp = torch.logsumexp(mix.log_pis() + 0.5 * mix.log_precisions - 0.5 * mix.log_precisions.exp() * d * d
                               - 0.9189385332046727, dim=-1)
        (loss + scale * (-logp.sum() + mix.hyperprior_nll())).backward()
        opt.step()

    def timed(f: Any) -> float:
        sync(device)
        t = time.perf_counter()
        f()
        sync(device)
        return time.perf_counter() - t

    fns = {"plain": plain, "prior": with_prior, "prior_aten": with_prior_aten}
    if device.type == "cpu" and prior_kernels.team_size(cb.num_weights) > 1:
        def prior_one_thread() -> None:  # the per-weight pass kept off torch's OpenMP team, for comparison
            with prior_kernels.one_thread():
                with_prior()

        fns["prior_one_thread"] = prior_one_thread
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():  # warm-up
        f()
    for _ in range(reps):  # interleaved so that load on the machine hits both alike
        for k, f in fns.items():
            times[k].append(timed(f))
    if naive:  # after, not interleaved: its N x (J+1) temporaries (36 MB) would evict the others' working sets
        naive_step()
        times["naive"] = [timed(naive_step) for _ in range(max(3, reps // 5))]
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    # gradient accuracy of the step's prior gradient vs the exact float64 one
    for p in weights:
        p.grad = torch.zeros_like(p)
    cb.apply_prior_gradient(1.0)
    got = torch.cat([p.grad.reshape(-1) for p in weights]).double()  # type: ignore[union-attr]
    mix = cb.mixture
    ref = mixture_nll_grad([p.detach().double() for p in weights], mix.means.detach().double(),
                           mix.log_precisions.detach().double(), mix.log_pis().detach().double(), chunk_size=1 << 18)
    exact = torch.cat([g.reshape(-1) for g in ref.grad_w])
    rel = float((got - exact).norm() / exact.norm())
    out = {"model": name, "weights": cb.num_weights, "batch": batch, "device": str(device),
           "plain_ms": round(med["plain"], 3), "prior_ms": round(med["prior"], 3),
           "ratio": round(med["prior"] / med["plain"], 3), "prior_aten_ms": round(med["prior_aten"], 3),
           "ratio_aten": round(med["prior_aten"] / med["plain"], 3), "grad_rel_err": rel}
    if device.type == "cpu":
        out.update(table_build_times(cb, weights, reps))
        out.update(weight_range_times(weights, lambda: F.cross_entropy(model(x), y).backward(), reps))
    if "prior_one_thread" in med:
        out["prior_one_thread_ms"] = round(med["prior_one_thread"], 3)
        out["ratio_one_thread"] = round(med["prior_one_thread"] / med["plain"], 3)
    if naive:
        out["naive_ms"] = round(med["naive"], 3)
        out["naive_ratio"] = round(med["naive"] / med["plain"], 2)
    return out


def weight_range_times(weights: list[nn.Parameter], backward: Any, reps: int) -> dict[str, Any]:
    """The weights' ``(min, max)`` right after a backward pass (where the prior computes them), microseconds, median,
    alternately as ``GMMPrior`` does it (torch's one-pass ``aminmax``) and with NumPy's ``min()`` and ``max()``."""
    arrays = [p.detach().numpy().reshape(-1) for p in weights]

    def with_numpy() -> None:
        for a in arrays:
            float(a.min()), float(a.max())

    def with_torch() -> None:
        GMMPrior._weight_ranges(weights, on_cpu=True)

    times: dict[str, list[float]] = {"ranges_torch_us": [], "ranges_numpy_us": []}
    for i in range(2 * max(reps, 5)):  # reps: 30-60 on the LeNets, 3 on VGG19BN (a backward each)
        backward()
        key, f = ("ranges_torch_us", with_torch) if i % 2 else ("ranges_numpy_us", with_numpy)
        t = time.perf_counter()
        f()
        times[key].append(time.perf_counter() - t)
    return {k: round(sorted(v)[len(v) // 2] * 1e6, 1) for k, v in times.items()}


def table_build_times(cb: GMMPrior, weights: list[nn.Parameter], reps: int) -> dict[str, Any]:
    """Building the table alone for the current mixture and weights (microseconds, median), interleaved: as the
    callback builds it and, with more than one torch thread, kept on one thread."""
    m, lp, lpi = cb.mixture.host_mixture()
    lo = min(float(p.detach().min()) for p in weights)
    hi = max(float(p.detach().max()) for p in weights)
    workspace: dict[str, Any] = {}

    def build() -> MixtureTable:
        return MixtureTable(m, lp, lpi, lo, hi, spacing=cb.grid_spacing, workspace=workspace)

    def build_one_thread() -> None:
        with prior_kernels.one_thread():
            build()

    fns: dict[str, Any] = {"table_build_us": build}
    if prior_kernels.build_team_size(build().size, len(m)) > 1:
        fns["table_build_one_thread_us"] = build_one_thread
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(reps, 30)):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    out: dict[str, Any] = {"table_points": build().size}
    out.update({k: round(sorted(v)[len(v) // 2] * 1e6, 1) for k, v in times.items()})
    return out


def peak_extra_memory(device: torch.device, batch: int) -> dict[str, Any]:
    """Extra peak memory of one prior application on VGG19BN (CUDA: allocator peak; CPU: tracemalloc-free estimate
    via torch's CPU allocations is not exposed, so the RSS high-water mark of the prior alone is measured)."""
    # compile/load the kernels first (numba's code and LLVM raise the RSS once per process, not per weight)
    warm, warm_weights = setup(LeNet300100().to(device), device)
    for p in warm_weights:
        p.grad = torch.zeros_like(p)
    warm.apply_prior_gradient(1e-7)
    model = VGG19BN().to(device)
    cb, weights = setup(model, device)
    for p in weights:
        p.grad = torch.zeros_like(p)
    n = cb.num_weights
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        cb.apply_prior_gradient(1e-7)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        import resource

        gc.collect()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        cb.apply_prior_gradient(1e-7)
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"model": "VGG19BN", "weights": n, "extra_peak_bytes": int(extra),
            "extra_bytes_per_weight": round(extra / n, 2), "naive_would_need_bytes": n * 17 * 4 * 3}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fused-adam", action="store_true", help="the network's Adam with fused=True (as configs)")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--skip-vgg", action="store_true")
    parser.add_argument("--vgg-batch", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trained", metavar="CKPT", help="also time LeNet-300-100 with the weights and mixture of "
                        "this checkpoint (e.g. runs/lenet300_100_sws/checkpoints/last.ckpt)")
    args = parser.parse_args(argv)
    trained = trained_state(args.trained) if args.trained else None  # a bad path fails before any timing
    torch.set_num_threads(args.threads)
    global FUSED_ADAM
    FUSED_ADAM = args.fused_adam
    device = torch.device(args.device)
    results = []
    if not args.skip_vgg:  # memory first, while the process's RSS high-water mark is low
        results.append(peak_extra_memory(device, args.vgg_batch))
        print(json.dumps(results[-1]), flush=True)
    nets = (("LeNet-300-100", LeNet300100(), (1, 28, 28)), ("LeNet5Caffe", LeNet5Caffe(), (1, 28, 28)))
    for name, model, shape in nets:
        results.append(bench(name, model, 128, shape, device, args.reps, naive=True))
        print(json.dumps(results[-1]), flush=True)
    if trained is not None:
        results.append(bench("LeNet-300-100, trained", LeNet300100(), 128, (1, 28, 28), device, args.reps,
                             naive=False, state=trained))
        print(json.dumps(results[-1]), flush=True)
    if not args.skip_vgg:
        results.append(bench("VGG19BN", VGG19BN(), args.vgg_batch, (3, 32, 32), device, max(3, args.reps // 10),
                             naive=False))
        print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
