"""The end of a compression run again, from its ``last.ckpt``, with other codebooks: no training.

A run of a config with ``PruneQuantize`` (and maybe ``GMMPrior``) ends by quantizing the trained network and writing
the file. This script restores the run's last checkpoint (network, mixture, pruning masks) into the same config, skips
the training loop, and runs ``PruneQuantize`` with the codebook asked for, so that codebooks are compared on the very
same trained weights: with a soft weight-sharing run, the prior's merged means (``gmm``, what the run did) or the
prior's zeros with per-layer k-means codebooks of ``BITS`` bits (``kmeans:BITS``); with any run, ``kmeans:BITS``.
``--finetune`` / ``--finetune-lr`` / ``--finetune-epochs`` change the trained quantization of every variant. Each
variant writes its own run folder under ``--out``.

    DISTILL_DATA=../shared/data python benchmarks/requantize_sws.py -c configs/mnist/lenet5_caffe_sws.yaml \\
        --ckpt runs/lenet5_caffe_sws/checkpoints/last.ckpt --variants gmm kmeans:4 kmeans:5 --out runs/requantize
    DISTILL_DATA=../shared/data python benchmarks/requantize_sws.py -c configs/mnist/lenet300_100_headline.yaml \\
        --ckpt runs/lenet300_100_headline/checkpoints/last.ckpt --variants kmeans:4 kmeans:3 --finetune weights
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.callbacks import GMMPrior  # noqa: E402
from distill.callbacks.prune_quantize import PruneQuantize  # noqa: E402
from distill.cli import DistillCLI  # noqa: E402
from distill.errors import read_checkpoint  # noqa: E402


def requantize(config: str, ckpt: str, codebook: str, bits: int | None, out: Path, finetune_epochs: int | None,
               finetune: str | None = None, finetune_lr: float | None = None) -> dict[str, Any]:
    name = f"{codebook}{bits or ''}{finetune or ''}{finetune_lr or ''}"
    cli = DistillCLI(args=["-c", config, "--trainer.logger.init_args.save_dir", str(out),
                           "--trainer.logger.init_args.name", name,
                           "--trainer.enable_progress_bar", "false", "--checkpoint.dirpath", str(out / "ckpt")],
                     run=False)
    trainer, model = cli.trainer, cli.model
    gmm = next((c for c in trainer.callbacks if isinstance(c, GMMPrior)), None)  # type: ignore[attr-defined]
    pq = next((c for c in trainer.callbacks if isinstance(c, PruneQuantize)), None)  # type: ignore[attr-defined]
    if pq is None:
        raise SystemExit(f"{config}: needs a PruneQuantize callback")
    if gmm is None and codebook != "kmeans":
        raise SystemExit(f"{config}: has no GMMPrior, so only kmeans:BITS variants apply (got {codebook!r})")
    # the training loop is over as soon as it starts: only the restore and the fit-start hooks run
    trainer.fit_loop.max_epochs = int(read_checkpoint(ckpt, "--ckpt")["epoch"]) + 1
    for cb in (c for c in (gmm, pq) if c is not None):
        cb.on_train_end = lambda *args, **kwargs: None  # type: ignore[method-assign]
    trainer.fit(model, datamodule=cli.datamodule, ckpt_path=ckpt)
    pq.codebook = codebook
    if bits is not None:
        pq.bits_conv = pq.bits_fc = bits
    if finetune_epochs is not None:
        pq.finetune_epochs = finetune_epochs
    if finetune is not None:
        pq.finetune = finetune
    if finetune_lr is not None:
        pq.finetune_lr = finetune_lr
    result = pq.compress(trainer, model)
    totals = result["report"]["totals"]
    return {"codebook": codebook, "bits": bits, "finetune": pq.finetune, "finetune_lr": pq.finetune_lr,
            **result["accuracy"], "nonzero": round(totals["nonzero_fraction"], 5), "file_bytes": totals["file_bytes"],
            "rate": round(totals["compression_rate"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--ckpt", required=True, help="the run's last.ckpt")
    parser.add_argument("--variants", nargs="+", default=["gmm", "kmeans:4", "kmeans:5"],
                        help="gmm, or kmeans:BITS (per-layer k-means over the prior's non-zero weights)")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="default: the config's")
    parser.add_argument("--finetune", choices=["centroids", "weights"], default=None, help="default: the config's")
    parser.add_argument("--finetune-lr", type=float, default=None, help="default: the config's")
    parser.add_argument("--out", type=Path, default=Path("runs/requantize"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for variant in args.variants:
        codebook, _, bits = variant.partition(":")
        row = requantize(args.config, args.ckpt, codebook, int(bits) if bits else None, args.out, args.finetune_epochs,
                         args.finetune, args.finetune_lr)  # fmt: skip
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
