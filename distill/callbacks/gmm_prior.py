"""Soft weight-sharing as a Lightning callback: a learned Gaussian-mixture prior on the weights.

Ullrich, Meeds & Welling, "Soft Weight-Sharing for Neural Network Compression" (ICLR 2017). While any
LightningModule (re)trains, the compressed weights are pulled towards a mixture of ``J + 1`` Gaussians learned at the
same time; at the end every weight is set to the mean of its most responsible component (``quantize``).

How the prior enters training, without touching the module's loss
-------------------------------------------------------------------
A callback cannot change what ``training_step`` returns, so the prior's *gradient* is added instead, in
``on_before_optimizer_step``: Lightning calls it once per optimizer step, after the backward passes of all
accumulated batches, after AMP's unscaling and before gradient clipping. There the callback

1. adds ``scale * d(-sum log p(w))/dw`` to each compressed parameter's ``.grad`` (analytic, float32; see
   :mod:`distill.priors`: a per-weight function, interpolated from a fine table or computed exactly in chunks),
2. sets the mixture parameters' gradients (value and hyper-prior terms, same scale) and steps their own Adam
   optimizer (groups ``means``, ``log_precisions``, ``mixing`` with their own learning rates).

The result equals one backward pass of ``loss + scale * prior`` (tested with accumulation, clipping, bf16 autocast
and DDP). The mixture has its *own* optimizer rather than extra param groups in the module's optimizer because
torch's LR schedulers zip their per-group lists with ``strict=True`` (``CosineAnnealingLR`` raises on a group added
later), ``ReduceLROnPlateau`` indexes ``min_lrs`` per group, an optimizer's ``weight_decay`` default would leak into
the mixture, and the mixture learns with Adam whatever the network's optimizer (as in the paper's tutorial). Its
state lives in this callback's ``state_dict``, so a resumed run continues exactly. Under 16-bit AMP the mixture
step is skipped whenever the gradient scaler skips the network's step.

Scaling: ``scale = tau / N`` with ``N`` the training-set size (the tutorial's choice: the data term is a mean over
a batch, the prior a sum over all weights, so ``tau`` trades the whole-data likelihood against the prior).
"""

from __future__ import annotations

import json
import math
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from distill.callbacks.checkpoint import training_skipped_on_resume
from distill.callbacks.pruning import mask_optimizer_state
from distill.compress.kmeans import kmeans_1d
from distill.compress.params import compressible_parameters, network_of
from distill.io import atomic_savez, atomic_write_json, run_folder
from distill.module_utils import piecewise_schedule, schedule_at, should_log_step, skip_idle_graph_capture_check
from distill.priors import (
    MAX_GRID,
    MIN_GRID,
    SUBBINS,
    GaussianMixturePrior,
    MixtureTable,
    _mixture_param_grads,
    merge_components,
    mixture_log_prob,
    mixture_nll_grad,
    quantize_weights,
)

__all__ = ["GMMPrior"]


METHODS = ("auto", "exact", "table")


def _kernels_available() -> bool:
    from distill import prior_kernels  # numba: imported on first use, not with the package

    return prior_kernels.AVAILABLE


class _MixtureAdam(torch.optim.Adam):
    """torch's Adam (same arguments, state and ``state_dict``), stepping small CPU float32 tensors in one compiled loop.

    The mixture's four tensors hold ``J + 1`` numbers each; torch's step costs ~0.15-0.4 ms on a CPU even fused
    (per-group dispatch and ~10 tiny ops per tensor, 5-10% of a LeNet-300-100 step) for a few hundred flops, NumPy
    ~0.1 ms. The same arithmetic as torch's single-tensor Adam, operation for operation in float32, on the tensors'
    memory (:func:`distill.prior_kernels.adam_update`), takes a few microseconds (tested against
    ``torch.optim.Adam``). Anything else (CUDA tensors, a closure, amsgrad, maximize, weight decay) is torch's step.
    """

    def _host_ok(self) -> bool:
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or group["weight_decay"] or group.get("differentiable"):
                return False
            for p in group["params"]:
                if p.device.type != "cpu" or p.dtype != torch.float32 or not p.is_contiguous():
                    return False
                if p.grad is not None and (p.grad.is_sparse or not p.grad.is_contiguous()):
                    return False
        return True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        if closure is not None or not self._host_ok():
            return super().step(closure)
        self._host_step(self._host_views())
        return None

    def fast_step(self) -> None:
        """:meth:`step` without torch's per-call wrapper (a profiler range and the step hooks, ~30 us): the call the
        callback makes every training step. The NumPy views of the tensors are kept while the tensors stay the same
        (same gradient and state objects, same parameter memory)."""
        cache = self._view_cache
        if cache is None or self._cache_key != [len(g["params"]) for g in self.param_groups] or not all(
            p.grad is g and self.state[p].get("exp_avg_sq") is v and p.data_ptr() == ptr for p, g, v, ptr, _ in cache
        ):
            if not self._host_ok():
                self.step()
                return
            cache = self._host_views()
        self._host_step(cache)

    _view_cache: list[tuple[torch.Tensor, Any, Any, int, tuple[Any, ...] | None]] | None = None
    _cache_key: list[int] | None = None

    def _host_views(self) -> list[tuple[torch.Tensor, Any, Any, int, tuple[Any, ...] | None]]:
        """Per parameter with a gradient: the tensors that identify the cache, and the flat NumPy views
        ``(group, step, param, grad, exp_avg, exp_avg_sq)`` the update writes through."""
        views: list[tuple[torch.Tensor, Any, Any, int, tuple[Any, ...] | None]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:  # kept, so that a gradient appearing later invalidates the cache
                    views.append((p, None, self.state[p].get("exp_avg_sq"), p.data_ptr(), None))
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)  # a 0-d float32 tensor, as torch keeps it
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                flat = (group, state["step"].numpy(), p.detach().numpy().reshape(-1),
                        p.grad.detach().numpy().reshape(-1), state["exp_avg"].numpy().reshape(-1),
                        state["exp_avg_sq"].numpy().reshape(-1))
                views.append((p, p.grad, state["exp_avg_sq"], p.data_ptr(), flat))
        self._view_cache = views
        self._cache_key = [len(g["params"]) for g in self.param_groups]
        # all float32 (as the callback keeps its mixture): one compiled call for them all (each call from Python,
        # with its argument conversions, cost ~10-30 us inside a training step)
        flats = [v[4] for v in views if v[4] is not None]
        self._packed = None
        if flats and all(a.dtype == np.float32 for f in flats for a in f[1:]):
            self._packed = ([f[0] for f in flats], *(tuple(f[k] for f in flats) for k in (2, 3, 4, 5)),
                            tuple(f[1].reshape(1) for f in flats), np.zeros((len(flats), 4)))
        return views

    _packed: tuple[Any, ...] | None = None

    def _host_step(self, views: list[tuple[torch.Tensor, Any, Any, int, tuple[Any, ...] | None]]) -> None:
        from distill import prior_kernels  # numba: imported on first use, not with the package

        if self._packed is not None and views is self._view_cache:
            groups, ws, gs, ms, vs, steps, hp = self._packed
            for i, group in enumerate(groups):
                hp[i, 0] = group["lr"]
                hp[i, 1], hp[i, 2] = group["betas"]
                hp[i, 3] = group["eps"]
            prior_kernels.adam_update_all(ws, gs, ms, vs, steps, hp)
            return
        for _, _, _, _, flat in views:
            if flat is None:
                continue
            group, step_t, w, g, m, v = flat
            beta1, beta2 = group["betas"]
            step_t += 1.0
            n = float(step_t)
            prior_kernels.adam_update(w, g, m, v, beta1, beta2, float(group["lr"]) / (1.0 - beta1**n),
                                      math.sqrt(1.0 - beta2**n), float(group["eps"]))


def _positive_pair(name: str, value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be None or a pair (a, b) of positive numbers, got {value!r}") from None
    if not (a > 0 and b > 0):
        raise ValueError(f"{name} must be None or a pair (a, b) of positive numbers, got {value!r}")
    return a, b


def _flat_pair(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A weight and its gradient as flat views in the same memory order (both contiguous, or both 4-d channels_last),
    else ``None``. The fused CUDA prior is elementwise plus order-free sums: such views pair up element by element."""
    g, w = p.grad, p.detach()
    if g is None:
        return None
    if w.is_contiguous() and g.is_contiguous():
        return w.view(-1), g.view(-1)
    last = torch.channels_last
    if w.dim() == 4 and w.is_contiguous(memory_format=last) and g.is_contiguous(memory_format=last):
        return w.permute(0, 2, 3, 1).view(-1), g.permute(0, 2, 3, 1).view(-1)
    return None


class GMMPrior(Callback):
    """Train the compressed weights of any LightningModule under a learned Gaussian-mixture prior.

    Logs ``gmm/mean_{j}``, ``gmm/std_{j}``, ``gmm/pi_{j}`` (every ``log_every_n_steps`` and at each epoch end),
    ``gmm/prior_loss_step`` (on the trainer's logging steps), ``gmm/prior_loss_epoch`` (epoch mean),
    ``gmm/significant`` (components that own at least one weight after merging), ``gmm/nonzero`` (the fraction of
    compressed weights the merged zero component does not own: what quantizing now would leave non-zero; per layer
    in ``gmm_history.json``, at each epoch end) and, with TensorBoard, a histogram
    of each compressed layer's weights per epoch. Writes ``gmm_history.json`` and
    ``gmm_weights.npz`` into the run folder.

    Args:
        num_components: ``J >= 1`` non-zero components (plus the zero component).
        tau: weight of the prior: a number; a mapping ``{first epoch: tau}``, piecewise constant (YAML:
            ``tau: {0: 1.0, 20: 0.1}``: a strong prior that sparsifies for 20 epochs, then a weak one under which the
            surviving weights recover accuracy while the zero component keeps its members); or a function
            ``epoch -> tau``.
        warmup_epochs: ramp ``tau`` linearly over this many epochs (factor ``(epoch + 1) / (warmup_epochs + 1)``).
        dataset_size: ``N`` in ``tau / N``; ``None`` infers it from the train dataloader (its dataset's length, else
            batches x batch size x world size).
        pi_zero: mixing weight of the zero component (fixed, or initial when ``pi_zero_beta`` is set).
        pi_zero_beta: ``(a, b)`` of a Beta hyper-prior on ``pi_0`` to learn it, or ``None`` to keep it fixed.
        gamma_zero: ``(alpha, beta)`` of the Gamma hyper-prior on the zero component's precision, or ``None``.
        gamma: ``(alpha, beta)`` of the Gamma hyper-prior on the other precisions, or ``None``.
        init_std: initial standard deviation of the components.
        init_means: ``"range"`` (evenly spaced over the weights' range, as in the paper's tutorial) or ``"kmeans"``
            (the centroids of a 1-D k-means with ``J + 1`` clusters over all compressed weights, without the one
            nearest zero, which the zero component takes: the components start where the weights are).
        lr_means, lr_log_precisions, lr_mixing: Adam learning rates of the mixture's parameter groups.
        method: ``"table"`` (interpolated, fast), ``"exact"`` (chunked, ``J+1`` times the work) or ``"auto"``
            (the table, unless the weights are fewer than its points or the mixture's narrowest component would need
            more than its 65536 points for ``grid_spacing``: then exact). On a CUDA GPU with Triton, ``"auto"`` and
            ``"exact"`` run one fused kernel per weight tensor that evaluates the mixture exactly for every weight
            (:mod:`distill.prior_cuda`: a GPU has the arithmetic to spare, and it is one pass over the weights).
        grid_spacing: table spacing in units of the smallest component std (error ~ spacing^2, see ``MixtureTable``).
        kernel: ``"auto"`` (the table's fused CPU loops when numba is installed and the weights are CPU float32,
            the fused Triton kernel on CUDA, else ATen ops) or ``"torch"`` (ATen ops only: on a CPU the same algorithm
            and results within float32 rounding; on CUDA the table instead of the exact kernel). With
            ``torch.get_num_threads() > 1`` on Linux the fused per-weight pass (and a big table's build) runs on torch's
            own OpenMP threads (identical results; ``DISTILL_PRIOR_TEAM=0`` keeps them on one). That CPU table spans
            the range of the previous step's weights (the pass measures it), widened by 1% each side; a weight found
            beyond it gets its exact gradient, so the table never has to be sized by an extra read of every weight.
            From the second step on, that whole CPU path is one compiled call (:class:`distill.prior_kernels.HostStep`),
            and the mixture's Adam step another.
        merge_threshold: merge components closer than this (symmetric KL, or mean distance) before quantizing.
        merge_criterion: ``"kl"`` or ``"mean"``.
        quantize_on_end: quantize the weights at the end of training.
        prune_from_epoch: from the start of this epoch on, the weights the zero component owns (after merging, as
            :meth:`quantize` decides at the end) are set to exactly 0 and held there (their gradients masked, the
            weights re-zeroed after each step), while the others go on training under the prior. With a ``tau``
            schedule and distillation, which pulls members back out of the zero component in the weak phase, prune
            late in it: on LeNet5Caffe ``tau: {0: 1.0, 20: 0.1}`` with ``prune_from_epoch: 30`` of 40 ended sparser
            than without, while pruning at 20 (before that revival) cost 0.6 points of accuracy (BENCHMARKS.md).
            ``None`` (default): the zero component is pruned at the end only.
        log_histograms: log per-layer weight histograms to TensorBoard each epoch.
        log_every_n_steps: how often to log the components; ``None`` follows the trainer.
        save_weights: write ``gmm_weights.npz`` (all compressed weights at start, end, after quantization). The
            start's are written as the fit begins and the checkpoints name the file, so that a resumed run (in a new
            run folder) writes the first run's start, not its own.

    Raises:
        ValueError: on an argument outside its range (the message names it).
    """

    _train_ended = False  # on_train_end ran in this fit (see on_fit_end)
    _mixture_pending = False  # the mixture's gradients are set for a network step: it steps after that one
    _network_stepped = False  # ...which has run (an optimizer step post-hook)
    _step_hooks: list[Any] = []  # noqa: RUF012 - replaced per fit, never mutated in place
    # the range a CPU table is built over: the previous step's weights' range, widened (see apply_prior_gradient)
    _range_hint: tuple[float, float] | None = None
    RANGE_MARGIN = 0.01  # each side, as a fraction of the range

    def __init__(
        self,
        num_components: int = 16,
        tau: float | dict[int, float] | Callable[[int], float] = 5e-3,
        warmup_epochs: int = 0,
        dataset_size: int | None = None,
        pi_zero: float = 0.999,
        pi_zero_beta: tuple[float, float] | None = None,
        gamma_zero: tuple[float, float] | None = (5000.0, 2.0),
        gamma: tuple[float, float] | None = (250.0, 0.1),
        init_std: float = 0.25,
        init_means: str = "range",
        lr_means: float = 1e-4,
        lr_log_precisions: float = 3e-3,
        lr_mixing: float = 3e-3,
        method: str = "auto",
        grid_spacing: float = 0.025,
        kernel: str = "auto",
        merge_threshold: float = 0.1,
        merge_criterion: str = "kl",
        quantize_on_end: bool = True,
        prune_from_epoch: int | None = None,
        log_histograms: bool = True,
        log_every_n_steps: int | None = None,
        save_weights: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(num_components, bool) or not isinstance(num_components, int) or num_components < 1:
            raise ValueError(f"num_components must be an integer J >= 1, got {num_components!r}")
        if isinstance(tau, Mapping):
            tau = piecewise_schedule(tau, "tau")  # checked and sorted; must start at epoch 0
        elif not callable(tau) and not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0):
            raise ValueError(f"tau must be a number >= 0, a mapping {{first epoch: tau}} or a function epoch -> tau, "
                             f"got {tau!r}")
        if not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
        if dataset_size is not None and (not isinstance(dataset_size, int) or dataset_size < 1):
            raise ValueError(f"dataset_size must be None or a positive integer, got {dataset_size!r}")
        if not 0.0 < pi_zero < 1.0:
            raise ValueError(f"pi_zero must be in (0, 1), got {pi_zero!r}")
        for name, lr in (("lr_means", lr_means), ("lr_log_precisions", lr_log_precisions), ("lr_mixing", lr_mixing)):
            if not (isinstance(lr, (int, float)) and lr >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {lr!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not grid_spacing > 0:
            raise ValueError(f"grid_spacing must be > 0, got {grid_spacing!r}")
        if kernel not in ("auto", "torch"):
            raise ValueError(f"kernel must be 'auto' or 'torch', got {kernel!r}")
        if merge_criterion not in ("kl", "mean"):
            raise ValueError(f"merge_criterion must be 'kl' or 'mean', got {merge_criterion!r}")
        if not merge_threshold >= 0:
            raise ValueError(f"merge_threshold must be >= 0, got {merge_threshold!r}")
        if init_means not in ("range", "kmeans"):
            raise ValueError(f"init_means must be 'range' or 'kmeans', got {init_means!r}")
        if not init_std > 0:
            raise ValueError(f"init_std must be > 0, got {init_std!r}")
        if prune_from_epoch is not None and (isinstance(prune_from_epoch, bool) or not isinstance(prune_from_epoch, int)
                                             or prune_from_epoch < 0):
            raise ValueError(f"prune_from_epoch must be None or an integer epoch >= 0, got {prune_from_epoch!r}")
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be None or >= 1, got {log_every_n_steps!r}")
        self.num_components = num_components
        self.tau = tau
        self.warmup_epochs = warmup_epochs
        self.dataset_size = dataset_size
        self.lrs = {"means": float(lr_means), "log_precisions": float(lr_log_precisions), "mixing": float(lr_mixing)}
        self.method = method
        self.init_means = init_means
        self.grid_spacing = float(grid_spacing)
        self.kernel = kernel
        self.merge_threshold = float(merge_threshold)
        self.merge_criterion = merge_criterion
        self.quantize_on_end = quantize_on_end
        self.prune_from_epoch = prune_from_epoch
        # kept-weight masks of the compressed parameters once the zero component was pruned (prune_from_epoch)
        self.masks: dict[str, torch.Tensor] = {}
        self.pruned: dict[str, Any] | None = None  # when, and the non-zero fraction per layer then
        self.log_histograms = log_histograms
        self.log_every_n_steps = log_every_n_steps
        self.save_weights = save_weights
        self.mixture = GaussianMixturePrior(
            num_components,
            init_std=init_std,
            pi_zero=pi_zero,
            pi_zero_beta=_positive_pair("pi_zero_beta", pi_zero_beta),
            gamma_zero=_positive_pair("gamma_zero", gamma_zero),
            gamma=_positive_pair("gamma", gamma),
        )
        self.optimizer: torch.optim.Optimizer | None = None
        self.initialized = False
        self.history: dict[str, Any] = self._empty_history()
        self.merged: dict[str, list[float]] | None = None
        self.last_prior_loss: float | None = None
        self._epoch_loss: list[float] = [0.0, 0]  # sum and count of this epoch's prior loss terms
        self._initial_file: str | None = None  # where the initial weights were written, and their id (checkpointed)
        self._initial_id: str | None = None
        self.num_weights = 0
        self._params: dict[str, nn.Parameter] = {}
        self._workspace: dict[str, Any] = {}  # MixtureTable's scratch tensors and arrays, reused every step
        self._pending_state: dict[str, Any] | None = None
        self._run_dir: Path | None = None
        self._initial: np.ndarray | None = None
        self._final: np.ndarray | None = None
        self._record_at_start = False
        self._skip_known_after_step: pl.Trainer | None = None  # its scaler says, inside the step, if it skipped
        self._warned_layout = False

    # -- extension points ----------------------------------------------------------------------------------------------
    def filter_parameters(self, pl_module: pl.LightningModule) -> dict[str, nn.Parameter]:
        """The parameters to compress, by dotted name. Default: the ``weight`` of every Linear and Conv layer of the
        network :func:`distill.compress.params.network_of` picks (``.student``, else ``.model``, else the module), so
        a Distiller's FitNets adapters are not clustered.

        Override in a subclass to choose others (biases and normalisation layers stay full precision by default).
        """
        net, prefix = network_of(pl_module)
        return {prefix + name: p for name, p in compressible_parameters(net).items() if p.requires_grad}

    def current_tau(self, epoch: int) -> float:
        """``tau`` at ``epoch`` (the function or value, times the warm-up ramp)."""
        if isinstance(self.tau, dict):
            tau = schedule_at(self.tau, epoch)
        else:
            tau = float(self.tau(epoch)) if callable(self.tau) else float(self.tau)
        if self.warmup_epochs > 0:
            tau *= min(1.0, (epoch + 1) / (self.warmup_epochs + 1))
        return tau

    # -- setup ---------------------------------------------------------------------------------------------------------
    @staticmethod
    def _empty_history() -> dict[str, Any]:
        keys = ("epochs", "steps", "means", "stds", "pis", "prior_loss", "significant", "nonzero", "nonzero_by_layer")
        return {k: [] for k in keys}

    def _build_optimizer(self) -> torch.optim.Optimizer:
        groups = [
            {"params": params, "lr": self.lrs[name], "name": name} for name, params in self.mixture.groups().items()
        ]
        # on a CPU the host step of _MixtureAdam; elsewhere fused where the device supports it (the single-tensor
        # step is ~30 tiny ops per parameter group)
        try:
            opt: torch.optim.Optimizer = _MixtureAdam(groups, fused=self.mixture.free_means.device.type != "cpu")
        except (RuntimeError, ValueError):
            opt = _MixtureAdam(groups)
        # the mixture's step runs in a callback, never inside a captured graph: torch's per-step capture check (an
        # NVML query under Lightning) would cost as much as the whole update
        skip_idle_graph_capture_check(opt, always=True)
        return opt

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_ended = False
        params = self.filter_parameters(pl_module)
        if not params:
            raise ValueError(
                f"GMMPrior: filter_parameters found no parameter to compress in {type(pl_module).__name__} "
                "(default: weights of Linear/Conv layers); override filter_parameters to choose some"
            )
        optimised = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        missing = [n for n, p in params.items() if id(p) not in optimised]
        if missing:
            raise ValueError(f"GMMPrior: parameters {missing} are not in any optimizer of the module")
        self._params = params
        self.num_weights = sum(p.numel() for p in params.values())
        if self._pending_state is None:
            self._range_hint = None  # another network or run: the first step measures its weights
        self._mixture_pending = False
        self._network_stepped = False
        for handle in self._step_hooks:
            handle.remove()
        first = next(iter(params.values()))
        self._step_hooks = [opt.register_step_post_hook(self._after_network_step) for opt in trainer.optimizers
                            if any(p is first for g in opt.param_groups for p in g["params"])]
        self._run_dir = run_folder(trainer)  # on every rank (log_dir broadcasts)
        self.mixture.to(device=pl_module.device, dtype=torch.float32)
        with torch.no_grad():  # own storage: under ddp_spawn on CPU the pickled tensors share memory across ranks
            for p in self.mixture.parameters():
                p.data = p.data.clone()
        if not self.initialized:
            with torch.no_grad():
                self.mixture.free_means.copy_(self._initial_means(list(params.values())))
        self.optimizer = self._build_optimizer()
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None
        if self.masks:  # restored from a checkpoint: the pruned weights are held at 0 from the first step
            unknown = sorted(set(self.masks) - set(params))
            if unknown:
                raise ValueError(f"GMMPrior: restored pruning masks {unknown} match no compressed parameter of "
                                 f"{type(pl_module).__name__} (compressed: {sorted(params)})")
            self.masks = {n: m.to(params[n].device) for n, m in self.masks.items()}
            self._apply_masks()
        self._record_at_start = not self.initialized  # a resumed run already has its first record
        self.initialized = True
        if self.save_weights and self._initial is None:
            self._initial = self._restored_initial()
            if self._initial is None:
                if not self._record_at_start:  # resumed, but the first run's file is gone: say what "initial" is
                    where = self._initial_file or "no file recorded in the checkpoint"
                    rank_zero_warn(f"GMMPrior: the initial weights of the run this one resumes cannot be read "
                                   f"({where}); gmm_weights.npz's 'initial' are the weights at the resume")
                self._initial = self._flat_weights()
                self._initial_id = uuid.uuid4().hex  # names these weights in the file and in the checkpoints
            if not self._record_at_start:
                self._write_weights(trainer)  # now, so that a resume of this run finds them (a fresh run writes
                # them in on_train_start)
            if self._run_dir is not None:
                self._initial_file = str((self._run_dir / "gmm_weights.npz").resolve())

    def _restored_initial(self) -> np.ndarray | None:
        """The initial weights that the run this one resumes wrote, if its file is there and holds the weights the
        checkpoint names (another run may have written a file of that name since: its id differs)."""
        if self._initial_file is None or self._initial_id is None or not Path(self._initial_file).is_file():
            return None
        try:
            with np.load(self._initial_file, allow_pickle=False) as z:
                if "initial" not in z.files or "initial_id" not in z.files or str(z["initial_id"]) != self._initial_id:
                    return None
                initial = z["initial"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            return None
        return initial if initial.shape == (self.num_weights,) else None

    def _initial_means(self, params: list[torch.Tensor]) -> torch.Tensor:
        j = self.num_components
        if self.init_means == "kmeans":
            w = torch.cat([p.detach().reshape(-1).float().cpu() for p in params]).numpy()
            centroids, _ = kmeans_1d(w, j + 1)
            centroids = np.delete(centroids, int(np.argmin(np.abs(centroids))))  # the zero component's place
            if centroids.size == j:
                return torch.from_numpy(np.sort(centroids)).float()
        lo = min(float(p.min()) for p in params)
        hi = max(float(p.max()) for p in params)
        return torch.linspace(lo, hi, j) if j > 1 else torch.tensor([0.5 * (lo + hi)])

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.dataset_size is None:  # the train dataloader exists from here on, not in on_fit_start
            self.dataset_size = self._infer_dataset_size(trainer)
        if self._record_at_start:
            self._record(trainer, exact_loss=True)
            self._write_weights(trainer)
            self._record_at_start = False

    @staticmethod
    def _infer_dataset_size(trainer: pl.Trainer) -> int:
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            batch = getattr(loader, "batch_size", None) or 1
            n = int(trainer.num_training_batches * batch * trainer.world_size)
        if not n >= 1:
            raise ValueError("GMMPrior: could not infer the training-set size; pass dataset_size=N")
        return int(n)

    # -- the prior's gradient ------------------------------------------------------------------------------------------
    def _use_table(self) -> bool:
        if self.method == "exact":
            return False
        if self.method == "table":
            return True
        return self.num_weights > 4096 * (self.num_components + 1) // 4

    def _check_finite(self, what: str, value: torch.Tensor, step: int) -> None:
        if not bool(torch.isfinite(value).all()):
            raise FloatingPointError(f"GMMPrior: non-finite value in {what} at global step {step}")

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._params or self.optimizer is None:
            return
        first = next(iter(self._params.values()))
        if not any(p is first for g in optimizer.param_groups for p in g["params"]):
            return  # another optimizer (manual optimization with several)
        self._finish_mixture_step()  # a step left from an earlier network step of this batch (manual optimization)
        scale = self.current_tau(trainer.current_epoch) / float(self.dataset_size or 1)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # 16-bit AMP with an optimizer that unscales inside its step (torch's fused Adam/AdamW/SGD): Lightning leaves
        # the gradients scaled here, so the prior's gradient is scaled alike, and whether the scaler skips the
        # network's step is known only inside that step (checked in _after_network_step)
        unscales_itself = scaler is not None and bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        grad_scale = float(scaler.get_scale()) if scaler is not None and unscales_itself else 1.0
        self.apply_prior_gradient(scale=scale, step=trainer.global_step, grad_scale=grad_scale)
        if self.masks:
            for name, mask in self.masks.items():
                g = self._params[name].grad
                if g is not None:
                    g.mul_(mask)
        # The mixture steps once the network's optimizer has (the same arithmetic: neither step reads what the other
        # changes), so that a Ctrl-C between the two cannot leave the mixture a step ahead in last.ckpt; one caught
        # between the network's step and the mixture's finishes the pair first (on_exception).
        self._mixture_pending = not self._network_step_skipped(trainer, optimizer)
        self._skip_known_after_step = trainer if unscales_itself else None
        self._network_stepped = False

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._step_hooks:  # no hook of this run left on an optimizer a later fit may reuse
            handle.remove()
        self._step_hooks = []

    def _after_network_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._network_stepped = True
        trainer, self._skip_known_after_step = self._skip_known_after_step, None
        if trainer is not None and self._network_step_skipped(trainer, optimizer):
            self._mixture_pending = False  # the scaler found inf/NaN inside the step: the mixture skips too

    def _finish_mixture_step(self) -> None:
        if self._mixture_pending:
            self._mixture_pending = False
            self.step_mixture()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # runs before the checkpoints' on_exception (Lightning puts ModelCheckpoint callbacks last): the interrupted
        # state they save has both steps of the batch or neither
        if self._mixture_pending and self._network_stepped:
            self._finish_mixture_step()
        self._mixture_pending = False

    def step_mixture(self) -> None:
        """One optimizer step of the mixture's parameters (after :meth:`apply_prior_gradient` set their gradients)."""
        if isinstance(self.optimizer, _MixtureAdam):
            self.optimizer.fast_step()
        elif self.optimizer is not None:
            self.optimizer.step()

    def _host_arrays(self, params: list[nn.Parameter]) -> list[np.ndarray] | None:
        """Flat NumPy views of CPU float32 contiguous weights (what the fused kernels take), else ``None``.

        Kept between steps while each parameter keeps its memory and layout (making them took ~20 us a step on a
        CPU: ``.device`` and ``.detach().numpy()`` cost 1-3 us each on a parameter); a plain attribute, not state."""
        cached: tuple[list[tuple[Any, ...]], list[np.ndarray]] | None = self.__dict__.get("_arrays_cache")
        if cached is not None and len(cached[0]) == len(params) and all(
                p is q and p.data_ptr() == ptr and p.dtype == dt and p.shape == shape and p.is_contiguous()
                for p, (q, ptr, dt, shape) in zip(params, cached[0], strict=True)):
            return cached[1]
        self.__dict__.pop("_arrays_cache", None)
        if all(p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous() for p in params):
            arrays = [p.detach().numpy().reshape(-1) for p in params]
            self.__dict__["_arrays_cache"] = ([(p, p.data_ptr(), p.dtype, p.shape) for p in params], arrays)
            return arrays
        return None

    @staticmethod
    def _weight_ranges(params: list[nn.Parameter], on_cpu: bool = False) -> list[tuple[float, float]]:
        """``(min, max)`` of each compressed tensor (a non-finite value makes them non-finite); one host sync, or on
        the CPU (``on_cpu``: all of them CPU tensors) one cheap ``.item()`` per value."""
        if on_cpu:
            # torch's one-pass aminmax on its own threads. Right after the backward pass, where this
            # runs, NumPy's two passes (min, then max) took ~1.5x as long on LeNet-300-100 and LeNet5Caffe
            # (BENCHMARKS.md, session 15). NaN and inf propagate through both.
            out = []
            for p in params:
                lo, hi = torch.aminmax(p.detach())
                out.append((lo.item(), hi.item()))
            return out
        checks = torch.cat([torch.stack(torch.aminmax(p.detach().float())) for p in params]).tolist()
        return list(zip(checks[0::2], checks[1::2], strict=True))

    def apply_prior_gradient(self, scale: float, step: int = -1, grad_scale: float = 1.0) -> float:
        """Add ``scale * d prior / dw`` to the compressed weights' ``.grad``, set the mixture's ``.grad``.

        ``grad_scale``: the factor the weights' gradients carry at this point (AMP's loss scale when the optimizer
        unscales them itself, as fused ones do); the prior's weight gradient is multiplied by it, the mixture's not.

        Returns:
            the prior's loss term ``scale * (-sum log p(w) + hyper-prior)``.

        Raises:
            FloatingPointError: on NaN/inf in a weight or the mixture (naming it and the step).
        """
        mix = self.mixture
        params = list(self._params.values())
        with torch.no_grad():
            loss = self._host_step(params, scale, step, grad_scale)
            if loss is not None:
                return loss
            means_np, lp_np, lpi_np, mixture_finite = mix._host_mixture()
            if not mixture_finite:
                for name, q in mix.named_parameters():
                    self._check_finite(f"mixture parameter {name!r}", q.detach(), step)
                raise FloatingPointError(f"GMMPrior: non-finite mixing weights at global step {step}")
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            nll: Any  # a float and NumPy arrays on the host and CUDA-kernel paths, tensors on the others
            gm: Any
            gl: Any
            gp: Any
            views = self._cuda_views(params, len(means_np))
            if views is not None:
                nll, gm, gl, gp = self._cuda_pass(views, means_np, lp_np, lpi_np, scale * grad_scale)
                if not math.isfinite(float(nll)):  # a NaN/inf weight: name it (the slow path runs only then)
                    self._check_weight_ranges(params, on_cpu=False, step=step)
                hyper, finite = mix._backward_from_stats(gm, gl, gp, scale)
                return self._finish_prior(nll, hyper, finite, scale, step)
            arrays = self._host_arrays(params)
            grads = [p.grad for p in params]
            # The fused CPU pass takes the exact path for any weight outside its table (and NaN/inf), so its table
            # need not span this step's weights: it spans the previous step's range (which the pass reports for free)
            # widened by RANGE_MARGIN, and the weights' own range pass -- a read of every weight and a thread-team
            # wake-up that cost ~0.1-0.3 ms a step on LeNet-300-100, more than the table's build (BENCHMARKS.md,
            # session 20) -- runs on the first step only. A non-finite weight then shows in the loss, and is named.
            fused_host = (arrays is not None and self.kernel == "auto" and self._use_table() and _kernels_available()
                          and all(g is not None and g.dtype == torch.float32 and g.is_contiguous() for g in grads))
            hint = self._range_hint if fused_host else None
            self._range_hint = None
            ranges = [hint] if hint is not None else self._check_weight_ranges(params, on_cpu=arrays is not None,
                                                                                step=step)
            dev, dtype = mix.free_means.device, mix.free_means.dtype

            def on_device() -> list[torch.Tensor]:
                return [torch.from_numpy(a).to(dev, dtype) for a in (means_np, lp_np, lpi_np)]

            table: MixtureTable | None = None
            if self._use_table():
                lo = min(r[0] for r in ranges)
                hi = max(r[1] for r in ranges)
                # a CPU mixture goes to the table as NumPy arrays (its fused kernels take them as they are)
                mixture: list[Any] = [means_np, lp_np, lpi_np] if dev.type == "cpu" else on_device()
                table = MixtureTable(mixture[0], mixture[1], mixture[2], lo, hi, spacing=self.grid_spacing,
                                     workspace=self._workspace, kernel=self.kernel)
                if self.method == "auto" and table.needed > table.size:
                    table = None  # too narrow a component for the grid: exact (slower) rather than inaccurate
            if table is not None and table.fused and fused_host:
                # the whole pass in one compiled call on NumPy views of the weights and their gradients
                host_grads = tuple(g.detach().numpy().reshape(-1) for g in grads)  # type: ignore[union-attr]
                nll, gm, gl, gp = table.accumulate_all_host(tuple(arrays), host_grads, scale * grad_scale)  # type: ignore[arg-type]
                self._range_hint = self._widened(table.weight_range)
                if hint is not None and not math.isfinite(float(nll)):
                    self._check_weight_ranges(params, on_cpu=True, step=step)  # a NaN/inf weight: name it
            elif table is not None:
                for p, g in zip(params, grads, strict=True):
                    table.accumulate_grad(p.detach(), g, alpha=scale * grad_scale)  # type: ignore[arg-type]
                nll, gm, gl, gp = table._result()
            else:
                means, lp, lpi = on_device()
                res = mixture_nll_grad([p.detach() for p in params], means, lp, lpi)
                for p, g in zip(params, res.grad_w, strict=True):
                    p.grad.add_(g.to(p.grad.dtype), alpha=scale * grad_scale)  # type: ignore[union-attr]
                nll, gm, gl, gp = res.nll, res.grad_means, res.grad_log_precisions, res.grad_log_pis
            hyper, finite = mix._backward_from_stats(gm, gl, gp, scale)
        return self._finish_prior(nll, hyper, finite, scale, step)

    def _host_step(self, params: list[nn.Parameter], scale: float, step: int, grad_scale: float) -> float | None:
        """The fused CPU path below in one compiled call (:class:`distill.prior_kernels.HostStep`: the same numbers,
        without ~60 Python-level calls that cost ~0.5 ms inside a step); ``None`` where it does not apply (the
        general path then runs: it also names a non-finite mixture parameter, and takes the exact path when the grid
        would be too fine)."""
        arrays = self._host_arrays(params)
        if arrays is None or self.kernel != "auto" or not self._use_table():
            return None
        mix = self.mixture
        views = mix._param_views()
        plan: tuple[Any, ...] | None = self.__dict__.get("_plan")
        if plan is None or plan[0] is not arrays or plan[1] is not views or not all(
                p.grad is g and g.data_ptr() == ptr for p, g, ptr in plan[3]):
            plan = self._new_plan(arrays, views)
            if plan is None:
                return None
        addresses = plan[2].grad_addresses
        for i, p in enumerate(params):
            g = p.grad
            if g is None or not g.is_contiguous():
                return None
            addresses[i] = g.data_ptr()
        from distill import prior_kernels

        hint = self._range_hint
        self._range_hint = None
        if hint is not None:
            lo, hi = hint
        else:  # the first step: the weights' own range
            ranges = self._check_weight_ranges(params, on_cpu=True, step=step)
            lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
        z, log_p0, log_rest = mix._zero_share_logs()
        status = plan[2].run(lo, hi, scale * grad_scale, scale, log_p0, log_rest, z,
                             prior_kernels.team_size(self.num_weights))
        if status != prior_kernels.STEP_DONE:
            self._range_hint = hint
            return None
        out = plan[2].out
        nll = float(out[0])
        self._range_hint = self._widened((float(out[3]), float(out[4])))
        if hint is not None and not math.isfinite(nll):
            self._check_weight_ranges(params, on_cpu=True, step=step)  # a NaN/inf weight: name it
        return self._finish_prior(nll, float(out[1]), bool(out[2]), scale, step)

    def _new_plan(self, arrays: list[np.ndarray], views: tuple[np.ndarray, ...]) -> tuple[Any, ...] | None:
        """``(weights' arrays, mixture's views, HostStep, (mixture parameter, its gradient, address) triples)`` when
        the one-call step applies: numba and torch's OpenMP runtime, the mixture's parameters on the CPU in float32
        or float64 with gradients of the same kind to write in place; else ``None``."""
        self.__dict__.pop("_plan", None)
        if not _kernels_available():
            return None
        from distill import prior_kernels

        if prior_kernels._team() is None:
            return None
        mix = self.mixture
        ps = [mix.free_means, mix.log_precisions, mix.mixing_logits]
        if mix.zero_logit is not None:
            ps.append(mix.zero_logit)
        grads = [p.grad for p in ps]
        if not all(p.requires_grad and g is not None and g.device.type == "cpu" and g.is_contiguous()
                   and g.dtype in (torch.float32, torch.float64) and p.device.type == "cpu"
                   and p.dtype in (torch.float32, torch.float64) for p, g in zip(ps, grads, strict=True)):
            return None  # e.g. the first step, before the mixture has gradients
        g_views = [g.detach().numpy().reshape(-1) for g in grads]  # type: ignore[union-attr]
        if mix.zero_logit is None:
            g_views.append(np.zeros(1))
        step = prior_kernels.HostStep(
            arrays, (views[0], views[1], views[2]), (g_views[0], g_views[1], g_views[2], g_views[3]),
            spacing=self.grid_spacing, min_grid=MIN_GRID, max_grid=MAX_GRID, subbins=SUBBINS,
            auto=self.method == "auto", hyper=(mix.gamma_zero, mix.gamma, mix.pi_zero_beta),
            has_zero_logit=mix.zero_logit is not None)
        plan = (arrays, views, step, [(p, g, g.data_ptr()) for p, g in zip(ps, grads, strict=True)])  # type: ignore[union-attr]
        self.__dict__["_plan"] = plan
        return plan

    def _widened(self, span: tuple[float, float] | None) -> tuple[float, float] | None:
        """The range the next step's table spans: the weights' range ``span`` widened by :attr:`RANGE_MARGIN` each
        side (``None`` for a non-finite one: the next step measures the weights)."""
        if span is None or not (math.isfinite(span[0]) and math.isfinite(span[1])):
            return None
        lo, hi = span
        pad = self.RANGE_MARGIN * (hi - lo)
        return lo - pad, hi + pad

    def _finish_prior(self, nll: Any, hyper: float, finite: bool, scale: float, step: int) -> float:
        """The prior's loss term from its parts, after the checks that name what went non-finite."""
        if not finite:
            for name, q in self.mixture.named_parameters():
                self._check_finite(f"the gradient of mixture parameter {name!r}", q.grad, step)  # type: ignore[arg-type]
        loss = scale * (float(nll) + hyper)
        if not math.isfinite(loss):
            raise FloatingPointError(f"GMMPrior: non-finite prior loss {loss} at global step {step}")
        self.last_prior_loss = loss
        return loss

    def _check_weight_ranges(self, params: list[nn.Parameter], on_cpu: bool, step: int) -> list[tuple[float, float]]:
        """``(min, max)`` of each compressed tensor (:meth:`_weight_ranges`); a non-finite one is an error naming it."""
        ranges = self._weight_ranges(params, on_cpu=on_cpu)
        for name, (lo_, hi_) in zip(self._params, ranges, strict=True):
            if not (math.isfinite(lo_) and math.isfinite(hi_)):
                raise FloatingPointError(f"GMMPrior: non-finite value in parameter {name!r} at global step {step}")
        return ranges

    def _cuda_views(self, params: list[nn.Parameter], components: int
                    ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The flat (weight, gradient) views :mod:`distill.prior_cuda`'s fused exact kernel takes, if this step's prior
        runs there (``kernel="auto"``, ``method`` ``"auto"`` or ``"exact"``, every weight on one CUDA device with
        Triton, each with its gradient in the same layout), else ``None``."""
        if self.kernel != "auto" or self.method == "table" or not params or params[0].device.type != "cuda":
            return None
        from distill import prior_cuda  # imports Triton: only once a weight is on a GPU

        dev = params[0].device
        if not (prior_cuda.available(dev) and components <= prior_cuda.MAX_COMPONENTS
                and all(p.device == dev for p in params)):
            return None
        pairs = [_flat_pair(p) for p in params]
        odd = [name for name, pair in zip(self._params, pairs, strict=True) if pair is None]
        if odd:
            if not self._warned_layout:
                self._warned_layout = True
                rank_zero_warn(f"GMMPrior: {odd} are neither contiguous nor channels_last (or their gradients are laid "
                               f"out otherwise): the prior runs as ATen ops on this GPU (slower) instead of its fused "
                               f"kernel")
            return None
        return [pair for pair in pairs if pair is not None]

    def _cuda_pass(self, views: list[tuple[torch.Tensor, torch.Tensor]], means: np.ndarray, log_prec: np.ndarray,
                   log_pis: np.ndarray, scale: float) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        """``grad += scale * d(-log p)/dw`` on the GPU, one fused kernel per (weight, gradient) view, and the sums the
        mixture's gradients need, read back in one copy: ``(nll, grad_means, grad_log_precisions, grad_log_pis)``."""
        from distill import prior_cuda, prior_kernels

        prec, const, _ = prior_kernels.component_terms(log_prec, log_pis)
        dev = views[0][0].device
        comp = prior_cuda.components(torch.from_numpy(means), torch.from_numpy(prec), torch.from_numpy(const), dev)
        out = torch.zeros(1 + 3 * len(means), dtype=torch.float64, device=dev)
        for w, g in views:
            prior_cuda.accumulate(w, g, comp, out, scale)
        tot = out.cpu().numpy()  # the step's one wait for the GPU
        gm, gl, gp = _mixture_param_grads(tuple(tot[1:].reshape(3, -1)), prec)
        return float(tot[0]), gm, gl, gp

    @staticmethod
    def _network_step_skipped(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> bool:
        """Whether 16-bit AMP's gradient scaler found inf/NaN and will skip the network's step."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None:
            return False
        state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer), {})
        found = state.get("found_inf_per_device", {})
        return any(float(v.item()) > 0 for v in found.values())

    # -- logging and records -------------------------------------------------------------------------------------------
    def _components(self) -> dict[str, float]:
        out: dict[str, float] = {}
        with torch.no_grad():
            for key, values in (("mean", self.mixture.means), ("std", self.mixture.stds), ("pi", self.mixture.pis)):
                for j, v in enumerate(values.tolist()):
                    out[f"gmm/{key}_{j}"] = v
        return out

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._finish_mixture_step()
        if self.masks:
            self._apply_masks()  # Adam's moments or weight decay may have moved a pruned weight
        if self.last_prior_loss is not None:
            self._epoch_loss[0] += self.last_prior_loss
            self._epoch_loss[1] += 1
            # per-step scalars only on the steps the logger writes: each self.log walks Lightning's result collection
            # (~0.3 ms a step on a CPU); the epoch mean is logged from the running sum at the epoch's end
            if should_log_step(pl_module):
                pl_module.log("gmm/prior_loss_step", self.last_prior_loss, on_step=True, on_epoch=False)
        every = self.log_every_n_steps or getattr(trainer, "log_every_n_steps", 50)
        if trainer.logger is not None and every and trainer.global_step % every == 0:
            trainer.logger.log_metrics(self._components(), step=trainer.global_step)

    def _flat_weights(self) -> np.ndarray:
        with torch.no_grad():
            flat = [p.detach().reshape(-1).float().cpu() for p in self._params.values()]
        return torch.cat(flat).numpy() if flat else np.zeros(0, np.float32)

    @torch.no_grad()
    def _component_indices(self, merged: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                           ) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
        """Per compressed parameter, the index of each weight's merged component, exactly as :meth:`quantize` assigns
        it (0: the zero component). ``merged``: :meth:`_merged_mixture`'s result, if already at hand."""
        m, s, pi = merged if merged is not None else self._merged_mixture()
        for name, p in self._params.items():
            _, idx = quantize_weights(p.detach(), m.to(p.device), s.to(p.device), pi.to(p.device))
            yield name, p, idx

    def _assignment(self) -> tuple[int, float, dict[str, float]]:
        """The merged components :meth:`quantize` would use now: how many own at least one weight, and the fraction
        of weights the zero component does not own (what would stay non-zero), overall and per parameter."""
        merged = self._merged_mixture()
        used = torch.zeros(merged[0].numel(), dtype=torch.bool)
        nonzero: dict[str, float] = {}
        kept = 0
        for name, p, idx in self._component_indices(merged):
            used[idx.unique().cpu()] = True
            n = int((idx != 0).sum())
            kept += n
            nonzero[name] = n / max(p.numel(), 1)
        return int(used.sum()), kept / max(self.num_weights, 1), nonzero

    def _exact_prior_loss(self, scale: float) -> float:
        with torch.no_grad():
            mix = self.mixture
            means, lp, lpi = mix.means, mix.log_precisions, mix.log_pis()
            nll = sum(float(-mixture_log_prob(p.detach().float(), means, lp, lpi).sum()) for p in self._params.values())
            return scale * (nll + float(mix.hyperprior_nll()))

    def _record(self, trainer: pl.Trainer, exact_loss: bool = False) -> None:
        h = self.history
        scale = self.current_tau(trainer.current_epoch) / float(self.dataset_size or 1)
        loss = self._exact_prior_loss(scale) if exact_loss or self.last_prior_loss is None else self.last_prior_loss
        with torch.no_grad():
            h["epochs"].append(int(trainer.current_epoch))
            h["steps"].append(int(trainer.global_step))
            h["means"].append(self.mixture.means.tolist())
            h["stds"].append(self.mixture.stds.tolist())
            h["pis"].append(self.mixture.pis.tolist())
        h["prior_loss"].append(float(loss))
        significant, nonzero, by_layer = self._assignment()
        h["significant"].append(significant)
        # older checkpoints' histories lack these two
        h.setdefault("nonzero", []).append(nonzero)
        h.setdefault("nonzero_by_layer", []).append(by_layer)
        if trainer.logger is not None:
            metrics = self._components()
            metrics["gmm/significant"] = float(significant)
            metrics["gmm/nonzero"] = nonzero
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        self._write_history(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # not called for the epoch that a mid-epoch resume re-enters: the sums restored from the checkpoint go on
        self._epoch_loss = [0.0, 0]
        if self.prune_from_epoch is not None and trainer.current_epoch >= self.prune_from_epoch and not self.masks:
            self.prune_zero_component(trainer)

    # -- pruning the zero component during training (prune_from_epoch) -------------------------------------------------
    def _merged_mixture(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return merge_components(
                self.mixture.means.detach().double().cpu(),
                self.mixture.stds.detach().double().cpu(),
                self.mixture.pis.detach().double().cpu(),
                self.merge_threshold,
                self.merge_criterion,
            )

    @torch.no_grad()
    def _apply_masks(self) -> None:
        for name, mask in self.masks.items():
            self._params[name].mul_(mask)

    def _kept_masks(self, caller: str, merged: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
        """Per compressed parameter, 1 where the merged mixture's zero component does not own the weight (as
        :meth:`quantize` assigns them), else 0."""
        if not self._params:
            raise RuntimeError(f"GMMPrior.{caller}: call it during or after fit (no compressed parameters yet)")
        return {name: (idx != 0).view(p.shape).to(p.dtype) for name, p, idx in self._component_indices(merged)}

    @torch.no_grad()
    def zero_members(self) -> dict[str, float]:
        """Set the weights the merged zero component owns to exactly 0, as :meth:`quantize` would, and leave every
        other weight as it is (no masks kept, nothing recorded): the prior's pruning without its codebook, for
        k-means sharing of the rest (``PruneQuantize(codebook="kmeans")``).

        Returns:
            the non-zero fraction per compressed parameter.
        """
        m, s, pi = merged = self._merged_mixture()
        masks = self._kept_masks("zero_members", merged)
        for name, mask in masks.items():
            self._params[name].mul_(mask)
        # recorded in gmm_history.json ("merged"), as quantize() records it
        self.merged = {"means": m.tolist(), "stds": s.tolist(), "pis": pi.tolist()}
        self._write_history(None)
        return {n: float(mk.double().mean()) for n, mk in masks.items()}

    @torch.no_grad()
    def prune_zero_component(self, trainer: pl.Trainer | None = None) -> dict[str, Any]:
        """Set the weights the zero component owns (in the merged mixture, as :meth:`quantize` assigns them) to
        exactly 0 and hold them there for the rest of training; zero their optimizer state too.

        Returns:
            the record kept in ``gmm_history.json`` (``"pruned"``): epoch, step and the non-zero fraction per layer.
        """
        masks = self._kept_masks("prune_zero_component")
        self.masks = masks
        self._apply_masks()
        if trainer is not None:
            mask_optimizer_state(trainer.optimizers, self._params, self.masks)
        kept = {n: float(mk.double().mean()) for n, mk in masks.items()}
        total = sum(float(mk.sum()) for mk in masks.values()) / max(self.num_weights, 1)
        self.pruned = {
            "epoch": int(trainer.current_epoch) if trainer is not None else None,
            "step": int(trainer.global_step) if trainer is not None else None,
            "nonzero": total,
            "nonzero_by_layer": kept,
        }
        if trainer is not None and trainer.logger is not None:
            trainer.logger.log_metrics({"gmm/pruned_nonzero": total}, step=trainer.global_step)
        self._write_history(trainer)
        return self.pruned

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch_loss[1]:
            pl_module.log("gmm/prior_loss_epoch", self._epoch_loss[0] / self._epoch_loss[1], on_epoch=True)
        self._record(trainer)
        logger = trainer.logger
        if self.log_histograms and isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
            for name, p in self._params.items():
                logger.experiment.add_histogram(f"gmm/weights/{name}", p.detach().float().cpu(), trainer.global_step)

    def _history_json(self) -> dict[str, Any]:
        mix = self.mixture
        out = dict(self.history)
        out["hyperprior"] = {
            "gamma_zero": list(mix.gamma_zero) if mix.gamma_zero else None,
            "gamma": list(mix.gamma) if mix.gamma else None,
            "pi_zero_beta": list(mix.pi_zero_beta) if mix.pi_zero_beta else None,
            "pi_zero": mix.pi_zero_init,
            "tau": (None if callable(self.tau) else
                    {str(e): v for e, v in self.tau.items()} if isinstance(self.tau, dict) else float(self.tau)),
            "dataset_size": self.dataset_size,
        }
        out["merged"] = self.merged
        out["pruned"] = self.pruned
        return out

    def _write_history(self, trainer: pl.Trainer | None) -> None:
        if self._run_dir is None or (trainer is not None and not trainer.is_global_zero):
            return
        atomic_write_json(self._run_dir / "gmm_history.json", self._history_json(), indent=1)

    def _write_weights(self, trainer: pl.Trainer | None, quantized: np.ndarray | None = None) -> None:
        if not self.save_weights or self._run_dir is None or (trainer is not None and not trainer.is_global_zero):
            return
        arrays = {"initial": self._initial, "final": self._final, "quantized": quantized}
        present = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items() if v is not None}
        if self._initial_id is not None:
            present["initial_id"] = np.asarray(self._initial_id)
        atomic_savez(self._run_dir / "gmm_weights.npz", **present)

    def output_paths(self) -> dict[str, str]:
        """Files this callback wrote (for the CLI's summary)."""
        if self._run_dir is None:
            return {}
        out = {"gmm history": str(self._run_dir / "gmm_history.json")}
        if self.save_weights:
            out["gmm weights"] = str(self._run_dir / "gmm_weights.npz")
        return out

    # -- the end: merge and quantize -----------------------------------------------------------------------------------
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # resumed from a checkpoint of a finished training (stopped during this end-of-training work): Lightning
        # skips the training loop and on_train_end, so the work is done here (before FigureLogger draws, at teardown)
        if not self._train_ended and training_skipped_on_resume(trainer):
            self.on_train_end(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_ended = True
        self._finish_mixture_step()
        if self.save_weights:
            self._final = self._flat_weights()
        if self.quantize_on_end:
            self.quantize(pl_module, trainer=trainer)
        else:
            self._write_weights(trainer)

    def quantize(self, pl_module: pl.LightningModule, trainer: pl.Trainer | None = None) -> dict[str, torch.Tensor]:
        """Merge close components, set every compressed weight to its most responsible component's mean.

        Members of the zero component become exactly 0. Idempotent: a second call changes nothing.

        Args:
            pl_module: the module whose compressed parameters (``filter_parameters``) are quantized in place.
            trainer: optional, for writing the artifacts only on global rank zero.

        Returns:
            ``{"*": codebook}``: the merged means (one global codebook, zero first), float32.
        """
        params = self._params or self.filter_parameters(pl_module)
        if not params:
            raise ValueError(f"GMMPrior.quantize: no parameter to quantize in {type(pl_module).__name__}")
        m, s, pi = self._merged_mixture()
        with torch.no_grad():
            for p in params.values():
                q, _ = quantize_weights(p.detach(), m.to(p.device), s.to(p.device), pi.to(p.device))
                p.copy_(q)
        self.merged = {"means": m.tolist(), "stds": s.tolist(), "pis": pi.tolist()}
        if trainer is None or trainer.is_global_zero:
            self._write_history(trainer)
            if self.save_weights and self._run_dir is not None:
                self._write_weights(trainer, quantized=self._flat_weights())
        return {"*": m.float()}

    # -- checkpointing -------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "mixture": {k: v.detach().cpu().clone() for k, v in self.mixture.state_dict().items()},
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "initialized": self.initialized,
            "dataset_size": self.dataset_size,
            "history": json.loads(json.dumps(self.history)),
            "merged": self.merged,
            "masks": {n: m.detach().bool().cpu() for n, m in self.masks.items()},
            "pruned": self.pruned,
            "epoch_loss": {"sum": self._epoch_loss[0], "count": self._epoch_loss[1]},  # a mid-epoch resume goes on
            "initial_weights": {"file": self._initial_file, "id": self._initial_id},
            # the next step's table range: a resumed run builds the table the uninterrupted one would
            "range_hint": None if self._range_hint is None else list(self._range_hint),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.optimizer is None:  # before on_fit_start (the usual order): applied once the optimizer exists
            self._pending_state = state_dict
            self.mixture.load_state_dict(state_dict["mixture"])
            self.initialized = bool(state_dict["initialized"])
            self._load_masks(state_dict)
            return
        self._apply_state(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        device = self.mixture.free_means.device
        self.mixture.load_state_dict({k: v.to(device) for k, v in state["mixture"].items()})
        if state.get("optimizer") is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.initialized = bool(state["initialized"])
        if self.dataset_size is None and state.get("dataset_size") is not None:
            self.dataset_size = int(state["dataset_size"])
        self.history = state.get("history") or self._empty_history()
        self.merged = state.get("merged")
        epoch_loss = state.get("epoch_loss")
        if epoch_loss is not None:
            self._epoch_loss = [float(epoch_loss["sum"]), int(epoch_loss["count"])]
        initial = state.get("initial_weights") or {}
        self._initial_file, self._initial_id = initial.get("file"), initial.get("id")
        hint = state.get("range_hint")
        self._range_hint = (float(hint[0]), float(hint[1])) if hint is not None else None
        self._load_masks(state)

    def _load_masks(self, state: Mapping[str, Any]) -> None:
        # float masks on the weights' device, made in on_fit_start; checkpoints without them (older, or saved before
        # prune_from_epoch) have none
        self.masks = {str(n): m.float() for n, m in (state.get("masks") or {}).items()}
        self.pruned = state.get("pruned")
