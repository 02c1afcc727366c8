"""Throughput of distillation: a minimal hand-written PyTorch loop vs torchdistill 1.1.5 vs ``Distiller`` in Lightning.

Side by side in one process (same in-memory tensors, threads, models and optimizer; runs interleaved hand,
torchdistill, Distiller, hand, ...; median of the repeats), on LeNet-300-100 / MNIST, batch 128, 2 CPU threads:

* ``kd``: end-to-end distillation, ``distill.losses.softmax_mse`` (MSE between the T=4 softened softmaxes);
* ``hint``: layer-wise on the fc1/fc2 outputs (``distill.losses.feature_mse`` summed over the two layers, forward
  hooks on teacher and student, one forward each).

The three sides:

* hand: ``benchmarks.bench_distill.hand_loop`` (fancy-indexed batches of the tensors, no Lightning in the way);
* torchdistill: ``get_distillation_box`` fed a ``TensorDataset`` of the same tensors, with its own data loader
  (``train_data_loader``: ``RandomSampler``, batch 128) and its standard loop (``pre_epoch_process``, then per batch
  ``forward_process`` and ``post_forward_process``). The losses are distill's own functions registered as
  torchdistill low-level losses (``register_low_level_loss``) behind its ``SimpleLossWrapper`` / ``WeightedSumLoss``;
  the hint features come from its ``forward_hook`` config. The teacher is frozen (``requires_grad: False``: run under
  ``no_grad``, not in the optimizer); no gradient clipping, no scheduler, no validation, and no per-step
  ``MetricLogger`` (the logging of torchdistill's example scripts, which the hand loop does not do either);
* Distiller: ``benchmarks.bench_distill.lightning_loop`` with ``Distiller`` built as ``bench_distill.compare`` does.

Before timing, the script asserts for each kind that on one fixed batch, with identical weights, torchdistill's loss
equals the hand loop's to 1e-6 relative, that its optimizer holds exactly the student's parameters and that a step
leaves the teacher unchanged. All sides use ``torch.optim.Adam(lr=1e-3)`` with torch's default update, or with
``--fused`` all three ``fused=True``. The hand and torchdistill loops run without the NVML-probe variable that
importing Lightning sets (``bench_train.pure_torch_env``), as scripts that never import Lightning would.

torchdistill is benchmark-only, not a dependency of distill: ``pip install torchdistill==1.1.5``.
Run from the repository root::

    DISTILL_DATA=../shared/data python -m benchmarks.bench_torchdistill [--repeats 5 --steps 300] [--fused]

Samples/s count training samples after ``--warmup`` steps; the ratios are each side / hand loop.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import RandomSampler, TensorDataset

from benchmarks.bench_distill import (
    T,
    _data,
    add_common_arguments,
    build_module,
    hand_loop,
    lightning_loop,
    quiet_lightning,
)
from benchmarks.bench_train import pure_torch_env
from distill.hooks import FeatureCapture
from distill.losses import feature_mse, softmax_mse
from models.lenet import LeNet300100

MISSING = "torchdistill is not installed: pip install torchdistill==1.1.5 (benchmark-only; not a dependency of distill)"
KINDS = ("kd", "hint")
LAYERS = ("fc1", "fc2")
SOFTMAX_MSE_KEY = "distill_softmax_mse"
FEATURE_MSE_KEY = "distill_feature_mse"


class SoftmaxMSELoss(nn.Module):
    """``distill.losses.softmax_mse`` as a torchdistill low-level loss: ``(student_logits, teacher_logits)``."""

    def __init__(self, temperature: float = T) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return softmax_mse(student_logits, teacher_logits, self.temperature)


class FeatureMSELoss(nn.Module):
    """``distill.losses.feature_mse`` as a torchdistill low-level loss: ``(student_features, teacher_features)``."""

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        return feature_mse(student_features, teacher_features)


def import_torchdistill() -> str:
    """Import torchdistill (exit with a one-line message if it is missing), register the losses; return its version."""
    try:
        import torchdistill
        from torchdistill.losses.registry import register_low_level_loss
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] == "torchdistill":
            sys.exit(MISSING)
        raise
    register_low_level_loss(key=SOFTMAX_MSE_KEY)(SoftmaxMSELoss)
    register_low_level_loss(key=FEATURE_MSE_KEY)(FeatureMSELoss)
    return str(getattr(torchdistill, "__version__", "?"))


def _term(key: str, kwargs: dict[str, Any], path: str) -> dict[str, Any]:
    """A ``WeightedSumLoss`` sub-term: loss(student ``path`` output, teacher ``path`` output), weight 1."""
    return {
        "criterion": {"key": key, "kwargs": kwargs},
        "criterion_wrapper": {
            "key": "SimpleLossWrapper",
            "kwargs": {
                "input": {"is_from_teacher": False, "module_path": path, "io": "output"},
                "target": {"is_from_teacher": True, "module_path": path, "io": "output"},
            },
        },
        "weight": 1.0,
    }


def torchdistill_config(kind: str, batch: int, fused: bool, num_epochs: int = 1) -> dict[str, Any]:
    """torchdistill's ``train_config`` (the Python form of its YAML) for one kind.

    ``kd`` reads the models' outputs (torchdistill stores them under the module path ``"."`` without any hook);
    ``hint`` hooks the fc1/fc2 outputs of both models and sums one term per layer.
    """
    if kind == "kd":
        sub_terms = {"kd": _term(SOFTMAX_MSE_KEY, {"temperature": T}, ".")}
        hooks: dict[str, Any] = {}
    elif kind == "hint":
        sub_terms = {p: _term(FEATURE_MSE_KEY, {}, p) for p in LAYERS}
        hooks = {"forward_hook": {"input": [], "output": list(LAYERS)}}
    else:
        raise ValueError(f"unknown kind {kind!r}")
    optim_kwargs: dict[str, Any] = {"lr": 1e-3}
    if fused:
        optim_kwargs["fused"] = True
    return {
        "num_epochs": num_epochs,
        "train_data_loader": {
            "dataset_id": "train",
            "sampler": {"class_or_func": RandomSampler, "kwargs": {}},  # shuffled, as the hand loop
            "kwargs": {"batch_size": batch, "num_workers": 0, "drop_last": True},
        },
        "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False, **hooks},
        "student": {"forward_proc": "forward_batch_only", "requires_grad": True, **copy.deepcopy(hooks)},
        "optimizer": {"key": "Adam", "kwargs": optim_kwargs},  # no max_grad_norm, grad_accum_step 1
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": sub_terms}},  # no model_term
    }


def build_box(
    kind: str,
    student: nn.Module,
    teacher: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int,
    fused: bool,
    num_epochs: int = 1,
) -> Any:
    """torchdistill's ``DistillationBox`` on a ``TensorDataset`` of the tensors (CPU, not distributed)."""
    from torchdistill.core.distillation import get_distillation_box

    teacher.eval()
    return get_distillation_box(
        teacher,
        student,
        {"train": TensorDataset(x, y)},
        torchdistill_config(kind, batch, fused, num_epochs),
        torch.device("cpu"),
        None,
        False,
        1,
    )


def torchdistill_loop(
    kind: str,
    student: nn.Module,
    teacher: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    args: argparse.Namespace,
    fused: bool = False,
) -> float:
    """Samples/s of torchdistill's standard training loop (its examples' ``train_one_epoch`` minus the logger)."""
    total = args.warmup + args.steps
    epochs = math.ceil(total / (len(y) // args.batch))
    box = build_box(kind, student, teacher, x, y, args.batch, fused, epochs)
    device = torch.device("cpu")
    step, start = 0, 0.0
    try:
        for epoch in range(epochs):
            box.pre_epoch_process(epoch=epoch)
            for sample_batch, targets, supp_dict in box.train_data_loader:
                if step == args.warmup:
                    start = time.perf_counter()
                sample_batch, targets = sample_batch.to(device), targets.to(device)
                loss = box.forward_process(sample_batch, targets, supp_dict)
                box.post_forward_process(loss=loss)
                step += 1
                if step == total:
                    break
            if step == total:
                break
            box.post_epoch_process()
        elapsed = time.perf_counter() - start
    finally:
        box.clean_modules()  # removes its hooks (and unfreezes the teacher's parameters: the next box refreezes)
    return args.steps * args.batch / elapsed


def _hand_loss(kind: str, student: nn.Module, teacher: nn.Module, xb: torch.Tensor) -> torch.Tensor:
    """The loss the hand loop computes on one batch."""
    teacher.eval().requires_grad_(False)
    if kind == "kd":
        with torch.no_grad():
            t = teacher(xb)
        return softmax_mse(student(xb), t, T)
    with FeatureCapture(teacher, LAYERS) as t_cap, FeatureCapture(student, LAYERS) as s_cap:
        with torch.no_grad():
            teacher(xb)
        student(xb)
        return sum(feature_mse(s_cap.outputs[p], t_cap.outputs[p]) for p in LAYERS)  # type: ignore[return-value]


def check_same_loss(kind: str, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """Assert that torchdistill's config computes the hand loop's loss, trains only the student, and nothing else."""
    torch.manual_seed(0)
    student, teacher = LeNet300100(), LeNet300100()
    xb, yb = x[: args.batch], y[: args.batch]
    ref = _hand_loss(kind, copy.deepcopy(student), copy.deepcopy(teacher), xb).item()
    box = build_box(kind, student, teacher, x, y, args.batch, args.fused)
    try:
        box.pre_epoch_process(epoch=0)
        loss = box.forward_process(xb, yb, {})
        got = loss.item()
        rel = abs(got - ref) / abs(ref)
        assert rel <= 1e-6, f"{kind}: torchdistill loss {got!r} != hand loop loss {ref!r} (rel {rel:.2e})"
        opt_params = [p for g in box.optimizer.param_groups for p in g["params"]]
        assert {id(p) for p in opt_params} == {id(p) for p in student.parameters()}, "optimizer != student params"
        assert len(opt_params) == len(list(student.parameters()))
        assert isinstance(box.optimizer, torch.optim.Adam) and box.optimizer.defaults["lr"] == 1e-3
        assert bool(box.optimizer.defaults["fused"]) == args.fused
        assert not box.teacher_updatable and box.lr_scheduler is None and box.max_grad_norm is None
        assert box.grad_accum_step == 1
        t_before = [p.detach().clone() for p in teacher.parameters()]
        s_before = {n: p.detach().clone() for n, p in student.named_parameters()}
        box.post_forward_process(loss=loss)
        assert all(torch.equal(a, b) for a, b in zip(t_before, teacher.parameters(), strict=True)), "teacher trained"
        # the step moves what the loss reaches: all of the student for kd, fc1/fc2 for hint (fc3 has no gradient)
        moved = {n for n, p in student.named_parameters() if not torch.equal(s_before[n], p)}
        assert moved == {n for n in s_before if kind == "kd" or n.split(".")[0] in LAYERS}, f"step moved {moved}"
    finally:
        box.clean_modules()
    return {"loss_hand": ref, "loss_torchdistill": got, "rel_diff": rel}


def compare(kind: str, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved repeats of the three sides for one kind; medians and ratios to the hand loop."""
    check = check_same_loss(kind, x, y, args)
    torch.manual_seed(0)
    teacher = LeNet300100()
    td_teacher = copy.deepcopy(teacher)  # same weights; torchdistill's hooks and (un)freezing stay on its own copy
    runs: dict[str, list[float]] = {"hand": [], "torchdistill": [], "distiller": []}
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit all sides alike
        torch.manual_seed(0)
        with pure_torch_env():  # as a script without Lightning would run
            runs["hand"].append(hand_loop(kind, LeNet300100(), teacher, x, y, args, LAYERS, fused=args.fused))
        torch.manual_seed(0)
        with pure_torch_env():  # torchdistill scripts do not import Lightning either
            runs["torchdistill"].append(torchdistill_loop(kind, LeNet300100(), td_teacher, x, y, args, args.fused))
        torch.manual_seed(0)
        module = build_module(kind, LeNet300100(), teacher, LAYERS, args.fused)
        runs["distiller"].append(lightning_loop(module, x, y, args))
    med = {k: statistics.median(v) for k, v in runs.items()}
    h, td, d = med["hand"], med["torchdistill"], med["distiller"]
    row = {
        "hand_samples_s": h,
        "torchdistill_samples_s": td,
        "distiller_samples_s": d,
        "ratio_torchdistill": td / h,
        "ratio_distiller": d / h,
        "ratio_distiller_vs_torchdistill": d / td,
        "fused_adam": args.fused,
        "loss_check": check,
        "runs": runs,
    }
    print(
        f"LeNet-300-100  {kind:<6} hand {h:7.0f}/s   torchdistill {td:7.0f}/s (ratio {td / h:5.3f})   "
        f"Distiller {d:7.0f}/s (ratio {d / h:5.3f})   Distiller/torchdistill {d / td:5.3f}   "
        f"[loss check rel diff {check['rel_diff']:.1e}]",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, steps=300)
    parser.add_argument("--fused", action="store_true", help="Adam(fused=True) on all three sides")
    parser.add_argument("--only", nargs="*", choices=KINDS, default=None, help="subset of kinds: kd hint")
    args = parser.parse_args()
    td_version = import_torchdistill()
    quiet_lightning()
    torch.set_num_threads(args.threads)
    x, y, _ = _data(args.synthetic)
    print(
        f"torch {torch.__version__}, torchdistill {td_version}, lightning {pl.__version__}, "
        f"threads {torch.get_num_threads()}, batch {args.batch}, {args.steps} steps after {args.warmup} warm-up, "
        f"median of {args.repeats}, Adam {'fused' if args.fused else 'default (non-fused)'}"
    )
    results: dict[str, Any] = {
        "config": {
            "torch": torch.__version__,
            "torchdistill": td_version,
            "lightning": pl.__version__,
            "threads": torch.get_num_threads(),
            "batch": args.batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "fused_adam": args.fused,
            "synthetic": args.synthetic,
        }
    }
    for kind in args.only or KINDS:
        results[f"lenet300_100/{kind}"] = compare(kind, x, y, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
