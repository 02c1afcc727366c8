"""Magnitude pruning head to head: Microsoft NNI 3.0's scheduled pruning vs distill's Deep Compression callbacks.

The companion of ``bench_vs_modelpruning.py`` (Lightning's own ``ModelPruning``) for NNI, which drives a Lightning
``Trainer`` through its ``LightningEvaluator``. Both sides retrain the same trained LeNet-300-100 (a ``Classifier``
checkpoint from ``distill fit``) on MNIST with the same module, data, Adam, seed and epochs, and prune every weight
matrix to the same per-layer sparsity at the same steps:

* NNI: ``AGPPruner(LevelPruner(model, [{"op_types": ["Linear"], "target_names": ["weight"], "sparse_ratio": s}]),
  interval_steps=<--interval epochs of steps>, total_times=<--times>)``, NNI's gradual (AGP, Zhu & Gupta 2017)
  fine-grained magnitude pruning, its masks applied in the forward pass by NNI's module wrappers; at the end the
  wrappers are removed and the masks multiplied into the weights. What a user can then store is a dense state dict:
  its ``torch.save`` size, gzipped, and as sparse COO tensors (NNI 3.0 writes no compressed format of its own).
* distill: ``MagnitudePruning(sparsity=<NNI's AGP goals>, prune_epochs=<the epochs NNI updates them at>)``, then
  ``PruneQuantize`` (per-layer k-means, one epoch of centroid training, Huffman coding, relative-index sparse storage):
  the written ``model.dstl`` and the test accuracy of the network decoded from it.

NNI is a benchmark-only dependency with pins of its own (``filelock<3.12``, ``typeguard<4.1.3``): run it in a
separate environment, e.g. ``python -m venv .venv-nni && . .venv-nni/bin/activate && pip install -e . nni==3.0``::

    DISTILL_DATA=../shared/data python -m benchmarks.bench_vs_nni \\
        --teacher runs/lenet300_100_teacher/checkpoints/last.ckpt [--epochs 24 --interval 4 --times 5 --sparsity 0.92]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from benchmarks.bench_vs_modelpruning import _nbytes, add_retraining_arguments, run_distill, stored_sizes
from distill.compress.cli import network_from_checkpoint
from distill.data import MNISTDataModule
from distill.modules import Classifier


def agp_goals(final: float, times: int) -> list[float]:
    """NNI's AGP sparsity goals after each of its ``times`` updates: ``(1 - (1 - k / times)^3) * final``."""
    return [(1.0 - (1.0 - k / times) ** 3) * final for k in range(1, times + 1)]


def mnist() -> MNISTDataModule:
    """The MNIST data module of every side (55,000 train / 5,000 val / the 10,000 test images, batch 128)."""
    return MNISTDataModule(download=False, batch_size=128, val_size=5000)


def mnist_test_accuracy(module: pl.LightningModule, dm: MNISTDataModule | None = None) -> float:
    """``module``'s ``test/acc`` on the MNIST test set, as it runs now."""
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return float(trainer.test(module, datamodule=dm or mnist(), verbose=False)[0]["test/acc"])


def run_nni(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    import nni
    from nni.compression.pruning import AGPPruner, LevelPruner
    from nni.compression.utils import LightningEvaluator

    pl.seed_everything(args.seed, verbose=False)
    net, _ = network_from_checkpoint(args.teacher)
    adam = nni.trace(torch.optim.Adam)  # NNI re-creates the optimizer from its traced arguments
    module = Classifier(net, optimizer=lambda params: adam(params, lr=args.lr, fused=True))  # as _module, traced
    # NNI re-creates the Trainer and the data module from their traced arguments
    dm = nni.trace(MNISTDataModule)(download=False, batch_size=128, val_size=5000)
    trainer = nni.trace(pl.Trainer)(
        max_epochs=args.epochs, accelerator="cpu", logger=CSVLogger(str(folder), name="nni"), enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False,
    )  # bench_vs_modelpruning's _trainer, built through nni.trace as NNI requires
    evaluator = LightningEvaluator(trainer, dm)
    config = [{"op_types": ["Linear"], "target_names": ["weight"], "sparse_ratio": args.sparsity}]
    pruner = AGPPruner(LevelPruner(module, config), interval_steps=args.interval * args.steps_per_epoch,
                       total_times=args.times, evaluator=evaluator)  # fmt: skip
    t0 = time.perf_counter()
    _, masks = pruner.compress(max_steps=None, max_epochs=args.epochs)
    wall = time.perf_counter() - t0
    test_dm = mnist()
    acc_wrapped = mnist_test_accuracy(module, test_dm)  # masked by NNI's wrappers
    pruner.unwrap_model()
    with torch.no_grad():  # what a user keeps: the masks multiplied into the weights
        for name, mod in module.named_modules():
            if name in masks and "weight" in masks[name]:
                mod.weight.mul_(masks[name]["weight"].to(mod.weight.dtype))
    acc = mnist_test_accuracy(module, test_dm)
    return {"test_acc": acc, "test_acc_wrapped": acc_wrapped, **stored_sizes(module.model), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="a Classifier checkpoint of LeNet-300-100 (distill fit)")
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--interval", type=int, default=4, help="epochs between NNI's AGP updates")
    ap.add_argument("--times", type=int, default=5, help="number of AGP updates")
    ap.add_argument("--sparsity", type=float, default=0.92, help="final per-layer sparsity")
    add_retraining_arguments(ap)
    ap.add_argument("--only", choices=["nni", "distill"], default=None, help="run one side only")
    ap.add_argument("--out", type=Path, default=None, help="run folders (default: a temporary folder)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.interval * args.times >= args.epochs:  # the last goal needs epochs after it
        raise SystemExit(f"--interval x --times ({args.interval * args.times}) must be below --epochs "
                         f"({args.epochs})")
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "nni"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    dm = mnist()
    dm.setup("fit")
    args.steps_per_epoch = len(dm.train_dataloader())
    # distill prunes at the start of the epochs NNI's AGP updates its goals before (after interval x k epochs)
    args.prune_epochs = [args.interval * k for k in range(1, args.times + 1)]
    goals = agp_goals(args.sparsity, args.times)
    result: dict[str, Any] = {"goals": goals, "prune_epochs": args.prune_epochs}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.out or Path(tmp)
        teacher_net, _ = network_from_checkpoint(args.teacher)
        dense_bytes, _ = _nbytes(teacher_net.state_dict())
        print(f"LeNet-300-100, {args.epochs} epochs, per-layer sparsity goals {[round(g, 4) for g in goals]} at "
              f"epochs {args.prune_epochs}, Adam {args.lr}, seed {args.seed}; dense teacher torch.save "
              f"{dense_bytes:,} bytes", flush=True)  # fmt: skip
        if args.only in (None, "nni"):
            nni_run = result["nni"] = run_nni(args, folder)
            print(f"NNI AGPPruner(LevelPruner): test {nni_run['test_acc']:.4f} (masked by NNI's wrappers "
                  f"{nni_run['test_acc_wrapped']:.4f}), non-zero {nni_run['nonzero']:.4f}, "
                  f"torch.save {nni_run['dense_torch_save_bytes']:,} B, gzip {nni_run['gzip_bytes']:,} B, "
                  f"sparse COO {nni_run['sparse_coo_torch_save_bytes']:,} B ({nni_run['wall_s']:.0f} s)", flush=True)
        if args.only in (None, "distill"):
            args.sparsity = goals  # run_distill reads the per-step goals from args.sparsity
            ours = result["distill"] = run_distill(args, dm, folder)
            print(f"distill MagnitudePruning + PruneQuantize: test {ours['test_acc_pruned']:.4f} pruned, "
                  f"{ours['test_acc_decoded']:.4f} decoded from the file, non-zero {ours['nonzero']:.4f}, "
                  f"file {ours['file_bytes']:,} B ({ours['compression_rate']:.1f}x; {ours['wall_s']:.0f} s)",
                  flush=True)  # fmt: skip
    result["teacher_bytes"] = dense_bytes
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
