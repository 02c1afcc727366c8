"""Prune and share the weights of a whole network; trained quantization of the shared values.

Han, Mao & Dally, "Deep Compression" (ICLR 2016): per layer, prune (optional here, usually done during training by
:class:`distill.callbacks.MagnitudePruning`), then k-means weight sharing with linear initialisation, ``bits_conv``
bits for convolutions (8 in the paper) and ``bits_fc`` for dense layers (5); then optionally fine-tune the
centroids: the gradient of a shared value is the sum of the gradients of the weights that share it (section 3.3).
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

__all__ = ["SharedWeights", "apply_codebooks", "finetune_centroids", "quantize_model", "shared_from_weights"]


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
    was_training = net.training
    net.train()
    for _ in range(epochs):
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            weights = {n: torch.cat([zero, c])[labels[n]] for n, c in centroids.items()}
            loss = loss_fn(functional_call(net, weights, (x.to(device),)), y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.train(was_training)
    params = compressible_parameters(net)
    out: dict[str, SharedWeights] = {}
    with torch.no_grad():
        for n, c in centroids.items():
            cb = torch.cat([zero, c.detach()]).cpu()
            params[n].copy_(cb[labels[n].cpu()].to(params[n]))
            out[n] = SharedWeights(cb, shared[n].labels)
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
