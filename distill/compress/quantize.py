"""Prune and share the weights of a whole network; trained quantization of the shared values.

Han, Mao & Dally, "Deep Compression" (ICLR 2016): per layer, prune (optional here, usually done during training by
:class:`distill.callbacks.MagnitudePruning`), then k-means weight sharing with linear initialisation, ``bits_conv``
bits for convolutions (8 in the paper) and ``bits_fc`` for dense layers (5); then optionally fine-tune the
centroids: the gradient of a shared value is the sum of the gradients of the weights that share it (section 3.3).
Or, at very low bit widths where a handful of shared values a layer leaves centroid training little to work with,
quantization-aware training of the weights themselves with the codebooks kept as their k-means
(:func:`finetune_weights`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from distill.compress.kmeans import assign_to_codebook, quantize_weight
from distill.compress.params import compressible_parameters, parameter_kinds
from distill.compress.pruning import prune_mask

__all__ = [
    "FINETUNE_MODES",
    "SharedWeights",
    "apply_codebooks",
    "finetune_centroids",
    "finetune_weights",
    "quantize_model",
    "shared_from_weights",
]

FINETUNE_MODES = ("centroids", "weights")  # what trained quantization trains: Han's shared values, or the weights


@dataclass
class SharedWeights:
    """One layer after weight sharing: ``weight == codebook[labels]`` with ``codebook[0] == 0`` (pruned)."""

    codebook: torch.Tensor  # (K + 1,)
    labels: torch.Tensor  # same shape as the weight, int64


def quantize_model(
    net: nn.Module,
    bits_conv: int = 8,
    bits_fc: int = 5,
    quality: float | None = None,
    sparsity: float | None = None,
    names: Iterable[str] | None = None,
    max_iter: int = 100,
) -> dict[str, SharedWeights]:
    """Prune (if ``quality`` or ``sparsity`` is given) and k-means-share every compressible weight, in place.

    Args:
        net: the network.
        bits_conv: code bits of convolution weights.
        bits_fc: code bits of dense weights.
        quality: prune ``|w| < quality * std`` first.
        sparsity: or prune to this fraction of zeros first.
        names: the weights to quantize (default :func:`compressible_parameters`).
        max_iter: k-means iterations.

    Returns:
        The codebook and labels of each quantized weight.
    """
    params = compressible_parameters(net)
    kinds = parameter_kinds(net)
    selected = list(params) if names is None else list(names)
    out: dict[str, SharedWeights] = {}
    with torch.no_grad():
        for name in selected:
            if name not in params:
                raise KeyError(f"{name!r} is not a compressible weight of {type(net).__name__}: {sorted(params)}")
            p = params[name]
            if quality is not None or sparsity is not None:
                mask, _ = prune_mask(p, quality=quality, sparsity=sparsity)
                p.mul_(mask)
            bits = bits_conv if kinds.get(name) == "conv" else bits_fc
            q, codebook, labels = quantize_weight(p, bits, max_iter=max_iter)
            p.copy_(q)
            out[name] = SharedWeights(codebook, labels)
    return out


def apply_codebooks(net: nn.Module, codebooks: Mapping[str, torch.Tensor]) -> dict[str, SharedWeights]:
    """Set each non-zero weight to its nearest codebook value (e.g. a GMM's merged means); zeros stay zero.

    ``codebooks`` maps weight names to 1-D values, or ``"*"`` to one codebook for all compressible weights.
    """
    params = compressible_parameters(net)
    out: dict[str, SharedWeights] = {}
    with torch.no_grad():
        for name, p in params.items():
            values = codebooks.get(name, codebooks.get("*"))
            if values is None:
                continue
            cb = np.unique(np.asarray(values.detach().cpu(), dtype=np.float32))
            cb = np.concatenate([[0.0], cb[cb != 0]]).astype(np.float32)
            flat = p.detach().cpu().float().flatten().numpy()
            labels = np.zeros(flat.size, dtype=np.int64)
            nz = np.flatnonzero(flat)
            labels[nz] = assign_to_codebook(flat[nz], cb)
            cb_t = torch.from_numpy(cb)
            lab_t = torch.from_numpy(labels).view(p.shape)
            p.copy_(cb_t[lab_t].to(p))
            out[name] = SharedWeights(cb_t, lab_t)
    return out


def _train_through(
    net: nn.Module,
    weights: Callable[[], dict[str, torch.Tensor]],
    opt: torch.optim.Optimizer,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    epochs: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    max_batches: int | None,
    after_step: Callable[[], None] | None = None,
) -> None:
    """Train ``opt``'s tensors for ``epochs`` over ``loader`` (at most ``max_batches`` an epoch), ``net`` run in
    training mode with its weights replaced by ``weights()`` (rebuilt every step) through ``functional_call``."""
    device = next(net.parameters()).device
    was_training = net.training
    net.train()
    try:
        for _ in range(epochs):
            for i, (x, y) in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                loss = loss_fn(functional_call(net, weights(), (x.to(device),)), y.to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
                if after_step is not None:
                    after_step()
    finally:
        net.train(was_training)


def finetune_centroids(
    net: nn.Module,
    shared: Mapping[str, SharedWeights],
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    epochs: int = 1,
    lr: float = 1e-4,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    max_batches: int | None = None,
) -> dict[str, SharedWeights]:
    """Trained quantization: optimise the shared values, keeping every weight's cluster (and zeros) fixed.

    The weights are ``codebook[labels]`` inside the forward pass, so autograd gives each shared value the sum of
    its members' gradients. The other parameters (biases, BN) are left untouched; ``net`` is updated in place.

    Returns:
        The updated codebooks (labels unchanged).
    """
    device = next(net.parameters()).device
    centroids = {n: nn.Parameter(s.codebook[1:].to(device).float().clone()) for n, s in shared.items()}
    labels = {n: s.labels.to(device) for n, s in shared.items()}
    opt = torch.optim.SGD(list(centroids.values()), lr=lr)
    zero = torch.zeros(1, device=device)

    def weights() -> dict[str, torch.Tensor]:
        return {n: torch.cat([zero, c])[labels[n]] for n, c in centroids.items()}

    _train_through(net, weights, opt, loader, epochs, loss_fn, max_batches)
    params = compressible_parameters(net)
    out: dict[str, SharedWeights] = {}
    with torch.no_grad():
        for n, c in centroids.items():
            cb = torch.cat([zero, c.detach()]).cpu()
            params[n].copy_(cb[labels[n].cpu()].to(params[n]))
            out[n] = SharedWeights(cb, shared[n].labels)
    return out


def _nearest(book: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``book`` sorted, and the index into it of each entry of ``w``'s nearest value (ties to the lower one).

    The rule of :func:`distill.compress.kmeans.assign_to_codebook` (midpoints of the sorted values), in torch on
    ``w``'s device: it runs twice a training step, where a NumPy round trip would cost a device copy each time."""
    book, _ = torch.sort(book)
    return book, torch.bucketize(w, (book[1:] + book[:-1]) / 2)


def finetune_weights(
    net: nn.Module,
    shared: Mapping[str, SharedWeights],
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    epochs: int = 1,
    lr: float = 1e-4,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    max_batches: int | None = None,
    init: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, SharedWeights]:
    """Quantization-aware training of the weights, the codebooks kept as their k-means; pruned weights stay zero.

    A float copy of each shared weight (``init``, e.g. the weights before sharing, else the shared values) is trained
    with Adam; the forward pass uses each weight's nearest shared value, with the straight-through gradient (Bengio
    et al. 2013, as quantization-aware training does it, e.g. Jacob et al. 2018); after each step every shared value
    moves to the mean of the float weights nearest to it (one Lloyd step, so the codebook stays their k-means; a
    value with no member keeps its place). The codebook size never changes and code 0 stays the pruned zeros.

    :func:`finetune_centroids` (Han et al.) trains only the ``2^bits - 1`` shared values of a layer; at 2 bits that
    is 3 numbers, and this recovers more (``benchmarks/bench_nni_quant.py``). Other parameters (biases, BN) are left
    untouched; ``net`` is updated in place.

    Returns:
        The final codebooks and labels.
    """
    device = next(net.parameters()).device
    params = compressible_parameters(net)
    start = init or {}
    out: dict[str, SharedWeights] = {n: s for n, s in shared.items() if s.codebook.numel() < 2}  # all pruned: as is
    floats = {
        n: nn.Parameter(start.get(n, params[n]).detach().to(device).float().clone()) for n in shared if n not in out
    }
    keep = {n: shared[n].labels.to(device) != 0 for n in floats}
    books = {n: shared[n].codebook[1:].to(device).float().clone() for n in floats}
    opt = torch.optim.Adam(list(floats.values()), lr=lr)
    zero = torch.zeros((), device=device)

    def weights() -> dict[str, torch.Tensor]:
        current = {}
        for n, w in floats.items():
            book, idx = _nearest(books[n], w.detach())
            ste = w + (book[idx] - w).detach()  # the shared value forward, the identity backward
            current[n] = torch.where(keep[n], ste, zero)
        return current

    def lloyd_step() -> None:  # every shared value to the mean of its members
        with torch.no_grad():
            for n, w in floats.items():
                book, idx = _nearest(books[n], w)
                members, values = idx[keep[n]], w[keep[n]]
                sums = torch.zeros_like(book).index_add_(0, members, values)
                counts = torch.bincount(members, minlength=book.numel()).to(book)
                books[n] = torch.where(counts > 0, sums / counts.clamp_min(1), book)

    _train_through(net, weights, opt, loader, epochs, loss_fn, max_batches, after_step=lloyd_step)
    with torch.no_grad():
        for n, w in floats.items():
            book, idx = _nearest(books[n], w)
            labels = torch.where(keep[n], idx + 1, torch.zeros_like(idx))
            cb = torch.cat([torch.zeros(1, device=device), book]).cpu()
            labels = labels.cpu()
            params[n].copy_(cb[labels].to(params[n]))
            out[n] = SharedWeights(cb, labels)
    return out


def shared_from_weights(
    net: nn.Module, names: Iterable[str] | None = None, strict: bool = True
) -> dict[str, SharedWeights]:
    """Codebook and labels of weights that are already shared (e.g. by ``GMMPrior.quantize``): their distinct values.

    Args:
        net: the network.
        names: weights to describe (default all compressible ones).
        strict: raise on a weight that is not quantized; otherwise leave it out (the file then stores it raw).

    Raises:
        ValueError: with ``strict``, if a weight has more than 65,535 distinct non-zero values.
    """
    params = compressible_parameters(net)
    out: dict[str, SharedWeights] = {}
    for name in list(params) if names is None else list(names):
        w = params[name].detach().cpu().float()
        values, inverse = torch.unique(w.flatten(), return_inverse=True)
        nonzero = values != 0
        if int(nonzero.sum()) > (1 << 16) - 1:
            if not strict:
                continue
            raise ValueError(f"{name} has {int(nonzero.sum())} distinct values: it is not quantized")
        codebook = torch.cat([torch.zeros(1), values[nonzero]])
        remap = torch.cumsum(nonzero.long(), 0) * nonzero.long()  # zero value -> code 0
        out[name] = SharedWeights(codebook, remap[inverse].view(w.shape))
    return out
