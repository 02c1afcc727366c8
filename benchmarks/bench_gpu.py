"""VGG19-BN on one CUDA GPU: ``distill fit`` against a hand-written mixed-precision loop, and the GMMPrior's cost.

All three train VGG19-BN (full width, 38.9M weights) on CIFAR-10-shaped data with the teacher config's recipe (batch
128, SGD 0.05 momentum 0.9 weight decay 5e-4, fp16 autocast with a GradScaler, random crop + flip on the GPU):

- ``hand``: a minimal PyTorch loop over the images held on the GPU (what a user would write without Lightning);
- ``fit``: ``distill fit -c configs/cifar10/vgg19bn_teacher.yaml`` (``precision: 16-mixed``) as shipped;
- ``fit+prior``: the same with ``distill.callbacks.GMMPrior`` (J=16; on CUDA its fused exact Triton kernel,
  :mod:`distill.prior_cuda`).

Runs alternate (hand, fit, fit+prior, hand, ...); each reports samples/s over the steps after a warm-up and the peak
GPU memory the allocator held above what was allocated when the run began (earlier runs' leftovers collected first).
The images are the exact CIFAR-10 subset (``cifar10-subset/cifar10_exact_subset.npz`` under ``$DISTILL_DATA``)
tiled to 50,000 so that no epoch ends inside the measured steps (epoch ends, validation and checkpoints are not what
is measured); accuracy is not a result here.

    DISTILL_DATA=../shared/data python benchmarks/bench_gpu.py [--steps 200] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill import prior_cuda  # noqa: E402
from distill.callbacks import GMMPrior  # noqa: E402
from distill.cli import DistillCLI  # noqa: E402
from distill.data import CIFAR10_MEAN, CIFAR10_STD, random_crop_flip, resolve_data_dir  # noqa: E402
from models.vgg import VGG19BN  # noqa: E402

WARMUP = 20
KERNEL_CALLS = [0]  # calls of the fused CUDA prior kernel in the fit+prior runs
DRY_RUN = False  # --dry-run: the plumbing on the CPU (fp32, a few steps), no figures


def sync() -> None:
    if not DRY_RUN:
        torch.cuda.synchronize()


def peak_bytes(base: int) -> int:
    return 0 if DRY_RUN else torch.cuda.max_memory_allocated() - base


def reset_peak() -> int:
    """Free what earlier runs left (Lightning's objects hold each other in cycles) and start the peak count here;
    returns the bytes still allocated, which the peaks are measured from."""
    gc.collect()
    if DRY_RUN:
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()
SUBSET = "cifar10-subset/cifar10_exact_subset.npz"


class StepTimer(pl.Callback):
    """Wall time from the end of the warm-up steps to the end of the last step (the GPU synchronised at both)."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total, self.t0, self.t1, self.steps = warmup, total, 0.0, 0.0, 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.steps += 1
        if self.steps in (self.warmup, self.total):  # synchronised only there: the CPU may run ahead in between
            sync()
            if self.steps == self.warmup:
                self.t0 = time.perf_counter()
            else:
                self.t1 = time.perf_counter()


def tiled_subset(out_dir: Path, n: int = 50_000) -> Path:
    """The exact subset's 2,000 training images repeated to ``n`` (an epoch as long as CIFAR-10's), as an ``.npz``."""
    with np.load(resolve_data_dir(None) / SUBSET) as z:
        x, y = z["x_train_first2000"], z["y_train_first2000"]
        xt, yt = z["x_test_first1000"], z["y_test_first1000"]
    reps = -(-n // len(x))
    path = out_dir / "cifar10_tiled.npz"
    np.savez(path, x_train_first2000=np.tile(x, (reps, 1, 1, 1))[:n], y_train_first2000=np.tile(y, reps)[:n],
             x_test_first1000=xt, y_test_first1000=yt)
    return path


def hand(path: Path, steps: int, batch: int) -> tuple[float, int]:
    """The minimal loop: samples/s and peak allocated bytes."""
    base = reset_peak()
    torch.manual_seed(0)
    dev = torch.device("cpu" if DRY_RUN else "cuda")
    with np.load(path) as z:
        x_all = torch.from_numpy(z["x_train_first2000"]).permute(0, 3, 1, 2).contiguous().to(dev)
        y_all = torch.from_numpy(z["y_train_first2000"]).long().to(dev)
    mean = torch.tensor(CIFAR10_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=dev).view(1, 3, 1, 1)
    model = VGG19BN(width=0.125 if DRY_RUN else 1.0).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(dev.type, enabled=not DRY_RUN)
    order = torch.randperm(len(x_all), device=dev)
    t0 = 0.0
    for step in range(steps + WARMUP):
        if step == WARMUP:
            sync()
            t0 = time.perf_counter()
        idx = order[step * batch:(step + 1) * batch]
        x = random_crop_flip(x_all[idx].float().div_(255.0), padding=4)
        x = (x - mean) / std
        with torch.autocast(dev.type, dtype=torch.float16, enabled=not DRY_RUN):
            loss = F.cross_entropy(model(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    sync()
    return steps * batch / (time.perf_counter() - t0), peak_bytes(base)


def fit(path: Path, steps: int, batch: int, prior: bool, root: Path) -> tuple[float, int]:
    """``distill fit`` of the shipped teacher config (with a GMMPrior if ``prior``): samples/s and peak bytes."""
    base = reset_peak()
    timer = StepTimer(WARMUP, steps + WARMUP)
    callbacks: list[pl.Callback] = [timer]
    if prior:
        callbacks.append(GMMPrior(num_components=16, quantize_on_end=False, save_weights=False))
    cli = DistillCLI(
        args=[
            "-c", "configs/cifar10/vgg19bn_teacher.yaml",
            "--data.init_args.subset_file", str(path),
            "--data.init_args.download", "false",
            "--data.init_args.batch_size", str(batch),
            "--trainer.max_steps", str(steps + WARMUP),
            "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_model_summary", "false",
            "--trainer.accelerator", "cpu" if DRY_RUN else "gpu",
            "--trainer.devices", "1",
            *(("--trainer.precision", "32-true", "--model.init_args.model.init_args.width", "0.125") if DRY_RUN
              else ()),
            "--trainer.logger.init_args.save_dir", str(root / "runs"),
            "--checkpoint.dirpath", str(root / "ckpt"),
        ],
        run=False,
        trainer_defaults={"callbacks": callbacks},
    )  # fmt: skip
    real = prior_cuda.accumulate

    def counted(*args: Any, **kwargs: Any) -> None:
        KERNEL_CALLS[0] += 1
        real(*args, **kwargs)

    prior_cuda.accumulate = counted  # which path the prior took: the fused kernel counts its calls
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # progress bar drawn into memory, not a terminal
            cli.trainer.fit(cli.model, cli.datamodule)
    finally:
        prior_cuda.accumulate = real
    return steps * batch / (timer.t1 - timer.t0), peak_bytes(base)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="measured steps per run (after 20 warm-up steps)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--dry-run", action="store_true", help="check the plumbing on the CPU; no figures")
    args = parser.parse_args(argv)
    global DRY_RUN
    DRY_RUN = args.dry_run
    if not torch.cuda.is_available() and not DRY_RUN:
        raise SystemExit("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    if (args.steps + WARMUP) * args.batch > 50_000:
        raise SystemExit(f"--steps {args.steps} x --batch {args.batch} runs past one epoch of 50,000 images")
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    results: dict[str, list[tuple[float, int]]] = {"hand": [], "fit": [], "fit+prior": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = tiled_subset(root)
        for _ in range(args.repeats):
            results["hand"].append(hand(path, args.steps, args.batch))
            results["fit"].append(fit(path, args.steps, args.batch, False, root))
            results["fit+prior"].append(fit(path, args.steps, args.batch, True, root))
            print(json.dumps({k: [round(s) for s, _ in v] for k, v in results.items()}), flush=True)
    med = {k: sorted(s for s, _ in v)[len(v) // 2] for k, v in results.items()}
    peak = {k: max(m for _, m in v) for k, v in results.items()}
    out = {
        "device": "cpu (dry run)" if DRY_RUN else torch.cuda.get_device_name(), "torch": torch.__version__,
        "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
        "samples_per_s": {k: round(v) for k, v in med.items()},
        "fit_vs_hand": round(med["fit"] / med["hand"], 3),
        "step_time_ratio_prior": round(med["fit"] / med["fit+prior"], 3),
        "peak_gib": {k: round(v / 2**30, 3) for k, v in peak.items()},
        "prior_extra_peak_mib": round((peak["fit+prior"] - peak["fit"]) / 2**20, 1),
        "prior_path": "fused CUDA kernel" if KERNEL_CALLS[0] else "not the fused CUDA kernel",
    }
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
