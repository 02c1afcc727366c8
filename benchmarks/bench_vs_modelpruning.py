"""Magnitude pruning head to head: Lightning's ``ModelPruning`` vs distill's Deep Compression callbacks.

Both retrain the same trained LeNet-300-100 (a ``Classifier`` checkpoint from ``distill fit``) on MNIST with the same
module, data, optimizer, seed and epochs, and prune each weight matrix to the same per-layer sparsity on the same
schedule (e.g. 50, 70, 80, 87, 92% zeros), so the pruning itself is like for like:

* Lightning: ``ModelPruning("l1_unstructured", use_global_unstructured=False, parameter_names=["weight"])`` with the
  per-epoch amounts that reach those sparsities (torch's pruning takes a fraction of the weights still unpruned),
  applied at the end of epochs ``e - 1``; the masks made permanent at the end. What a user then has is a dense state
  dict: its ``torch.save`` size is reported, and also that file gzipped and a ``torch.save`` of the weights as sparse
  COO tensors (the smallest a user gets without a format of their own).
* distill: ``MagnitudePruning(sparsity=[...], prune_epochs=[e, ...])`` (pruning at the start of epoch ``e``, the same
  moment), then ``PruneQuantize`` (per-layer k-means weight sharing, ``--finetune-epochs`` of centroid training,
  Huffman coding and relative-index sparse storage): the written ``model.dstl``, and the test accuracy of the network
  decoded from it.

    DISTILL_DATA=../shared/data python -m benchmarks.bench_vs_modelpruning \\
        --teacher runs/lenet300_100_teacher/checkpoints/last.ckpt [--epochs 24 --sparsity 0.5 0.7 0.8 0.87 0.92]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelPruning
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from distill.callbacks import MagnitudePruning, PruneQuantize
from distill.compress.cli import network_from_checkpoint
from distill.data import MNISTDataModule
from distill.modules import Classifier


def lightning_amounts(sparsity: list[float]) -> list[float]:
    """Per-iteration amounts for torch's iterative pruning (a fraction of the still unpruned weights) that reach the
    cumulative ``sparsity`` targets: ``1 - (1 - s_i) / (1 - s_{i-1})``."""
    out, prev = [], 0.0
    for s in sparsity:
        if not prev <= s < 1:
            raise ValueError(f"sparsity targets must rise within [0, 1), got {sparsity}")
        out.append(1.0 - (1.0 - s) / (1.0 - prev))
        prev = s
    return out


def _module(teacher: str, lr: float) -> Classifier:
    net, _ = network_from_checkpoint(teacher)
    return Classifier(net, optimizer=lambda params: torch.optim.Adam(params, lr=lr, fused=True))


def _trainer(args: argparse.Namespace, callbacks: list[pl.Callback], folder: Path, name: str) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=CSVLogger(str(folder), name=name),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )


def _weights(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in net.named_parameters() if n.endswith("weight")}


def _nbytes(obj: Any) -> tuple[int, bytes]:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell(), buf.getvalue()


def stored_sizes(net: nn.Module) -> dict[str, Any]:
    """What a user of a pruning tool without a file format can store of ``net``: its state dict with ``torch.save``,
    that file gzipped, and with the weights as sparse COO tensors; and the non-zero fraction of its weights."""
    weights = _weights(net)
    nonzero = sum(int(w.count_nonzero()) for w in weights.values()) / sum(w.numel() for w in weights.values())
    dense_bytes, raw = _nbytes(net.state_dict())
    sparse_state = {k: (v.to_sparse() if k.endswith("weight") else v) for k, v in net.state_dict().items()}
    sparse_bytes, _ = _nbytes(sparse_state)
    return {
        "nonzero": nonzero,
        "dense_torch_save_bytes": dense_bytes,
        "gzip_bytes": len(gzip.compress(raw, compresslevel=9)),
        "sparse_coo_torch_save_bytes": sparse_bytes,
        "per_layer_nonzero": {n: int(w.count_nonzero()) for n, w in weights.items()},
    }


def run_lightning(args: argparse.Namespace, dm: MNISTDataModule, folder: Path) -> dict[str, Any]:
    pl.seed_everything(args.seed, verbose=False)
    module = _module(args.teacher, args.lr)
    amounts = dict(zip((e - 1 for e in args.prune_epochs), lightning_amounts(args.sparsity), strict=True))
    pruning = ModelPruning(
        "l1_unstructured",
        amount=lambda epoch: amounts.get(epoch, 0.0),
        use_global_unstructured=False,
        parameter_names=["weight"],
        make_pruning_permanent=True,
        verbose=0,
    )
    trainer = _trainer(args, [pruning], folder, "modelpruning")
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - t0
    acc = float(trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"])
    return {"test_acc": acc, **stored_sizes(module.model), "wall_s": wall}


def run_distill(args: argparse.Namespace, dm: MNISTDataModule, folder: Path) -> dict[str, Any]:
    pl.seed_everything(args.seed, verbose=False)
    module = _module(args.teacher, args.lr)
    callbacks: list[pl.Callback] = [
        MagnitudePruning(sparsity=list(args.sparsity), prune_epochs=list(args.prune_epochs), history_file=None),
        PruneQuantize(bits_conv=8, bits_fc=args.bits_fc, finetune_epochs=args.finetune_epochs,
                      finetune_lr=args.finetune_lr),
    ]  # fmt: skip
    trainer = _trainer(args, callbacks, folder, "distill")
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - t0
    run = Path(trainer.log_dir or folder)
    accuracy = json.loads((run / "accuracy.json").read_text())
    totals = json.loads((run / "compression_report.json").read_text())["totals"]
    return {
        "test_acc_pruned": accuracy["before"],
        "test_acc_decoded": accuracy["decoded"],
        "nonzero": totals["nonzero_fraction"],
        "file_bytes": totals["file_bytes"],
        "compression_rate": totals["compression_rate"],
        "wall_s": wall,
    }


def add_retraining_arguments(ap: argparse.ArgumentParser) -> None:
    """The retraining settings both sides of a head-to-head share (this script and ``bench_vs_nni.py``)."""
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--bits-fc", type=int, default=5)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--finetune-lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="a Classifier checkpoint of LeNet-300-100 (distill fit)")
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--prune-epochs", type=int, nargs="+", default=[1, 5, 9, 13, 17],
                    help="distill prunes at these epochs' start, Lightning at the end of the epoch before (>= 1)")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.87, 0.92])
    add_retraining_arguments(ap)
    ap.add_argument("--out", type=Path, default=None, help="run folders (default: a temporary folder)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if len(args.prune_epochs) != len(args.sparsity) or min(args.prune_epochs) < 1:
        raise SystemExit("give one sparsity per prune epoch, and prune epochs >= 1 (Lightning prunes at epoch ends)")
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    dm = MNISTDataModule(download=False, batch_size=128, val_size=5000)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.out or Path(tmp)
        teacher_net, _ = network_from_checkpoint(args.teacher)
        dense_bytes, _ = _nbytes(teacher_net.state_dict())
        light = run_lightning(args, dm, folder)
        ours = run_distill(args, dm, folder)
    print(f"LeNet-300-100, {args.epochs} epochs, per-layer sparsity {args.sparsity} at epochs {args.prune_epochs}, "
          f"Adam {args.lr}, seed {args.seed}; dense teacher torch.save {dense_bytes:,} bytes")
    print(f"Lightning ModelPruning: test {light['test_acc']:.4f}, non-zero {light['nonzero']:.4f}, "
          f"torch.save {light['dense_torch_save_bytes']:,} B, gzip {light['gzip_bytes']:,} B, "
          f"sparse COO {light['sparse_coo_torch_save_bytes']:,} B ({light['wall_s']:.0f} s)")
    print(f"distill MagnitudePruning + PruneQuantize: test {ours['test_acc_pruned']:.4f} pruned, "
          f"{ours['test_acc_decoded']:.4f} decoded from the file, non-zero {ours['nonzero']:.4f}, "
          f"file {ours['file_bytes']:,} B ({ours['compression_rate']:.1f}x; {ours['wall_s']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"lightning": light, "distill": ours, "teacher_bytes": dense_bytes},
                                              indent=2))


if __name__ == "__main__":
    main()
