"""The soft weight-sharing prior's cost inside ``distill fit``: a training step with ``GMMPrior`` against one without.

``bench_prior.py`` times the prior against a hand-written step (forward, backward, Adam: the strictest comparison).
This script times what a user pays: ``distill fit`` of the shipped LeNet-300-100 teacher config (``Classifier``, fused
Adam, distill's logger, checkpoints and progress bar, MNIST in memory) as it is, and with ``distill.callbacks.GMMPrior``
added with ``configs/mnist/lenet300_100_sws.yaml``'s settings (no end-of-fit quantization or weight files: only the
steps are timed), alternately in one process, median of the repeats. With ``--trained CKPT`` both runs start from
that ``distill fit`` checkpoint's network, and the prior from its mixture (a trained mixture's narrow components need
a bigger table than a fresh one).

    DISTILL_DATA=../shared/data python -m benchmarks.bench_prior_fit --threads 2 --repeats 5
    DISTILL_DATA=../shared/data python -m benchmarks.bench_prior_fit \
        --trained runs/lenet300_100_sws/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import warnings
from typing import Any

import pytorch_lightning as pl
import torch

from benchmarks.bench_prior import trained_state
from benchmarks.bench_train import WARMUP, StepTimer, run_fit
from distill.callbacks import GMMPrior, LoadWeights


class _LoadMixture(pl.Callback):
    """The trained run's mixture, once the prior has built its own (the network's weights come from ``LoadWeights``,
    as in the SWS config)."""

    def __init__(self, mixture: dict[str, torch.Tensor], prior: GMMPrior) -> None:
        self.mixture, self.prior = mixture, prior

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            self.prior.mixture.load_state_dict(self.mixture)


def sws_prior() -> GMMPrior:
    """``GMMPrior`` as ``configs/mnist/lenet300_100_sws.yaml`` sets it (tau from its first epoch: no warm-up, so that
    every timed step carries the prior at full weight; the cost does not depend on tau)."""
    return GMMPrior(num_components=16, tau=0.03, gamma=(25.0, 0.01), pi_zero=0.999, lr_means=1e-4,
                    lr_log_precisions=3e-3, lr_mixing=3e-3, quantize_on_end=False, save_weights=False)


def fit_samples_per_s(steps: int, batch: int, with_prior: bool, root: str, trained: str | None,
                      mixture: dict[str, torch.Tensor] | None) -> float:
    """Samples/s of ``distill fit`` of the teacher config over ``steps`` steps after the warm-up ones; ``trained``: a
    checkpoint whose network both runs start from, and whose ``mixture`` the prior starts from."""
    timer = StepTimer(WARMUP)
    prior = sws_prior() if with_prior else None
    callbacks: list[pl.Callback] = [] if trained is None else [LoadWeights(trained)]  # as the SWS config does
    if prior is not None:
        callbacks.append(prior)
        if mixture is not None:
            callbacks.append(_LoadMixture(mixture, prior))
    run_fit(steps, batch, [*callbacks, timer], root=root)
    return (timer.steps - WARMUP) * batch / (timer.t1 - timer.t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400, help="timed steps per fit (after the warm-up steps)")
    parser.add_argument("--repeats", type=int, default=5, help="fits each way, alternately")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--trained", metavar="CKPT", help="start both runs from this distill fit checkpoint's network "
                        "and the prior from its mixture (e.g. runs/lenet300_100_sws/checkpoints/last.ckpt)")
    args = parser.parse_args(argv)
    mixture = trained_state(args.trained)[1] if args.trained else None  # a bad path fails before any timing
    torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rates: dict[str, list[float]] = {"plain": [], "prior": []}
    with tempfile.TemporaryDirectory(prefix="distill_bench_prior_fit_") as root:
        # compiles the prior's kernels outside the timing
        fit_samples_per_s(50, args.batch, True, root, args.trained, mixture)
        for r in range(args.repeats):
            order = (False, True) if r % 2 == 0 else (True, False)
            for with_prior in order:
                rate = fit_samples_per_s(args.steps, args.batch, with_prior, root, args.trained, mixture)
                rates["prior" if with_prior else "plain"].append(rate)
    med = {k: statistics.median(v) for k, v in rates.items()}
    out: dict[str, Any] = {
        "model": "LeNet-300-100" + (", trained" if args.trained else ""), "threads": args.threads, "batch": args.batch,
        "plain_samples_per_s": round(med["plain"]), "prior_samples_per_s": round(med["prior"]),
        "plain_step_ms": round(args.batch / med["plain"] * 1e3, 3),
        "prior_step_ms": round(args.batch / med["prior"] * 1e3, 3),
        "step_ratio": round(med["plain"] / med["prior"], 3),
        "runs": {k: [round(x) for x in v] for k, v in rates.items()},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
