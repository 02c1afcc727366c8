"""``distill compress`` (checkpoint -> compressed file) and ``distill evaluate`` (compressed file -> test accuracy).

Examples::

    distill compress runs/lenet300_100_dc/checkpoints/last.ckpt --out lenet.dstl --bits-fc 6
    distill compress runs/lenet300_100_dc --out lenet.dstl          # the run's last.ckpt
    distill evaluate lenet.dstl --data mnist --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.arch import ArchitectureError, build_module
from distill.compress.fileformat import load_compressed, read_header
from distill.compress.pipeline import deep_compress, evaluate_accuracy, format_summary, result_summary
from distill.errors import DistillError, first_line, read_checkpoint, user_message

__all__ = ["compress_main", "evaluate_main", "find_checkpoint", "network_from_checkpoint"]

_NETWORK_KEYS = ("student", "model")  # hparams / state-dict prefixes of the network in our LightningModules


class CLIError(DistillError):
    """A user error: printed without a traceback, exit code 2."""


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a file, else ``last.ckpt`` inside a run folder (``checkpoints/`` or below).

    Raises:
        CLIError: if nothing suitable exists.
    """
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for cand in (p / "checkpoints" / "last.ckpt", p / "last.ckpt"):
            if cand.is_file():
                return cand
        found = sorted(p.rglob("last.ckpt"), key=lambda c: c.stat().st_mtime)
        if found:
            return found[-1]
        raise CLIError(f"no last.ckpt under run folder {p}; pass the checkpoint file itself")
    raise CLIError(f"checkpoint or run folder not found: {p}")


def network_from_checkpoint(path: str | Path) -> tuple[nn.Module, str]:
    """Rebuild the network (``student`` or ``model``) of a Classifier/Distiller checkpoint, without unpickling.

    The architecture is the ``class_path``/``init_args`` in the checkpoint's hyper-parameters; the weights are the
    state-dict entries under that prefix.

    Returns:
        ``(network, prefix)``.

    Raises:
        CheckpointError: if the file is not a readable checkpoint.
        CLIError: if the checkpoint holds no rebuildable network.
    """
    ckpt = read_checkpoint(path)  # an unreadable file: a CheckpointError saying which and why
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise CLIError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    hparams = ckpt.get("hyper_parameters") or {}
    state = ckpt["state_dict"]
    for key in _NETWORK_KEYS:
        spec = hparams.get(key)
        if not isinstance(spec, Mapping):
            continue
        prefix = f"{key}."
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not sub:
            continue
        try:
            net = build_module(spec)
            net.load_state_dict(sub, strict=True)
        except (ArchitectureError, RuntimeError) as err:
            raise CLIError(f"cannot rebuild {key!r} of {path}: {err}") from err
        return net, key
    raise CLIError(
        f"{path} holds no network description under hyper-parameters {list(_NETWORK_KEYS)} "
        f"(found {sorted(hparams)}); was it written by distill's Classifier or Distiller?"
    )


def _check_options(args: argparse.Namespace, command: str) -> None:
    """Reject out-of-range numbers and an unusable ``--out`` right after parsing, naming the option and the fix
    (the checks deep inside k-means, pruning and the DataLoader would otherwise fail with a bare ``ValueError``).

    Raises:
        CLIError: naming the option, the value given and the valid range.
    """
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be an integer >= 1, got {args.batch_size}. Fix: e.g. --batch-size 1000")
    if command != "compress":
        return
    for option, bits in (("--bits-conv", args.bits_conv), ("--bits-fc", args.bits_fc)):
        if not 1 <= bits <= 16:
            raise CLIError(
                f"{option} must be an integer in 1..16 (k-means code bits), got {bits}. Fix: e.g. {option} "
                f"{8 if option == '--bits-conv' else 5} (Han et al.'s setting)"
            )
    if args.quality is not None and not 0.0 <= args.quality < math.inf:
        raise CLIError(
            f"--quality must be a finite number >= 0 (prune |w| < quality * std of the layer), got {args.quality}. "
            "Fix: e.g. --quality 0.5, or leave it out to keep the zeros already there"
        )
    if args.sparsity is not None and not 0.0 <= args.sparsity <= 1.0:
        raise CLIError(
            f"--sparsity must be a fraction of zeros in [0, 1], got {args.sparsity}. Fix: e.g. --sparsity 0.9 "
            "(90% of each layer's weights pruned)"
        )
    out = Path(args.out)
    if out.is_dir():
        raise CLIError(f"--out {out} is a folder; give a file path such as {out / 'model.dstl'}")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise CLIError(f"--out {out}: {parent} is a file, not a folder; give a file path such as "
                       f"{parent.parent / 'model.dstl'}")


def _datamodule(name: str, data_dir: str | None, subset_file: str | None, batch_size: int) -> Any:
    from distill.data import CIFAR10DataModule, DigitsDataModule, MNISTDataModule

    if name == "mnist":
        return MNISTDataModule(data_dir=data_dir, download=False, eval_batch_size=batch_size)
    if name == "cifar10":
        return CIFAR10DataModule(data_dir=data_dir, download=False, subset_file=subset_file, eval_batch_size=batch_size)
    return DigitsDataModule(eval_batch_size=batch_size)


def _test_batches(args: argparse.Namespace, command: str) -> tuple[Any, Any]:
    from distill.data import DataFileError, DataNotFoundError

    dm = _datamodule(args.data, args.data_dir, args.subset_file, args.batch_size)
    try:
        dm.setup("test")
    except DataFileError as err:  # files there but unusable: a subset file's own fix is neutral, a damaged set's not
        if args.subset_file is not None:
            raise CLIError(user_message(err)) from err
        problem = user_message(err).split(" Fix:")[0].rstrip(". ")
        raise CLIError(f"{problem}. Fix: replace the damaged files with intact ones (copy them in, or download them "
                       f"again with a `distill fit` run of --data.download true); `distill {command}` does not "
                       "download data sets") from err
    except DataNotFoundError as err:
        # The data module's own "Fix" names `distill fit`'s options (--data.data_dir, --data.download); this command
        # has other ones, and never downloads.
        problem = user_message(err).split(" Fix:")[0].rstrip(". ").replace(" and download=False", "")
        if args.data == "cifar10" and args.subset_file is not None:
            fix = ("pass an existing .npz holding the CIFAR-10 subset arrays to --subset-file (absolute, or relative "
                   "to --data-dir)")
        else:
            holds = "MNIST/raw" if args.data == "mnist" else "cifar-10-batches-py (or pass --subset-file SUBSET.npz)"
            fix = (f"pass --data-dir DIR (or set DISTILL_DATA) naming a folder that holds {holds}; "
                   f"`distill {command}` does not download data sets")
        raise CLIError(f"{problem}. Fix: {fix}") from err
    return dm.test_dataloader(), (lambda b: dm.on_after_batch_transfer(b, 0))


def _check_inputs(net: nn.Module, loader: Any, transform: Any, data: str, what: str) -> None:
    """One test batch through ``net`` first, so that a model trained on another data set fails in one line."""
    x = transform(next(iter(loader)))[0]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(x[:2])
    except RuntimeError as err:
        raise CLIError(
            f"{what} does not take --data {data}'s inputs (batches of shape {tuple(x.shape[1:])}): "
            f"{first_line(err)}. "
            "Fix: give --data the data set the model was trained on (mnist, cifar10 or digits)"
        ) from err
    finally:
        net.train(was_training)


def _run(fn: Any, argv: list[str]) -> int:
    try:
        return int(fn(argv) or 0)
    except (DistillError, FileNotFoundError) as err:  # CLIError, CompressedFileError, CheckpointError, ...
        print(f"error: {user_message(err)}", file=sys.stderr)
        return 2


def _compress(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="distill compress", description="Deep-compress a checkpoint into a file.")
    ap.add_argument("checkpoint", help="a .ckpt file, or a run folder holding checkpoints/last.ckpt")
    ap.add_argument("--out", required=True, help="the compressed file to write (e.g. model.dstl)")
    ap.add_argument("--bits-conv", type=int, default=8, help="k-means code bits of conv weights (Han: 8)")
    ap.add_argument("--bits-fc", type=int, default=5, help="k-means code bits of dense weights (Han: 5)")
    prune = ap.add_mutually_exclusive_group()
    prune.add_argument("--quality", type=float, help="prune |w| < quality * std(layer) first")
    prune.add_argument("--sparsity", type=float, help="prune each layer to this fraction of zeros first")
    ap.add_argument(
        "--raw-dtype",
        choices=["float32", "float16"],
        default="float32",
        help="store biases and batch-norm tensors rounded to float16 (half the bytes; the accuracy includes it)",
    )
    ap.add_argument("--data", choices=["mnist", "cifar10", "digits"], help="evaluate on this test set")
    ap.add_argument("--data-dir", help="data root (default $DISTILL_DATA)")
    ap.add_argument("--subset-file", help="CIFAR-10 .npz subset")
    ap.add_argument("--batch-size", type=int, default=1000)
    args = ap.parse_args(argv)
    _check_options(args, "compress")
    ckpt = find_checkpoint(args.checkpoint)
    net, key = network_from_checkpoint(ckpt)
    loader, transform = _test_batches(args, "compress") if args.data else (None, None)
    if args.data:
        _check_inputs(net, loader, transform, args.data, f"the network {key!r} of {ckpt}")
    out = Path(args.out)
    result = deep_compress(
        net,
        out,
        bits_conv=args.bits_conv,
        bits_fc=args.bits_fc,
        quality=args.quality,
        sparsity=args.sparsity,
        test_loader=loader,
        batch_transform=transform,
        report_dir=out.parent,
        meta={"checkpoint": str(ckpt), "network": key},
        raw_dtype=args.raw_dtype,
    )
    lines = [("compressed", f"{key} of {ckpt}"), *result_summary(result, "--data not given").items()]
    print(format_summary([*lines, *((label, str(path)) for label, path in result["paths"].items())]))
    return 0


def _evaluate(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="distill evaluate", description="Test accuracy of a compressed model file.")
    ap.add_argument("file", help="a compressed model file written by distill")
    ap.add_argument("--data", choices=["mnist", "cifar10", "digits"], required=True)
    ap.add_argument("--data-dir", help="data root (default $DISTILL_DATA)")
    ap.add_argument("--subset-file", help="CIFAR-10 .npz subset")
    ap.add_argument("--batch-size", type=int, default=1000)
    args = ap.parse_args(argv)
    _check_options(args, "evaluate")
    header = read_header(args.file)
    net = load_compressed(args.file)
    loader, transform = _test_batches(args, "evaluate")
    _check_inputs(net, loader, transform, args.data, f"the model in {args.file}")
    acc = evaluate_accuracy(net, loader, "cpu", transform)
    n_params = sum(p.numel() for p in net.parameters())
    rate = 4 * n_params / header["file_bytes"]
    print(format_summary([
        ("model", f"{header['arch']['class_path']} ({n_params:,} parameters)"),
        ("file", f"{args.file} ({header['file_bytes']:,} bytes, {rate:.1f}x smaller than float32)"),
        ("test accuracy", f"{100 * acc:.2f}% (error {100 * (1 - acc):.2f}%)"),
    ]))
    return 0


def compress_main(argv: list[str]) -> int:
    """``distill compress CKPT_OR_RUN --out FILE [--bits-conv 8 --bits-fc 5 --quality Q]``; returns the exit code."""
    return _run(_compress, argv)


def evaluate_main(argv: list[str]) -> int:
    """``distill evaluate FILE --data mnist|cifar10|digits [--data-dir D]``; returns the exit code."""
    return _run(_evaluate, argv)
