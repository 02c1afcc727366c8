"""Deep Compression of a trained MNIST classifier end to end, without the config's LoadWeights callback.

Loads the network of a Classifier checkpoint (the teacher), retrains it with iterative magnitude pruning, then
PruneQuantize writes ``model.dstl``, the size report and the accuracy of the decoded file into the run folder.

    DISTILL_DATA=../shared/data python -m benchmarks.deep_compression_mnist \
        --teacher runs/lenet300_100_teacher/checkpoints/last.ckpt --epochs 6 --prune-epochs 0 2 4 \
        --sparsity 0.6 0.85 0.92 --bits-fc 6 --limit-train-batches 0.5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from distill.callbacks import MagnitudePruning, PruneQuantize
from distill.compress.cli import network_from_checkpoint
from distill.data import MNISTDataModule
from distill.modules import Classifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--prune-epochs", type=int, nargs="+", default=[0, 2, 4])
    ap.add_argument("--quality", type=float, nargs="+", default=None, help="quality x std per iteration")
    ap.add_argument("--sparsity", type=float, nargs="+", default=None, help="or target sparsity per iteration")
    ap.add_argument("--bits-conv", type=int, default=8)
    ap.add_argument("--bits-fc", type=int, default=6)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--limit-train-batches", type=float, default=1.0)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--name", default="lenet300_100_deep_compression_script")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pl.seed_everything(42)
    net, _ = network_from_checkpoint(args.teacher)
    lr = args.lr
    module = Classifier(net, optimizer=lambda params: torch.optim.Adam(params, lr=lr))
    pq = PruneQuantize(bits_conv=args.bits_conv, bits_fc=args.bits_fc, finetune_epochs=args.finetune_epochs)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=TensorBoardLogger("runs", name=args.name),
        callbacks=[MagnitudePruning(quality=args.quality, sparsity=args.sparsity, prune_epochs=args.prune_epochs), pq],
        limit_train_batches=args.limit_train_batches,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=MNISTDataModule(download=False, batch_size=128, val_size=5000))
    folder = Path(trainer.log_dir or ".")
    print(json.dumps(json.loads((folder / "accuracy.json").read_text())))
    print((folder / "compression_report.md").read_text())
    print(json.dumps(json.loads((folder / "pruning_history.json").read_text())["iterations"], indent=1)[:3000])


if __name__ == "__main__":
    main()
