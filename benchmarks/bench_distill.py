"""Throughput of distillation: ``Distiller`` in a Lightning ``Trainer`` vs minimal hand-written PyTorch loops.

Side by side in one process (same data, threads and models; runs interleaved, median of the repeats), on
LeNet-300-100 / MNIST held in memory, batch 128, 2 CPU threads:

* ``kd``: end-to-end distillation (softened-softmax MSE), hand loop vs ``Distiller(mode="end_to_end")``;
* ``hint``: layer-wise on fc1/fc2 outputs (MSE, hooks on teacher and student, one forward each), hand loop vs
  ``Distiller(mode="layerwise", layerwise_schedule="joint")``;
* ``indep``: layer-wise independent (student fc1/fc2 fed the teacher's inputs captured by hooks), hand loop vs
  ``Distiller(layerwise_schedule="independent")``;
* ``plain``: training on labels, hand loop vs ``Classifier``: the extra cost of KD over plain training;
* with ``--lenet5``: the same on LeNet5Caffe (layer-wise on conv2/fc1 vs end to end);
* with ``--floor`` (kd): Lightning's own floor, a minimal ``LightningModule`` whose ``training_step`` is the hand
  loop's KD step (torch's default Adam), in the same Trainer as ``Distiller`` and in ``Trainer(barebones=True)``,
  Lightning's minimal-overhead mode: what any LightningModule pays, so ``Distiller`` / floor is distill's own cost.

Run from the repository root::

    DISTILL_DATA=/path/to/data python -m benchmarks.bench_distill            # MNIST in memory
    python -m benchmarks.bench_distill --synthetic                            # random tensors, same shapes

Samples/s count training samples after ``--warmup`` steps; the ratio is Distiller / hand loop. distill's configs
set ``fused: true`` on Adam (one kernel per tensor for the update, the same arithmetic): the headline ratio is the
Lightning side so configured against the minimal hand loop with torch's default Adam, and the like-for-like ratios
(both default, both fused) are printed beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.bench_train import pure_torch_env
from distill.data import InMemoryDataModule, MNISTDataModule, TensorBatchDataset
from distill.hooks import FeatureCapture
from distill.losses import feature_mse, softmax_mse
from distill.module_utils import NoOpProfiler
from distill.modules import Classifier, Distiller
from models.lenet import LeNet5Caffe, LeNet300100

T = 4.0


def _data(synthetic: bool) -> tuple[torch.Tensor, torch.Tensor, MNISTDataModule | None]:
    if synthetic:
        g = torch.Generator().manual_seed(0)
        return torch.randn(55000, 1, 28, 28, generator=g), torch.randint(0, 10, (55000,), generator=g), None
    dm = MNISTDataModule(download=False, batch_size=128, val_size=5000)
    dm.setup("fit")
    assert dm.train_set is not None
    return dm.train_set.x, dm.train_set.y, dm


def _batches(x: torch.Tensor, y: torch.Tensor, batch: int, steps: int) -> Any:
    """Shuffled batches of in-memory tensors, epoch after epoch (what a minimal hand loop does)."""
    n = len(y)
    done = 0
    while True:
        perm = torch.randperm(n)
        for i in range(0, n - batch + 1, batch):
            idx = perm[i : i + batch]
            yield x[idx], y[idx]
            done += 1
            if done == steps:
                return


def hand_loop(
    kind: str,
    student: nn.Module,
    teacher: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    args: Any,
    layers: tuple[str, ...],
    fused: bool = False,
    logit_loss: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = softmax_mse,
    temperature: float = T,
) -> float:
    """Samples/s of a minimal PyTorch loop doing the same work as the matching Distiller mode (``kd``: ``logit_loss``
    at ``temperature``)."""
    opt = torch.optim.Adam(student.parameters(), lr=1e-3, fused=fused or None)
    student.train()
    teacher.eval().requires_grad_(False)
    t_cap = s_cap = None
    if kind == "hint":
        t_cap = FeatureCapture(teacher, layers).attach()
        s_cap = FeatureCapture(student, layers).attach()
    elif kind == "indep":
        t_cap = FeatureCapture(teacher, layers, inputs=True).attach()
    s_mods = dict(student.named_modules())
    start = 0.0
    for step, (xb, yb) in enumerate(_batches(x, y, args.batch, args.warmup + args.steps)):
        if step == args.warmup:
            start = time.perf_counter()
        if kind == "plain":
            loss = F.cross_entropy(student(xb), yb)
        elif kind == "kd":
            with torch.no_grad():
                t = teacher(xb)
            loss = logit_loss(student(xb), t, temperature)
        elif kind == "hint":
            assert t_cap is not None and s_cap is not None
            with torch.no_grad():
                teacher(xb)
            student(xb)
            loss = sum(feature_mse(s_cap.outputs[p], t_cap.outputs[p]) for p in layers)  # type: ignore[assignment]
        else:  # indep
            assert t_cap is not None
            with torch.no_grad():
                teacher(xb)
            loss = sum(  # type: ignore[assignment]
                feature_mse(s_mods[p](t_cap.inputs[p]), t_cap.outputs[p]) for p in layers
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    elapsed = time.perf_counter() - start
    for cap in (t_cap, s_cap):
        if cap is not None:
            cap.detach()
    return args.steps * args.batch / elapsed


class _Timer(pl.Callback):
    """Wall time from the first measured batch's start to the last batch's end."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.warmup and not self.start:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *a: Any) -> None:
        self.end = time.perf_counter()


class _TensorDataModule(InMemoryDataModule):
    """The benchmark's tensors behind distill's in-memory data module (what ``distill fit`` trains from)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int) -> None:
        super().__init__(batch_size=batch, val_size=0)
        self._xy = (x, y)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = TensorBatchDataset(*self._xy)


class MinimalKD(pl.LightningModule):
    """The hand loop's KD step as a minimal LightningModule (no logging, no checks): Lightning's floor for KD."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.teacher = [teacher.eval().requires_grad_(False)]  # in a list: not a submodule, never in the optimizer

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, _ = batch
        with torch.no_grad():
            t = self.teacher[0](x)
        return softmax_mse(self.student(x), t, T)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _default_adam(self.student.parameters())


def trainer_kwargs(args: Any, callbacks: list[pl.Callback], barebones: bool = False) -> dict[str, Any]:
    """The benchmarks' Trainer: ``--warmup + --steps`` steps on the CPU, no validation, with ``callbacks``; default
    logger, checkpoints, progress bar and summary off and ``distill fit``'s default profiler, or Lightning's
    ``barebones`` mode (which turns those off itself and keeps its own no-op profiler)."""
    common: dict[str, Any] = {
        "accelerator": "cpu", "devices": 1, "max_steps": args.warmup + args.steps, "limit_val_batches": 0,
        "callbacks": callbacks,
    }
    if barebones:
        return {"barebones": True, **common}
    return {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "profiler": NoOpProfiler(),  # what `distill fit` sets by default (Lightning's no-op one costs ~70 us a step)
        **common,
    }


def lightning_loop(
    module: pl.LightningModule,
    x: torch.Tensor,
    y: torch.Tensor,
    args: Any,
    extra_callbacks: tuple[pl.Callback, ...] = (),
    barebones: bool = False,
) -> float:
    """Samples/s of ``module`` in a Trainer: default logger off, no progress bar, no validation, ``distill fit``'s
    default profiler.

    The batches come from an in-memory data module, as in ``distill fit`` (``--loader dataloader``: a plain
    DataLoader, whose batches take Lightning's generic device transfer).
    """
    source: Any
    if getattr(args, "loader", "datamodule") == "datamodule":
        source = {"datamodule": _TensorDataModule(x, y, args.batch)}
    else:
        source = {"train_dataloaders": torch.utils.data.DataLoader(
            TensorBatchDataset(x, y), batch_size=args.batch, shuffle=True, drop_last=True, collate_fn=lambda b: b
        )}
    timer = _Timer(args.warmup)
    trainer = pl.Trainer(**trainer_kwargs(args, [timer, *extra_callbacks], barebones))
    trainer.fit(module, **source)
    return args.steps * args.batch / (timer.end - timer.start)


def _adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3, fused=True)  # as distill's configs set it


def _default_adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


def build_module(
    kind: str, student: nn.Module, teacher: nn.Module, layers: tuple[str, ...], fused: bool
) -> pl.LightningModule:
    """The Lightning side of one kind: ``Classifier`` (plain) or ``Distiller`` (kd, hint = joint, indep)."""
    optimizer = _adam if fused else _default_adam
    if kind == "plain":
        return Classifier(student, optimizer=optimizer)
    if kind == "kd":
        return Distiller(student, teacher, optimizer=optimizer, temperature=T)
    return Distiller(
        student,
        teacher,
        optimizer=optimizer,
        mode="layerwise",
        layerwise_schedule="joint" if kind == "hint" else "independent",
        layers={p: p for p in layers},
    )


def add_common_arguments(parser: argparse.ArgumentParser, steps: int = 200) -> None:
    """The arguments the distillation benchmarks share."""
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=steps, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--synthetic", action="store_true", help="random tensors instead of MNIST")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")


def quiet_lightning() -> None:
    """No warnings or info lines from Lightning between the benchmark's own."""
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def compare(
    name: str,
    net: Callable[[], nn.Module],
    kind: str,
    layers: tuple[str, ...],
    x: torch.Tensor,
    y: torch.Tensor,
    args: Any,
) -> dict[str, float]:
    teacher = net()
    runs: dict[str, list[float]] = {"hand": [], "hand_fused": [], "lightning": [], "lightning_default": []}
    floor = getattr(args, "floor", False) and kind == "kd"
    if floor:
        runs.update(minimal_module=[], minimal_barebones=[])
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit both sides
        for fused in (False, True):
            torch.manual_seed(0)
            with pure_torch_env():  # as a script without Lightning would run
                runs["hand_fused" if fused else "hand"].append(
                    hand_loop(kind, net(), teacher, x, y, args, layers, fused=fused)
                )
            module = build_module(kind, net(), teacher, layers, fused)
            runs["lightning" if fused else "lightning_default"].append(lightning_loop(module, x, y, args))
        if floor:
            torch.manual_seed(0)
            runs["minimal_module"].append(lightning_loop(MinimalKD(net(), teacher), x, y, args))
            torch.manual_seed(0)
            runs["minimal_barebones"].append(lightning_loop(MinimalKD(net(), teacher), x, y, args, barebones=True))
    med = {k: statistics.median(v) for k, v in runs.items()}
    h, m = med["hand"], med["lightning"]
    row = {
        "hand_samples_s": h,
        "hand_fused_samples_s": med["hand_fused"],
        "lightning_samples_s": m,
        "lightning_default_adam_samples_s": med["lightning_default"],
        "ratio": m / h,
        "ratio_like_for_like_default": med["lightning_default"] / h,
        "ratio_like_for_like_fused": m / med["hand_fused"],
        "runs": runs,
    }
    if floor:
        row["minimal_module_samples_s"] = med["minimal_module"]
        row["minimal_barebones_samples_s"] = med["minimal_barebones"]
    print(
        f"{name:<14} {kind:<6} hand {h:7.0f}/s (fused {med['hand_fused']:7.0f}/s)   "
        f"{'Classifier' if kind == 'plain' else 'Distiller':<10} {m:7.0f}/s "
        f"(default Adam {med['lightning_default']:7.0f}/s)"
        f"   ratio {m / h:5.3f}   like for like: default {row['ratio_like_for_like_default']:5.3f}, "
        f"fused {row['ratio_like_for_like_fused']:5.3f}",
        flush=True,
    )
    if floor:
        d = med["lightning_default"]
        print(
            f"{'':<21} Lightning's floor (default Adam): minimal LightningModule {med['minimal_module']:7.0f}/s "
            f"({med['minimal_module'] / h:5.3f} of hand), in Trainer(barebones=True) {med['minimal_barebones']:7.0f}/s "
            f"({med['minimal_barebones'] / h:5.3f});   Distiller / minimal module {d / med['minimal_module']:5.3f}, "
            f"/ barebones {d / med['minimal_barebones']:5.3f}",
            flush=True,
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--lenet5", action="store_true", help="also LeNet5Caffe (slower)")
    parser.add_argument("--floor", action="store_true",
                        help="kd: also a minimal LightningModule, in the same Trainer and in Trainer(barebones=True)")
    parser.add_argument("--only", nargs="*", default=None, help="subset of kinds: plain kd hint indep")
    parser.add_argument("--loader", choices=["datamodule", "dataloader"], default="datamodule",
                        help="Lightning side: distill's in-memory data module (as distill fit) or a plain DataLoader")
    args = parser.parse_args()
    quiet_lightning()
    torch.set_num_threads(args.threads)
    x, y, _ = _data(args.synthetic)
    print(
        f"torch {torch.__version__}, lightning {pl.__version__}, threads {torch.get_num_threads()}, "
        f"batch {args.batch}, {args.steps} steps after {args.warmup} warm-up, median of {args.repeats}"
    )
    kinds = args.only or ["plain", "kd", "hint", "indep"]
    results: dict[str, Any] = {}
    for kind in kinds:
        results[f"lenet300_100/{kind}"] = compare("LeNet-300-100", LeNet300100, kind, ("fc1", "fc2"), x, y, args)
    if args.lenet5:
        for kind in [k for k in kinds if k in ("plain", "kd", "hint")]:
            results[f"lenet5caffe/{kind}"] = compare("LeNet5Caffe", LeNet5Caffe, kind, ("conv2", "fc1"), x, y, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
