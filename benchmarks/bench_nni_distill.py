"""Throughput of distillation: a minimal hand-written PyTorch loop vs NNI 3.0's distiller vs ``Distiller``.

Side by side in one process (same in-memory tensors, threads, models and optimizer: torch's default Adam, lr 1e-3, on
every side; runs interleaved hand, NNI, Distiller, hand, ...; median of the repeats), on LeNet-300-100 / MNIST, batch
128, 2 CPU threads:

* ``hint``: layer by layer on the fc1/fc2 outputs, MSE summed over the two layers (NNI's ``apply_method: mse``,
  ``F.mse_loss``; distill's ``feature_mse``), one teacher and one student forward a step;
* ``kd``: end to end on the logits with NNI's only logit loss, Hinton's KL at its fixed T = 2 times T^2
  (``apply_method: kl``; distill's ``kd_kl`` at ``temperature=2``).

The three sides:

* hand: ``benchmarks.bench_distill.hand_loop`` (no Lightning in the way);
* NNI: ``DynamicLayerwiseDistiller`` (its layer-wise distiller; with one teacher layer linked to each student layer it
  is plain hint training) driving a ``Trainer`` through its ``LightningEvaluator``, the student a minimal
  ``LightningModule`` whose ``training_step`` returns the cross-entropy NNI adds its loss to (``origin_loss_lambda=0``:
  distillation only, as on the other sides); the Trainer as on distill's side (no logger, checkpoints, bar, summary
  or validation; distill's no-op profiler) and fed by the same in-memory data module;
* Distiller: ``benchmarks.bench_distill.lightning_loop`` with ``Distiller(mode="layerwise",
  layerwise_schedule="joint")`` (hint) or ``Distiller(loss="kd", temperature=2)`` (kd).

NNI is benchmark-only, with pins of its own: run it in a separate environment, e.g.
``python -m venv .venv-nni && . .venv-nni/bin/activate && pip install -e . nni==3.0``. From the repository root::

    DISTILL_DATA=../shared/data python -m benchmarks.bench_nni_distill [--repeats 5 --steps 400] [--only hint]

Before timing, the script asserts for each kind that on one batch, with identical weights, NNI's distillation loss
equals the hand loop's to 1e-6 relative, and after each NNI run that the student's fc1 weights changed. Samples/s count
training samples after ``--warmup`` steps; the ratios are each side / hand loop.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.bench_distill import (
    _data,
    _default_adam,
    _TensorDataModule,
    add_common_arguments,
    hand_loop,
    lightning_loop,
    quiet_lightning,
    trainer_kwargs,
)
from benchmarks.bench_train import pure_torch_env
from distill.hooks import FeatureCapture
from distill.losses import feature_mse, kd_kl
from distill.modules import Distiller
from models.lenet import LeNet300100

NNI_T = 2.0  # NNI's KL divergence has its temperature fixed at 2
LAYERS = ("fc1", "fc2")
_clock: dict[str, float] = {}  # NNI re-creates the Trainer and its callbacks from their traced arguments


class _Clock(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup and "start" not in _clock:
            _clock["start"] = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        _clock["end"] = time.perf_counter()


class StudentCE(pl.LightningModule):
    """A minimal LightningModule around the student: the task loss NNI adds its distillation loss to."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.student(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        import nni

        return nni.trace(torch.optim.Adam)(self.student.parameters(), lr=1e-3)  # NNI re-creates it from the trace


def _teacher_predict(batch: tuple[torch.Tensor, torch.Tensor], teacher: nn.Module) -> torch.Tensor:
    return teacher(batch[0])


def nni_distiller(
    kind: str, student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, args: Any
) -> Any:
    """NNI's ``DynamicLayerwiseDistiller`` for ``kind`` around ``student``, its Trainer stopping after the run."""
    import nni
    from nni.compression.distillation import DynamicLayerwiseDistiller
    from nni.compression.utils import LightningEvaluator

    trainer = nni.trace(pl.Trainer)(**trainer_kwargs(args, [_Clock(args.warmup)]))  # as on distill's side
    evaluator = LightningEvaluator(trainer, nni.trace(_TensorDataModule)(x, y, args.batch))
    names, method = (LAYERS, "mse") if kind == "hint" else (("fc3",), "kl")
    config = [  # one entry per layer: each student layer linked to the teacher's layer of the same name
        {"op_names": [f"student.{n}"], "link": n, "target_names": ["_output_"], "apply_method": method, "lambda": 1.0}
        for n in names
    ]
    return DynamicLayerwiseDistiller(StudentCE(student), config, evaluator, teacher.eval().requires_grad_(False),
                                     _teacher_predict, origin_loss_lambda=0.0)  # fmt: skip


def check_same_loss(kind: str, x: torch.Tensor, y: torch.Tensor, args: Any) -> float:
    """On one batch, with identical weights: NNI's distillation loss against the hand loop's; returns the relative
    difference (asserted below 1e-6)."""
    torch.manual_seed(0)
    student, teacher = LeNet300100(), LeNet300100()
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher).eval()
    distiller = nni_distiller(kind, student, teacher, x, y, args)
    if not distiller._is_wrapped:  # NNI wraps the student's layers while it trains; here by hand
        distiller.wrap_model()
    xb = x[: args.batch]
    with torch.no_grad():
        teacher(xb)
        student(xb)
        got = float(distiller.compute_distill_loss())
        if kind == "hint":
            t_cap = FeatureCapture(ref_teacher, LAYERS).attach()
            s_cap = FeatureCapture(ref_student, LAYERS).attach()
            ref_teacher(xb)
            ref_student(xb)
            want = float(sum(feature_mse(s_cap.outputs[p], t_cap.outputs[p]) for p in LAYERS))
        else:
            want = float(kd_kl(ref_student(xb), ref_teacher(xb), NNI_T))
    distiller.unwrap_model()
    distiller.unwrap_teacher_model()  # the teacher is shared by every run
    rel = abs(got - want) / abs(want)
    assert rel < 1e-6, f"{kind}: NNI's loss {got} differs from the hand loop's {want}"
    return rel


def nni_loop(kind: str, student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, args: Any) -> float:
    """Samples/s of NNI's ``DynamicLayerwiseDistiller`` training ``student`` in a Lightning Trainer."""
    _clock.clear()
    distiller = nni_distiller(kind, student, teacher, x, y, args)
    before = student.fc1.weight.detach().clone()  # distilled in both kinds (hint leaves fc3 without a gradient)
    # the Trainer's own max_steps ends the run: NNI 3.0 sets ``trainer.fit_loop.max_steps`` when given one, which
    # Lightning 2.x no longer allows (AttributeError: property 'max_steps' of '_FitLoop' object has no setter), and it
    # needs one of the two, so an epoch bound the run never reaches
    distiller.compress(max_steps=None, max_epochs=1_000_000)
    distiller.unwrap_model()
    distiller.unwrap_teacher_model()  # the teacher is shared by every run
    assert not torch.equal(before, student.fc1.weight), "NNI did not train the student"
    return args.steps * args.batch / (_clock["end"] - _clock["start"])


def build_distiller(kind: str, student: nn.Module, teacher: nn.Module) -> Distiller:
    if kind == "hint":
        return Distiller(student, teacher, optimizer=_default_adam, mode="layerwise", layerwise_schedule="joint",
                         layers={p: p for p in LAYERS})  # fmt: skip
    return Distiller(student, teacher, optimizer=_default_adam, loss="kd", temperature=NNI_T)


def compare(kind: str, x: torch.Tensor, y: torch.Tensor, args: Any) -> dict[str, Any]:
    rel = check_same_loss(kind, x, y, args)
    teacher = LeNet300100()
    runs: dict[str, list[float]] = {"hand": [], "nni": [], "distiller": []}
    for _ in range(args.repeats):
        torch.manual_seed(0)
        with pure_torch_env():  # as a script without Lightning would run
            runs["hand"].append(hand_loop(kind, LeNet300100(), teacher, x, y, args, LAYERS, logit_loss=kd_kl,
                                          temperature=NNI_T))  # fmt: skip
        torch.manual_seed(0)
        runs["nni"].append(nni_loop(kind, LeNet300100(), teacher, x, y, args))
        torch.manual_seed(0)
        runs["distiller"].append(lightning_loop(build_distiller(kind, LeNet300100(), teacher), x, y, args))
    med = {k: statistics.median(v) for k, v in runs.items()}
    h = med["hand"]
    print(f"LeNet-300-100 {kind:<5} hand {h:7.0f}/s   NNI {med['nni']:7.0f}/s ({med['nni'] / h:5.3f})   "
          f"Distiller {med['distiller']:7.0f}/s ({med['distiller'] / h:5.3f})   "
          f"Distiller / NNI {med['distiller'] / med['nni']:5.3f}   (NNI's loss = the hand loop's, rel. diff {rel:.1e})",
          flush=True)  # fmt: skip
    return {"medians": med, "runs": runs, "loss_rel_diff": rel}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, steps=400)
    parser.add_argument("--only", nargs="*", default=None, choices=["hint", "kd"])
    args = parser.parse_args()
    quiet_lightning()
    import logging

    logging.getLogger("nni").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    x, y, _ = _data(args.synthetic)
    print(f"torch {torch.__version__}, lightning {pl.__version__}, threads {torch.get_num_threads()}, batch "
          f"{args.batch}, {args.steps} steps after {args.warmup} warm-up, median of {args.repeats}; torch's default "
          "Adam on every side")  # fmt: skip
    results = {kind: compare(kind, x, y, args) for kind in (args.only or ["hint", "kd"])}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
