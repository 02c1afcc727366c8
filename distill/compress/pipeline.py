"""The final step of Deep Compression on one network: share, fine-tune, write, decode, evaluate, report.

Used by :class:`distill.callbacks.PruneQuantize` at the end of training and by ``distill compress`` on a checkpoint.
The accuracy reported as ``decoded`` is that of the model read back from the file, so it is the accuracy of what
was written.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.arch import ArchitectureError
from distill.compress.fileformat import decode_into, load_compressed, save_compressed
from distill.compress.params import compressible_parameters
from distill.compress.quantize import (
    FINETUNE_MODES,
    finetune_centroids,
    finetune_weights,
    quantize_model,
    shared_from_weights,
)
from distill.compress.report import compression_report, write_report
from distill.compress.structure import remove_dead_units
from distill.io import atomic_write_json

__all__ = [
    "RAW_DTYPES",
    "deep_compress",
    "evaluate_accuracy",
    "format_summary",
    "result_summary",
    "round_raw_tensors",
    "write_json",
]

RAW_DTYPES = ("float32", "float16")
_F16_MAX = float(torch.finfo(torch.float16).max)


@torch.no_grad()
def evaluate_accuracy(
    net: nn.Module,
    loader: Iterable[Any],
    device: torch.device | str | None = None,
    transform: Callable[[Any], Any] | None = None,
) -> float:
    """Top-1 accuracy of ``net`` over ``(x, y)`` batches, in eval mode (the mode is restored afterwards).

    ``transform`` is applied to each batch once on the device (e.g. a datamodule's ``on_after_batch_transfer``).
    """
    if device is None:
        p = next(net.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = net.training
    net.eval()
    correct = total = 0
    try:
        for batch in _on_device(loader, device, transform):
            x, y = batch[0], batch[1]
            correct += int((net(x).argmax(-1) == y).sum())
            total += int(y.numel())
    finally:
        net.train(was_training)
    if total == 0:
        raise ValueError("the evaluation loader yielded no samples")
    return correct / total


def _on_device(
    loader: Iterable[Any], device: torch.device | str, transform: Callable[[Any], Any] | None
) -> Iterator[Any]:
    for batch in loader:
        batch = (batch[0].to(device), batch[1].to(device))
        yield transform(batch) if transform is not None else batch


class _Reiterable:
    """A loader moved to the device and transformed, iterable once per epoch."""

    def __init__(self, loader: Iterable[Any], device: torch.device, transform: Callable[[Any], Any] | None) -> None:
        self.loader, self.device, self.transform = loader, device, transform

    def __iter__(self) -> Iterator[Any]:
        return _on_device(self.loader, self.device, self.transform)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as JSON atomically (temp file + rename); see :func:`distill.io.atomic_write_json`."""
    return atomic_write_json(path, obj, indent=2)


@torch.no_grad()
def round_raw_tensors(net: nn.Module, keep: Iterable[str] = ()) -> list[str]:
    """Round every float32 tensor of ``net``'s state dict except ``keep`` to the nearest float16, in place.

    The file format stores such tensors in 2 bytes per value (``raw-f16``); biases and batch-norm statistics are
    ~30% of a 200x-compressed LeNet file in float32. A tensor with a value beyond float16's range stays float32.

    Returns:
        The names of the rounded tensors.
    """
    skip = set(keep)
    rounded = []
    for name, t in net.state_dict(keep_vars=True).items():
        if name in skip or t.dtype != torch.float32 or t.numel() == 0:
            continue
        if float(t.detach().abs().max()) > _F16_MAX:
            continue
        t.data.copy_(t.detach().half().float())
        rounded.append(name)
    return rounded


def deep_compress(
    net: nn.Module,
    path: str | os.PathLike[str],
    *,
    bits_conv: int = 8,
    bits_fc: int = 5,
    quality: float | None = None,
    sparsity: float | None = None,
    already_shared: bool = False,
    share: Callable[[], object] | None = None,
    prune: Callable[[], object] | None = None,
    finetune_loader: Iterable[Any] | None = None,
    finetune_epochs: int = 0,
    finetune_lr: float = 1e-4,
    finetune_batches: int | None = None,
    finetune: str = "centroids",
    test_loader: Iterable[Any] | None = None,
    report_dir: str | os.PathLike[str] | None = None,
    meta: dict[str, Any] | None = None,
    batch_transform: Callable[[Any], Any] | None = None,
    raw_dtype: str = "float32",
    clear_dead_units: bool = True,
) -> dict[str, Any]:
    """Quantize ``net`` in place, write it to ``path``, read it back, and report sizes and accuracies.

    Args:
        net: the network (rebuildable by :func:`distill.arch.build_module`, else decoded into a copy).
        path: the compressed file.
        bits_conv: k-means code bits of convolutions.
        bits_fc: k-means code bits of dense layers.
        quality: prune ``|w| < quality * std`` before sharing (None: keep the zeros already there).
        sparsity: or prune to this fraction of zeros.
        already_shared: the weights are already quantized (e.g. by ``GMMPrior.quantize``): use their distinct values
            as the codebooks instead of k-means.
        share: called after the ``before`` accuracy is measured, to quantize the weights in place (e.g.
            ``GMMPrior.quantize``); implies ``already_shared``.
        prune: called after the ``before`` accuracy is measured, to set pruned weights to exactly 0 in place (e.g.
            ``GMMPrior.zero_members``), before the k-means sharing of the others (which keeps those zeros).
        finetune_loader: training batches for centroid fine-tuning (with ``finetune_epochs > 0``).
        finetune_epochs: epochs of trained quantization.
        finetune_lr: learning rate of the trained quantization (SGD on the centroids, Adam on the weights).
        finetune_batches: limit on batches per fine-tuning epoch.
        finetune: what the trained quantization trains: ``"centroids"`` (Han et al.'s shared values,
            :func:`~distill.compress.quantize.finetune_centroids`) or ``"weights"`` (quantization-aware training of the
            weights, the codebooks kept as their k-means, :func:`~distill.compress.quantize.finetune_weights`; more
            accurate at 2-3 bits).
        test_loader: test batches; accuracies are ``None`` without it.
        report_dir: where ``compression_report.json``/``.md`` and ``accuracy.json`` go (default: the file's folder).
        meta: extra metadata for the file header.
        batch_transform: applied to every batch on the device (e.g. normalisation in ``on_after_batch_transfer``).
        raw_dtype: ``"float16"`` rounds the tensors that are not weight-shared (biases, batch-norm parameters and
            statistics) to float16 after fine-tuning, so the file stores them in half the bytes; the ``quantized``
            and ``decoded`` accuracies include the rounding. ``"float32"`` (default) keeps them exact.
        clear_dead_units: after sharing, zero the weights and biases of hidden units and convolution channels that
            pruning left without inputs or outputs (:func:`distill.compress.structure.remove_dead_units`; the
            network's function is unchanged, the file gets smaller).

    Returns:
        ``{"accuracy": {"before", "quantized", "decoded"}, "report": ..., "paths": {...}}``.

    Raises:
        RuntimeError: if the decoded weights differ from the in-memory quantized ones (never expected).
    """
    if raw_dtype not in RAW_DTYPES:
        raise ValueError(f"raw_dtype must be one of {RAW_DTYPES}, got {raw_dtype!r}")
    if finetune not in FINETUNE_MODES:
        raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {finetune!r}")
    p = next(net.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")

    def test_accuracy(model: nn.Module) -> float | None:
        if test_loader is None:
            return None
        return evaluate_accuracy(model, test_loader, device, batch_transform)

    before = test_accuracy(net)
    if share is not None and prune is not None:
        raise ValueError("give share (the weights quantized by a callable) or prune (zeros, then k-means), not both")
    if prune is not None:
        prune()
    if share is not None:
        share()
        already_shared = True
    tune_loader = finetune_loader if finetune_epochs > 0 else None
    # the weights before sharing: where quantization-aware training of the weights starts from
    floats = (
        {n: p.detach().clone() for n, p in compressible_parameters(net).items()}
        if tune_loader is not None and finetune == "weights"
        else {}
    )
    if already_shared:
        shared = shared_from_weights(net, strict=False)  # a weight the prior did not quantize is stored raw
    else:
        shared = quantize_model(net, bits_conv=bits_conv, bits_fc=bits_fc, quality=quality, sparsity=sparsity)
    if tune_loader is not None:
        batches = _Reiterable(tune_loader, device, batch_transform)
        if finetune == "weights":
            finetune_weights(net, shared, batches, finetune_epochs, finetune_lr, max_batches=finetune_batches,
                             init=floats)  # fmt: skip
        else:
            finetune_centroids(net, shared, batches, finetune_epochs, finetune_lr, max_batches=finetune_batches)
    info: dict[str, Any] = {"bits_conv": bits_conv, "bits_fc": bits_fc, "quality": quality, "sparsity": sparsity}
    if clear_dead_units:
        dead = remove_dead_units(net)
        info["dead_units"] = {"unused": dead.unused, "constant": dead.constant, "weights_zeroed": dead.weights_zeroed}
    if raw_dtype == "float16":
        round_raw_tensors(net, keep=compressible_parameters(net))
    quantized = test_accuracy(net)
    info["raw_dtype"] = raw_dtype
    info["codebooks"] = "given" if already_shared else "kmeans"
    save_compressed(net, path, meta={**info, **(meta or {})})
    try:
        decoded_net = load_compressed(path)
    except ArchitectureError:
        decoded_net = decode_into(copy.deepcopy(net).cpu(), path)
    mine = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    for k, v in decoded_net.state_dict().items():
        if not torch.equal(v, mine[k]):
            raise RuntimeError(f"decoded tensor {k} differs from the in-memory model; the file is not trustworthy")
    decoded = test_accuracy(decoded_net.to(device))
    report = compression_report(path)
    folder = Path(report_dir) if report_dir is not None else Path(path).parent
    paths = {"compressed model": Path(path)}
    written = write_report(report, folder)
    paths["compression report"] = written["md"]
    accuracy = {"before": before, "quantized": quantized, "decoded": decoded}
    paths["accuracy"] = write_json(folder / "accuracy.json", accuracy)
    return {"accuracy": accuracy, "report": report, "paths": paths}


def result_summary(result: dict[str, Any], why_not_measured: str | None = None) -> dict[str, str]:
    """One line each on what :func:`deep_compress` gave (the closing summaries of ``distill fit`` and ``distill
    compress``): the compression rate, and the test accuracy read back from the file with the accuracies before
    compression and quantized beside it (or ``why_not_measured``)."""
    totals = result["report"]["totals"]
    out = {
        "compression": f"{totals['compression_rate']:.1f}x: {totals['file_bytes']:,} bytes in the file vs "
        f"{totals['dense_bytes']:,} dense (float32), {100 * totals['nonzero_fraction']:.2f}% of the weights non-zero"
    }
    acc = result["accuracy"]
    if acc["decoded"] is None:
        out["test accuracy"] = f"not measured ({why_not_measured or 'no test data'})"
    else:
        out["test accuracy"] = (f"{100 * acc['decoded']:.2f}% read back from the file ({100 * acc['before']:.2f}% "
                                f"before compression, {100 * acc['quantized']:.2f}% quantized)")
    return out


def format_summary(lines: Iterable[tuple[str, str]]) -> str:
    """``label: text`` lines with the texts in one aligned column (the commands' closing summaries)."""
    lines = list(lines)
    width = max(19, *(len(label) + 2 for label, _ in lines)) if lines else 0
    return "\n".join(f"{label + ':':<{width}}{text}" for label, text in lines)
