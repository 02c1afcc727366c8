"""Iterative magnitude pruning during (re)training, in any LightningModule.

Han, Pool, Tran & Dally, "Learning both Weights and Connections for Efficient Neural Networks" (NeurIPS 2015), as
the first stage of "Deep Compression" (Han, Mao & Dally, ICLR 2016): at each scheduled epoch, weights with
``|w| < quality * std(layer)`` (or the smallest ones up to a target sparsity) are removed, then the network
retrains with the mask held fixed.

Unlike Lightning's ``ModelPruning``, the mask holds against everything the optimizer does: gradients of pruned
weights are zeroed before every optimizer step, the optimizer's state (momentum, Adam moments) is zeroed at pruned
positions, and the mask is re-applied after every step, so pruned weights stay exactly zero with SGD momentum and
decoupled weight decay. The masks are part of the checkpoint and re-applied on resume. Under DDP the masks are
computed from the (synchronised) weights and broadcast from rank 0, so every rank holds the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn
from typing_extensions import override

from distill.compress.params import closest_name, compressible_parameters, network_of
from distill.compress.pipeline import write_json
from distill.compress.pruning import prune_mask
from distill.errors import ConfigError
from distill.io import run_folder

__all__ = ["MagnitudePruning"]

Schedule = float | Sequence[float] | Callable[[int], float]


def _names_layer(name: str, key: str) -> bool:
    """Whether mapping key ``key`` (``fc1``, ``fc1.weight``, ``model.fc1``...) names parameter ``name``."""
    layer = name.removesuffix(".weight")
    return key in (name, layer) or name.endswith("." + key) or layer.endswith("." + key)


def _listing(names: Sequence[str], limit: int = 12) -> str:
    """``'a', 'b', ... (N more)``: a readable list of valid names."""
    if not names:
        return "none"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


_FIX = "the init_args of the MagnitudePruning callback (trainer.callbacks in the config file, or on the command line)"


@torch.no_grad()
def mask_optimizer_state(
    optimizers: Iterable[torch.optim.Optimizer], params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
) -> None:
    """Zero the pruned entries of every per-weight optimizer state tensor (momenta, Adam's moments) of ``params``,
    so that a pruned weight is not moved by what it accumulated before."""
    by_id = {id(params[n]): m for n, m in masks.items() if n in params}
    for opt in optimizers:
        for p, state in opt.state.items():
            mask = by_id.get(id(p))
            if mask is None:
                continue
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.shape == mask.shape:
                    v.mul_(mask.to(v.device, v.dtype))


class MagnitudePruning(Callback):
    """Prune-then-retrain on a schedule; masks survive momentum, weight decay, resume and DDP.

    Args:
        quality: prune ``|w| < quality * std(w)`` per layer; a number, a list (one per iteration, the last one
            repeats) or a function of the iteration number (0-based).
        sparsity: or prune each layer to this fraction of zeros (same forms). Exactly one of the two. A mapping
            ``{layer: schedule}`` gives each layer its own (keys: parameter or layer names or dotted suffixes of them;
            the key ``"*"`` covers the layers not named), e.g. ``{fc1: [0.9, 0.98], fc3: [0.5, 0.8]}``: small layers
            such as the classifier tolerate far less pruning than the large ones.
        prune_epochs: epochs at whose start a pruning iteration runs, e.g. ``[0, 20, 40]``.
        every_n_epochs: or prune at epochs ``0, n, 2n, ...`` (at most ``max_iterations`` times).
            Default (neither given): prune once at epoch 0.
        max_iterations: cap on the number of pruning iterations with ``every_n_epochs``.
        parameter_names: names (as in ``pl_module.named_parameters()``) to prune; default
            :meth:`filter_parameters`.
        monitor: metric recorded as the accuracy reached by each iteration (its last validation).
        history_file: JSON written into the run folder (None: don't write).

    Raises:
        ValueError: on a misconfiguration, naming the argument: in ``__init__``; for ``parameter_names`` or keys of a
            ``sparsity`` mapping that name no parameter or layer of the LightningModule, a :class:`ConfigError` in
            ``setup`` (before any training step).
    """

    def __init__(
        self,
        quality: Schedule | None = None,
        # the mapping before the function: jsonargparse tries a union's types in order when it writes the config
        # (config.yaml in every run folder), and its Callable writer fails on a mapping
        sparsity: float | Sequence[float] | Mapping[str, Schedule] | Callable[[int], float] | None = None,
        prune_epochs: Sequence[int] | None = None,
        every_n_epochs: int | None = None,
        max_iterations: int | None = None,
        parameter_names: Sequence[str] | None = None,
        monitor: str = "val/acc",
        history_file: str | None = "pruning_history.json",
    ) -> None:
        super().__init__()
        if (quality is None) == (sparsity is None):
            raise ValueError(f"give exactly one of quality or sparsity, got quality={quality!r}, sparsity={sparsity!r}")
        checks: list[tuple[str, Any, Callable[[float], bool], str]] = [("quality", quality, lambda v: v >= 0, ">= 0")]
        if isinstance(sparsity, Mapping):
            if not sparsity:
                raise ValueError("sparsity given as a mapping {layer: schedule} must name at least one layer")
            checks += [(f"sparsity[{k!r}]", v, lambda v: 0 <= v <= 1, "in [0, 1]") for k, v in sparsity.items()]
        else:
            checks.append(("sparsity", sparsity, lambda v: 0 <= v <= 1, "in [0, 1]"))
        for arg, value, ok, expect in checks:
            if value is None or callable(value):
                continue
            values = [value] if isinstance(value, int | float) else list(value)
            if not values or not all(isinstance(v, int | float) and ok(v) for v in values):
                raise ValueError(
                    f"{arg} must be a number {expect}, a non-empty list of them or a function, got {value!r}"
                )
        if prune_epochs is not None and every_n_epochs is not None:
            raise ValueError("give prune_epochs or every_n_epochs, not both")
        if prune_epochs is not None and (
            not list(prune_epochs) or not all(isinstance(e, int) and e >= 0 for e in prune_epochs)
        ):
            raise ValueError(f"prune_epochs must be a non-empty list of epochs >= 0, got {prune_epochs!r}")
        if every_n_epochs is not None and (not isinstance(every_n_epochs, int) or every_n_epochs < 1):
            raise ValueError(f"every_n_epochs must be an integer >= 1, got {every_n_epochs!r}")
        if max_iterations is not None and max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {max_iterations!r}")
        self.quality = quality
        self.sparsity = dict(sparsity) if isinstance(sparsity, Mapping) else sparsity
        self.prune_epochs = sorted(set(prune_epochs)) if prune_epochs is not None else None
        self.every_n_epochs = every_n_epochs
        self.max_iterations = max_iterations
        self.parameter_names = list(parameter_names) if parameter_names is not None else None
        self.monitor = monitor
        self.history_file = history_file
        self.masks: dict[str, torch.Tensor] = {}
        self.iterations: list[dict[str, Any]] = []
        self._params: dict[str, nn.Parameter] = {}
        self._folder: Path | None = None

    # ------------------------------------------------------------------ extension points
    def filter_parameters(self, pl_module: pl.LightningModule) -> dict[str, nn.Parameter]:
        """The parameters to prune: ``parameter_names``, else the trainable Linear/Conv weights of the network that
        :func:`distill.compress.params.network_of` picks (``.student``, else ``.model``, else the module: a frozen
        teacher or FitNets adapters are never pruned)."""
        named = dict(pl_module.named_parameters())
        if self.parameter_names is not None:
            missing = [n for n in self.parameter_names if n not in named]
            if missing:
                raise ConfigError(self._unknown_parameters(pl_module, missing, list(named)))
            return {n: named[n] for n in self.parameter_names}
        net, prefix = network_of(pl_module)
        return {prefix + n: p for n, p in compressible_parameters(net).items() if p.requires_grad}

    @staticmethod
    def _unknown_parameters(pl_module: pl.LightningModule, missing: list[str], names: list[str]) -> str:
        weights = list(compressible_parameters(pl_module)) or names  # the Linear/Conv weights first: what one prunes
        close = {m: c for m in missing if (c := closest_name(m, names)) is not None}
        hint = "".join(f" (did you mean {c!r} for {m!r}?)" for m, c in close.items())
        return (f"MagnitudePruning: parameter_names {missing} are not parameters of {type(pl_module).__name__}{hint}; "
                f"valid: {_listing(weights)} (any name of pl_module.named_parameters(), {len(names)} in all). "
                f"Fix: correct parameter_names in {_FIX}, or leave it unset to prune every Linear/Conv weight")

    def check_sparsity_mapping(self, pl_module: pl.LightningModule) -> None:
        """Check, before any training step, that every key of a ``sparsity`` mapping names a pruned layer and that
        every pruned layer has an entry (or there is a ``"*"`` default).

        Raises:
            ConfigError: naming the unknown keys or the uncovered layers, with the valid layer names.
        """
        if not isinstance(self.sparsity, Mapping):
            return
        names = list(self._params)
        layers = [n.removesuffix(".weight") for n in names]
        module = type(pl_module).__name__
        unknown = [k for k in self.sparsity if k != "*" and not any(_names_layer(n, str(k)) for n in names)]
        if unknown:
            what = ", ".join(repr(k) for k in unknown)
            verb = "is not a layer" if len(unknown) == 1 else "are not layers"
            suffix = layers[0].rsplit(".", 1)[-1] if layers else "fc1"
            raise ConfigError(
                f"MagnitudePruning: sparsity={dict(self.sparsity)!r}: {what} {verb} of {module} that this callback "
                f"prunes; valid: {_listing(layers)} (or a dotted suffix of one, e.g. {suffix!r}; '*' for the layers "
                f"not named). Fix: correct the keys of sparsity in {_FIX}"
            )
        if "*" in self.sparsity:
            return
        uncovered = [n for n in names if not any(_names_layer(n, str(k)) for k in self.sparsity)]
        if uncovered:
            raise ConfigError(
                f"MagnitudePruning: sparsity mapping {sorted(map(str, self.sparsity))} has no entry for "
                f"{_listing([n.removesuffix('.weight') for n in uncovered])} of {module} (nor a '*' default). "
                f"Fix: add an entry for each of them, or a '*' entry for the layers not named, to sparsity in {_FIX}"
            )

    def should_prune(self, epoch: int) -> bool:
        """Whether a pruning iteration starts at ``epoch`` (never twice at one epoch, e.g. after resume)."""
        if any(r["epoch"] == epoch for r in self.iterations):
            return False
        if self.prune_epochs is not None:
            return epoch in self.prune_epochs
        if self.every_n_epochs is not None:
            if self.max_iterations is not None and len(self.iterations) >= self.max_iterations:
                return False
            return epoch % self.every_n_epochs == 0
        return epoch == 0

    def value_for(self, iteration: int, name: str | None = None) -> tuple[float | None, float | None]:
        """``(quality, sparsity)`` of iteration ``iteration`` (one of them None), for parameter ``name``.

        Raises:
            ConfigError: if ``sparsity`` is a mapping that covers neither ``name`` nor ``"*"``.
        """

        def pick(s: Schedule | None) -> float | None:
            if s is None:
                return None
            if callable(s):
                return float(s(iteration))
            if isinstance(s, int | float):
                return float(s)
            seq = list(s)
            return float(seq[min(iteration, len(seq) - 1)])

        sparsity = self.sparsity
        if isinstance(sparsity, Mapping):
            key = next((k for k in sparsity if k != "*" and _names_layer(name or "", k)), None)
            key = key if key is not None else ("*" if "*" in sparsity else None)
            if key is None:
                raise ConfigError(f"MagnitudePruning: sparsity mapping {sorted(sparsity)} has no entry for {name!r} "
                                  f"(nor a '*' default). Fix: add one, or a '*' entry, to sparsity in {_FIX}")
            sparsity = sparsity[key]
        return pick(self.quality), pick(sparsity)

    # ------------------------------------------------------------------ mask handling
    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned weights (idempotent)."""
        for name, mask in self.masks.items():
            p = self._params.get(name)
            if p is not None:
                p.mul_(mask.to(p.device, p.dtype))

    def _mask_optimizer_state(self, trainer: pl.Trainer) -> None:
        mask_optimizer_state(trainer.optimizers, self._params, self.masks)

    def sparsity_by_layer(self) -> dict[str, float]:
        """Fraction of exact zeros of each pruned weight, keyed by layer (the name without ``.weight``)."""
        return {n.removesuffix(".weight"): float((p == 0).double().mean()) for n, p in self._params.items()}

    def zero_rate(self) -> float:
        """Fraction of exact zeros over all pruned weights."""
        total = sum(p.numel() for p in self._params.values())
        return sum(int((p == 0).sum()) for p in self._params.values()) / max(total, 1)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._params = self.filter_parameters(pl_module)
        if not self._params:
            raise ConfigError(f"MagnitudePruning found no parameter to prune in {type(pl_module).__name__} (default: "
                              "the trainable weights of its Linear/Conv layers). Fix: give parameter_names in "
                              f"{_FIX}, or override filter_parameters")
        self.check_sparsity_mapping(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._folder = run_folder(trainer)
        unknown = [n for n in self.masks if n not in self._params]
        if unknown:
            raise ValueError(f"restored pruning masks {unknown} match no parameter of {type(pl_module).__name__}")
        self.masks = {n: m.to(self._params[n].device) for n, m in self.masks.items()}
        self.apply_masks()  # a resumed run continues with its masks

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mask_optimizer_state(trainer)  # restored optimizer state exists only now

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.should_prune(trainer.current_epoch):
            self.prune(trainer)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        for name, mask in self.masks.items():
            p = self._params[name]
            if p.grad is not None:
                p.grad.mul_(mask.to(p.grad.dtype))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.apply_masks()  # momentum or weight decay may have moved a pruned weight

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.iterations:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None:
            self.iterations[-1]["val_acc"] = float(value)
            self._write_history(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer)

    # ------------------------------------------------------------------ pruning
    def prune(self, trainer: pl.Trainer) -> dict[str, Any]:
        """Run one pruning iteration now; returns its history record."""
        iteration = len(self.iterations)
        quality, sparsity = self.value_for(iteration, next(iter(self._params), None))
        masks: dict[str, torch.Tensor] = {}
        thresholds: dict[str, float] = {}
        targets: dict[str, float | None] = {}
        for name, p in self._params.items():
            quality, sparsity = self.value_for(iteration, name)
            targets[name.removesuffix(".weight")] = sparsity
            masks[name], thresholds[name] = prune_mask(
                p, quality=quality, sparsity=sparsity, previous=self.masks.get(name)
            )
        masks = trainer.strategy.broadcast(masks, src=0)  # identical masks on every rank
        self.masks = {n: m.to(self._params[n].device) for n, m in masks.items()}
        self.apply_masks()
        self._mask_optimizer_state(trainer)
        record = {
            "iteration": iteration,
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "quality": quality,
            "sparsity_target": targets if isinstance(self.sparsity, Mapping) else sparsity,
            "threshold": {n.removesuffix(".weight"): t for n, t in thresholds.items()},
            "sparsity": self.sparsity_by_layer(),
            "zero_rate": self.zero_rate(),
            "val_acc": None,
        }
        self.iterations.append(record)
        self._log(trainer)
        self._write_history(trainer)
        return record

    def _log(self, trainer: pl.Trainer) -> None:
        if trainer.logger is None or not self._params:
            return
        metrics = {f"prune/sparsity/{k}": v for k, v in self.sparsity_by_layer().items()}
        metrics["prune/zero_rate"] = self.zero_rate()
        trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def _write_history(self, trainer: pl.Trainer) -> None:
        if self.history_file is None or not trainer.is_global_zero:
            return
        folder = self._folder or run_folder(trainer)
        write_json(folder / self.history_file, {"iterations": self.iterations})

    def output_paths(self) -> dict[str, str]:
        """Files this callback wrote (for the CLI's summary)."""
        if self.history_file is None or self._folder is None or not self.iterations:
            return {}
        return {"pruning history": str(self._folder / self.history_file)}

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"masks": {n: m.detach().cpu() for n, m in self.masks.items()}, "iterations": self.iterations}

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.masks = {str(n): m.bool() for n, m in state_dict.get("masks", {}).items()}
        self.iterations = [dict(r) for r in state_dict.get("iterations", [])]
