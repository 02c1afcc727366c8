"""Weight quantization head to head: NNI 3.0's quantization-aware training vs distill's trained k-means sharing.

Both start from the same trained LeNet-300-100 (a ``Classifier`` checkpoint from ``distill fit``, no pruning), quantize
the weights of every ``Linear`` layer to ``b`` bits (one codebook / one scale per layer; biases and activations stay
float32 on both sides) and get one epoch of MNIST training (55,000 images, batch 128) to recover:

* NNI: ``QATQuantizer`` (Jacob et al. 2018: fake-quantized weights in the forward pass, straight-through gradients into
  the float weights, which the module's optimizer trains; Adam, ``--lr``) with ``quant_dtype: int<b>``, affine, per
  layer, driven through its ``LightningEvaluator``. Its accuracy is the test accuracy of the network as NNI runs it,
  fake-quantized by its module wrappers. NNI 3.0 stores no packed file: a user keeps the float state dict plus the
  calibration (scale, zero point); the table also gives the ideal size of ``b``-bit codes packed by hand
  (``b`` bits a weight + float32 biases + a scale and zero point a layer), which no tool here writes.
* distill: ``distill.compress.pipeline.deep_compress`` (what the ``PruneQuantize`` callback runs): per-layer k-means
  with ``2^b`` shared values (Han et al. 2016), one epoch of trained quantization (``--finetune centroids``: SGD on
  the shared values, Han's; ``--finetune weights``: quantization-aware training of the weights, the codebooks kept
  as their k-means; ``--finetune-lr``), Huffman coding, the ``.dstl`` file; its accuracy is that of the network
  decoded from the file.

NNI is benchmark-only, with pins of its own: run it in a separate environment, e.g.
``python -m venv .venv-nni && . .venv-nni/bin/activate && pip install -e . nni==3.0``. From the repository root::

    DISTILL_DATA=../shared/data python -m benchmarks.bench_nni_quant \\
        --teacher runs/lenet300_100_teacher/checkpoints/last.ckpt [--bits 2 3 4 5]
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

from benchmarks.bench_vs_modelpruning import _nbytes
from benchmarks.bench_vs_nni import mnist, mnist_test_accuracy
from distill.compress.cli import network_from_checkpoint
from distill.compress.pipeline import deep_compress
from distill.data import MNISTDataModule
from distill.modules import Classifier


def run_nni(args: argparse.Namespace, bits: int) -> dict[str, Any]:
    import nni
    from nni.compression.quantization import QATQuantizer
    from nni.compression.utils import LightningEvaluator

    pl.seed_everything(args.seed, verbose=False)
    net, _ = network_from_checkpoint(args.teacher)
    adam = nni.trace(torch.optim.Adam)  # NNI re-creates the optimizer, the Trainer and the data from their traces
    module = Classifier(net, optimizer=lambda params: adam(params, lr=args.lr))
    trainer = nni.trace(pl.Trainer)(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    evaluator = LightningEvaluator(trainer, nni.trace(MNISTDataModule)(download=False, batch_size=128, val_size=5000))
    config = [{"op_types": ["Linear"], "target_names": ["weight"], "quant_dtype": f"int{bits}",
               "quant_scheme": "affine", "granularity": "default"}]  # fmt: skip
    quantizer = QATQuantizer(module, config, evaluator)
    t0 = time.perf_counter()
    _, calibration = quantizer.compress(None, args.epochs)
    wall = time.perf_counter() - t0
    acc = mnist_test_accuracy(module)  # fake-quantized by NNI's wrappers, as NNI runs the network
    layers = sorted(calibration)
    assert all(calibration[n]["weight"]["quant_bits"] == bits for n in layers), calibration
    quantizer.unwrap_model()
    weights = sum(p.numel() for n, p in net.named_parameters() if n.endswith("weight"))
    biases = sum(p.numel() for n, p in net.named_parameters() if n.endswith("bias"))
    dense_bytes, _ = _nbytes(net.state_dict())
    return {
        "test_acc": acc,
        "layers": layers,
        "dense_torch_save_bytes": dense_bytes,
        "ideal_packed_bytes": (weights * bits + 7) // 8 + 4 * biases + 8 * len(layers),
        "wall_s": wall,
    }


def run_distill(args: argparse.Namespace, bits: int, folder: Path) -> dict[str, Any]:
    pl.seed_everything(args.seed, verbose=False)
    net, _ = network_from_checkpoint(args.teacher)
    dm = mnist()
    dm.setup("fit")
    dm.setup("test")
    t0 = time.perf_counter()
    result = deep_compress(net, folder / f"lenet300_100_{bits}bit.dstl", bits_fc=bits,
                           finetune_loader=dm.train_dataloader(), finetune_epochs=args.epochs,
                           finetune_lr=args.finetune_lr, finetune=args.finetune, test_loader=dm.test_dataloader(),
                           report_dir=folder / f"{bits}bit")  # fmt: skip
    wall = time.perf_counter() - t0
    totals = result["report"]["totals"]
    return {
        "test_acc_before": result["accuracy"]["before"],
        "test_acc_decoded": result["accuracy"]["decoded"],
        "file_bytes": totals["file_bytes"],
        "compression_rate": totals["compression_rate"],
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="a Classifier checkpoint of LeNet-300-100 (distill fit)")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5])
    ap.add_argument("--epochs", type=int, default=1, help="epochs of training after quantizing, both sides")
    ap.add_argument("--lr", type=float, default=3e-4, help="NNI: Adam's learning rate for the float weights")
    ap.add_argument("--finetune-lr", type=float, default=1e-4,
                    help="distill: learning rate of the trained quantization (SGD on the shared values, Adam on the "
                         "weights)")
    ap.add_argument("--finetune", choices=["centroids", "weights"], default="centroids",
                    help="distill: train the shared values (Han et al.) or the weights (quantization-aware)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["nni", "distill"], default=None, help="run one side only")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "nni"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits:
            row = results[str(bits)] = {}
            line = f"{bits} bits:"
            if args.only in (None, "nni"):
                nni_run = row["nni"] = run_nni(args, bits)
                line += (f" NNI QAT (Adam {args.lr}) {nni_run['test_acc']:.4f} (stores "
                         f"{nni_run['dense_torch_save_bytes']:,} B; ideal {bits}-bit packing "
                         f"{nni_run['ideal_packed_bytes']:,} B; {nni_run['wall_s']:.0f} s)")  # fmt: skip
            if args.only in (None, "distill"):
                ours = row["distill"] = run_distill(args, bits, Path(tmp))
                line += (f"   distill k-means, trained {args.finetune} {ours['test_acc_decoded']:.4f} decoded (teacher "
                         f"{ours['test_acc_before']:.4f}), file {ours['file_bytes']:,} B "
                         f"({ours['compression_rate']:.1f}x; {ours['wall_s']:.0f} s)")  # fmt: skip
            print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
