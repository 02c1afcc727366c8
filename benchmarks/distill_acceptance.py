"""The acceptance runs of issue 3 on real MNIST: every run is a ``distill fit`` of a shipped config, then the test set.

1. ``small``: a smaller student (LeNet-300-100) distilled from a stronger teacher (LeNet5Caffe,
   ``configs/mnist/lenet5_to_lenet300_distill.yaml``) against the same student trained on the labels alone with the
   same budget (``configs/mnist/lenet300_100_teacher.yaml`` cut to the distillation config's epochs and cosine
   schedule), over several seeds: Hinton et al. (2015) saw 146 -> 74 test errors on MNIST.
2. ``same``: same-architecture retraining (LeNet-300-100 student from its LeNet-300-100 teacher), end to end
   (``configs/mnist/lenet300_100_distill.yaml``) and layer-wise (``configs/mnist/lenet300_100_layerwise.yaml``),
   against the teacher's own test accuracy (target: within 0.1 points).

The student of each run's ``last.ckpt`` (the full budget, not a checkpoint picked on validation) is evaluated on the
10,000 MNIST test images; the teachers must exist (``distill fit -c configs/mnist/lenet300_100_teacher.yaml`` and
``configs/mnist/lenet5_caffe_teacher.yaml``).

    DISTILL_DATA=../shared/data python -m benchmarks.distill_acceptance --seeds 1 2 3 --json distill_acceptance.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from distill.compress.pipeline import evaluate_accuracy
from distill.data import MNISTDataModule
from distill.distillation import load_network
from distill.io import atomic_write_json

LENET300_TEACHER = "runs/lenet300_100_teacher/checkpoints/last.ckpt"
LENET5_TEACHER = "runs/lenet5_caffe_teacher/checkpoints/last.ckpt"


def fit(config: str, name: str, seed: int | None, extra: list[str]) -> tuple[Path, float]:
    """``distill fit -c config`` into ``runs/<name>``; returns its ``last.ckpt`` and the wall time."""
    cmd = [sys.executable, "-m", "distill", "fit", "-c", config,
           "--trainer.logger.init_args.name", name, "--checkpoint.dirpath", f"runs/{name}/checkpoints",
           "--trainer.enable_progress_bar", "false", *extra]
    if seed is not None:
        cmd += ["--seed_everything", str(seed)]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return Path(f"runs/{name}/checkpoints/last.ckpt"), time.perf_counter() - t0


def test_accuracy(ckpt: str | Path, dm: MNISTDataModule) -> float:
    net = load_network(ckpt, role="evaluated")
    return evaluate_accuracy(net, dm.test_dataloader(), "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--only", choices=["small", "same"], default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    for t in (LENET300_TEACHER, LENET5_TEACHER):
        if not Path(t).is_file():
            raise SystemExit(f"teacher checkpoint {t} is missing: train it first (see this script's docstring)")
    dm = MNISTDataModule(batch_size=1000, val_size=5000)
    dm.setup("test")
    out: dict[str, Any] = {"teachers": {"lenet300_100": test_accuracy(LENET300_TEACHER, dm),
                                        "lenet5_caffe": test_accuracy(LENET5_TEACHER, dm)}}
    print(json.dumps(out["teachers"]), flush=True)
    if args.only in (None, "small"):
        rows: dict[str, list[float]] = {"labels_only": [], "distilled": []}
        for seed in args.seeds:
            ckpt, _ = fit("configs/mnist/lenet300_100_teacher.yaml", f"acceptance_labels_s{seed}", seed,
                          ["--trainer.max_epochs", "10", "--model.lr_scheduler.init_args.T_max", "10"])
            rows["labels_only"].append(test_accuracy(ckpt, dm))
            ckpt, _ = fit("configs/mnist/lenet5_to_lenet300_distill.yaml", f"acceptance_kd_s{seed}", seed, [])
            rows["distilled"].append(test_accuracy(ckpt, dm))
            print(seed, rows["labels_only"][-1], rows["distilled"][-1], flush=True)
        out["small_student"] = {
            k: {"accuracy": v, "errors": [round((1 - a) * 10000) for a in v], "mean_errors": statistics.mean(
                (1 - a) * 10000 for a in v)} for k, v in rows.items()}
    if args.only in (None, "same"):
        same: dict[str, Any] = {}
        for key, config in (("end_to_end", "configs/mnist/lenet300_100_distill.yaml"),
                            ("layerwise", "configs/mnist/lenet300_100_layerwise.yaml")):
            ckpt, wall = fit(config, f"acceptance_same_{key}", None, [])
            acc = test_accuracy(ckpt, dm)
            same[key] = {"accuracy": acc, "minus_teacher_points": 100 * (acc - out["teachers"]["lenet300_100"]),
                         "wall_s": wall}
            print(key, same[key], flush=True)
        out["same_architecture"] = same
    print(json.dumps(out, indent=2))
    if args.json:
        atomic_write_json(args.json, out, indent=2)


if __name__ == "__main__":
    main()
