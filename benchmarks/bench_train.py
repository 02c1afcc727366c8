"""Training throughput: ``distill fit`` (LightningCLI + Classifier + MNISTDataModule) vs a hand-written loop.

Both train LeNet-300-100 on the same in-memory MNIST tensors (batch 128, Adam) on the CPU with 2 threads; runs
alternate (hand, bare Lightning, distill, hand, ...) so that load from other processes hits all alike, and the median
samples/s of each is compared. Warm-up steps are excluded. "bare Lightning" is the floor any LightningModule pays: a
module with nothing but the forward, the loss and the optimizer, in a Trainer without logger, checkpoints or
progress bar, fed by the same data module; "bare Lightning, probe skipped" is the same module with torch's per-step
NVML probe dropped from its optimizer as distill's modules drop it (Lightning's own floor, like for like).

distill's configs set ``fused: true`` on Adam (one kernel per tensor for the update instead of about ten ops, the same
arithmetic). The headline ratio is ``distill fit`` as shipped against the minimal loop with torch's default Adam;
the like-for-like ratios (both default, both fused) are printed beside it: they measure Lightning's own cost.
``distill fit`` runs with its default progress bar on (drawn into memory; distill's bar redraws at most every 0.1 s),
as users run it; the last row has Lightning's bar, which redraws after every batch, for comparison.

    DISTILL_DATA=../shared/data python benchmarks/bench_train.py [--steps 300] [--repeats 3]

``--phases``: instead, where a step's time goes, like for like (torch's default Adam on both sides): the hand loop's
data, forward, ``zero_grad``, backward and optimizer step timed around each call, against ``distill fit``'s step cut
at Lightning's hooks (a callback's timestamps at ``on_train_batch_start``, ``on_before_backward``,
``on_after_backward``, ``on_before_optimizer_step``, ``on_train_batch_end``, and around the module's
``training_step``); medians per phase over the steps after warm-up, both alternating ``--repeats`` times.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from distill.cli import DistillCLI
from distill.data import MNISTDataModule
from distill.module_utils import skip_idle_graph_capture_check
from models import LeNet300100

WARMUP = 20


class StepTimer(pl.Callback):
    """Wall time from the end of the warm-up steps to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.t1, self.steps = warmup, 0.0, 0.0, 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            self.t0 = time.perf_counter()
        self.t1 = time.perf_counter()


@contextlib.contextmanager
def pure_torch_env() -> Iterator[None]:
    """The environment of a script that never imported Lightning, for the hand-written loops.

    Importing Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` for the whole process, which makes every torch
    optimizer step of a CUDA build without a GPU run an NVML discovery (0.1-0.3 ms; distill's modules skip that
    check, see ``distill.module_utils.skip_idle_graph_capture_check``). A plain PyTorch script does not pay it, so
    the hand loops run without the variable.
    """
    saved = os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = saved


def hand_loop(x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, fused: bool = False) -> float:
    """The minimal loop (``fused``: Adam's one-kernel update, as distill's configs set it)."""
    with pure_torch_env():
        return _hand_loop(x, y, steps, batch, fused)


def _hand_loop(x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, fused: bool = False) -> float:
    torch.manual_seed(0)
    model = LeNet300100()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused or None)
    perm = torch.randperm(len(y))
    t0 = 0.0
    for step in range(steps + WARMUP):
        if step == WARMUP:
            t0 = time.perf_counter()
        i = (step * batch) % (len(y) - batch)
        idx = perm[i : i + batch]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


class BareModule(pl.LightningModule):
    """Nothing but the forward, the loss and the optimizer (``skip_probe``: as distill's modules build it)."""

    def __init__(self, skip_probe: bool = False) -> None:
        super().__init__()
        self.model = LeNet300100()
        self.skip_probe = skip_probe

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self.model(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        opt = torch.optim.Adam(self.parameters(), lr=1e-3)
        if self.skip_probe:
            skip_idle_graph_capture_check(opt)
        return opt


def bare_lightning(dm: MNISTDataModule, steps: int, skip_probe: bool = False) -> float:
    torch.manual_seed(0)
    timer = StepTimer(WARMUP)
    trainer = pl.Trainer(
        max_steps=steps + WARMUP, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer],
        accelerator="cpu",
    )  # fmt: skip
    trainer.fit(BareModule(skip_probe), dm)
    return (timer.steps - WARMUP) * dm.batch_size / (timer.t1 - timer.t0)


def run_fit(steps: int, batch: int, callbacks: list[pl.Callback], fused: bool = True, extra: tuple[str, ...] = (),
            root: str = "/tmp/distill_bench_runs") -> None:
    """``distill fit`` of the shipped teacher config for ``steps`` + warm-up steps, with ``callbacks`` added (bars drawn
    into memory, not a terminal), its logs and checkpoints under ``root``; ``fused=False``: torch's default Adam update
    instead."""
    cli = DistillCLI(
        args=[
            "-c", "configs/mnist/lenet300_100_teacher.yaml",
            "--model.init_args.optimizer.init_args.fused", str(fused).lower(),
            "--trainer.max_steps", str(steps + WARMUP),
            "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_model_summary", "false",
            "--trainer.accelerator", "cpu",
            "--trainer.logger.init_args.save_dir", root,
            "--checkpoint.dirpath", f"{root}/ckpt",
            "--data.batch_size", str(batch),
            "--data.download", "false",
            *extra,
        ],
        run=False,
        trainer_defaults={"callbacks": callbacks},
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # Lightning's bars write to stdout
        cli.trainer.fit(cli.model, cli.datamodule)


def distill_fit(steps: int, batch: int, fused: bool = True, lightning_bar: bool = False) -> float:
    """``distill fit`` of the shipped teacher config, with its default progress bar (drawn into memory, not a terminal).

    ``fused=False``: torch's default Adam update instead; ``lightning_bar``: Lightning's per-batch TQDMProgressBar
    instead of distill's time-limited one.
    """
    timer = StepTimer(WARMUP)
    extra = ("--trainer.callbacks+=pytorch_lightning.callbacks.TQDMProgressBar",) if lightning_bar else ()
    run_fit(steps, batch, [timer], fused, extra)
    return (timer.steps - WARMUP) * batch / (timer.t1 - timer.t0)


class Phases(pl.Callback):
    """Timestamps of a Lightning step's hooks and around ``training_step`` (wrapped on the module when fit starts)."""

    MARKS = ("batch_start", "step_start", "step_end", "before_backward", "after_backward", "before_optimizer",
             "batch_end")  # fmt: skip

    def __init__(self) -> None:
        self.t: dict[str, list[float]] = {k: [] for k in self.MARKS}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        inner, t = pl_module.training_step, self.t

        def training_step(*args: Any, **kwargs: Any) -> Any:
            t["step_start"].append(time.perf_counter())
            out = inner(*args, **kwargs)
            t["step_end"].append(time.perf_counter())
            return out

        pl_module.training_step = training_step  # type: ignore[method-assign]

    def on_train_batch_start(self, *args: Any) -> None:
        self.t["batch_start"].append(time.perf_counter())

    def on_before_backward(self, *args: Any) -> None:
        self.t["before_backward"].append(time.perf_counter())

    def on_after_backward(self, *args: Any) -> None:
        self.t["after_backward"].append(time.perf_counter())

    def on_before_optimizer_step(self, *args: Any) -> None:
        self.t["before_optimizer"].append(time.perf_counter())

    def on_train_batch_end(self, *args: Any) -> None:
        self.t["batch_end"].append(time.perf_counter())

    def medians_us(self, warmup: int) -> dict[str, float]:
        """Median microseconds from each mark to the next (the last: to the next step's ``batch_start``)."""
        n = len(self.t["batch_end"]) - 1
        out = {}
        for i, k in enumerate(self.MARKS):
            nxt = self.MARKS[i + 1] if i + 1 < len(self.MARKS) else "batch_start"
            shift = 0 if i + 1 < len(self.MARKS) else 1
            gaps = [self.t[nxt][j + shift] - self.t[k][j] for j in range(warmup, n)]
            out[f"{k} -> {nxt}"] = statistics.median(gaps) * 1e6
        return out


def fit_phases(steps: int, batch: int) -> dict[str, float]:
    """``distill fit`` of the shipped teacher config with torch's default Adam, cut into phases at its hooks."""
    phases = Phases()
    run_fit(steps, batch, [phases], fused=False)
    return phases.medians_us(WARMUP)


def hand_phases(x: torch.Tensor, y: torch.Tensor, steps: int, batch: int) -> dict[str, float]:
    """The minimal loop (torch's default Adam) with each call timed: median microseconds per phase."""
    times: dict[str, list[float]] = {k: [] for k in ("data", "forward + loss", "zero_grad", "backward", "step")}
    with pure_torch_env():
        torch.manual_seed(0)
        model = LeNet300100()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        perm = torch.randperm(len(y))
        for step in range(steps + WARMUP):
            t0 = time.perf_counter()
            i = (step * batch) % (len(y) - batch)
            idx = perm[i : i + batch]
            xb, yb = x[idx], y[idx]
            t1 = time.perf_counter()
            loss = F.cross_entropy(model(xb), yb)
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            loss.backward()
            t4 = time.perf_counter()
            opt.step()
            t5 = time.perf_counter()
            if step >= WARMUP:
                for k, a, b in zip(times, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5), strict=True):
                    times[k].append(b - a)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def print_phases(x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, repeats: int) -> None:
    for r in range(repeats):
        hand, fit = hand_phases(x, y, steps, batch), fit_phases(steps, batch)
        print(f"repeat {r + 1}: median us per step, torch's default Adam on both sides")
        print(f"  hand loop   total {sum(hand.values()):7.0f}: " + ", ".join(f"{k} {v:.0f}" for k, v in hand.items()))
        print(f"  distill fit total {sum(fit.values()):7.0f}: " + ", ".join(f"{k} {v:.0f}" for k, v in fit.items()))


def loader_epoch_seconds(dm: MNISTDataModule) -> tuple[float, float]:
    """One pass over the training set: distill's in-memory loader vs torchvision's per-sample PIL pipeline."""
    from torch.utils.data import DataLoader
    from torchvision import transforms
    from torchvision.datasets import MNIST

    t0 = time.perf_counter()
    for _ in dm.train_dataloader():
        pass
    ours = time.perf_counter() - t0
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    ds = MNIST(str(dm.data_dir), train=True, download=False, transform=tf)
    t0 = time.perf_counter()
    for _ in DataLoader(ds, batch_size=dm.batch_size, shuffle=True):
        pass
    return ours, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--phases", action="store_true", help="where a step's time goes, hand loop vs distill fit")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dm = MNISTDataModule(download=False, batch_size=args.batch)
    dm.setup("fit")
    assert dm.train_set is not None
    x, y = dm.train_set.x, dm.train_set.y
    if args.phases:
        print_phases(x, y, args.steps, args.batch, args.repeats)
        return
    kinds = ("hand", "hand_fused", "bare", "bare_skip", "fit", "fit_default", "fit_tqdm")
    runs: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.repeats):
        runs["hand"].append(hand_loop(x, y, args.steps, args.batch))
        runs["hand_fused"].append(hand_loop(x, y, args.steps, args.batch, fused=True))
        runs["bare"].append(bare_lightning(dm, args.steps))
        runs["bare_skip"].append(bare_lightning(dm, args.steps, skip_probe=True))
        runs["fit"].append(distill_fit(args.steps, args.batch))
        runs["fit_default"].append(distill_fit(args.steps, args.batch, fused=False))
        runs["fit_tqdm"].append(distill_fit(args.steps, args.batch, lightning_bar=True))
    med = {k: statistics.median(v) for k, v in runs.items()}
    labels = {
        "hand": "hand-written loop (torch's default Adam)",
        "hand_fused": "hand-written loop, fused Adam",
        "bare": "bare Lightning (default Adam)",
        "bare_skip": "  probe skipped",
        "fit": "distill fit (shipped config: fused Adam)",
        "fit_default": "distill fit, default Adam",
        "fit_tqdm": "distill fit, Lightning's per-batch bar",
    }
    for k, label in labels.items():
        print(f"{label:<42}: {med[k]:9.0f} samples/s  (runs: {[round(v) for v in runs[k]]})  "
              f"/ hand {med[k] / med['hand']:.3f}")
    print(f"ratio distill fit / minimal hand loop: {med['fit'] / med['hand']:.3f} (target >= 0.8)")
    print(f"like for like: default Adam {med['fit_default'] / med['hand']:.3f}, fused Adam "
          f"{med['fit'] / med['hand_fused']:.3f}; distill fit / bare Lightning {med['fit_default'] / med['bare']:.3f}")
    ours, pil = loader_epoch_seconds(dm)
    print(f"one epoch of batches: in-memory loader {ours:.2f} s, torchvision ToTensor+Normalize loader {pil:.2f} s")


if __name__ == "__main__":
    main()
