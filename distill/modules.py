"""LightningModules: a classifier trained on labels (the teacher), and the distillation modules.

Every module takes its network as a constructor argument (``model: nn.Module``), so a YAML config sets it with
``class_path``/``init_args``, and its optimizer and scheduler as LightningCLI callables.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from distill.arch import arch_spec, build_module

__all__ = [
    "Classifier",
    "Distiller",
    "as_module",
    "configure_optimizers",
    "save_arch_hparams",
    "save_hparams",
    "should_log_step",
]


def as_module(model: nn.Module | Mapping[str, Any], argument: str = "model") -> nn.Module:
    """Accept a module or its ``{"class_path", "init_args"}`` description (as stored in checkpoints)."""
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, Mapping):
        return build_module(model)
    raise TypeError(f"{argument} must be an nn.Module or a class_path/init_args mapping, got {type(model).__name__}")


def configure_optimizers(
    module: pl.LightningModule,
    params: Any,
    optimizer: OptimizerCallable,
    lr_scheduler: LRSchedulerCallable | None,
    monitor: str = "val/loss",
) -> Any:
    """Build the injected optimizer (and scheduler) over ``params``, in Lightning's return format."""
    opt = optimizer(params)
    if lr_scheduler is None:
        return opt
    sched = lr_scheduler(opt)
    config: dict[str, Any] = {"scheduler": sched, "interval": "epoch"}
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        config["monitor"] = monitor
    return {"optimizer": opt, "lr_scheduler": config}


def should_log_step(module: pl.LightningModule) -> bool:
    """Whether this training step's scalars would reach the logger (every ``log_every_n_steps``).

    ``self.log`` costs about as much as a LeNet-300-100 step on a CPU, so per-step scalars are only logged on the
    steps where Lightning writes them anyway.
    """
    trainer = module._trainer
    if trainer is None:
        return True
    connector = getattr(trainer, "_logger_connector", None)  # Lightning's own rule, so the two never disagree
    return bool(connector is None or connector.should_update_logs or getattr(trainer, "fast_dev_run", False))


def save_hparams(module: pl.LightningModule, ignore: list[str]) -> None:
    """``save_hyperparameters`` of the caller's arguments, without Lightning's warning about module arguments.

    Modules are not pickled: :func:`save_arch_hparams` replaces them by their class_path/init_args.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
        module.save_hyperparameters(ignore=ignore, frame=inspect.currentframe().f_back)  # type: ignore[union-attr]


def save_arch_hparams(module: pl.LightningModule, **networks: nn.Module) -> None:
    """Store networks in ``hparams`` as class_path/init_args, never as pickled modules.

    Under LightningCLI ``hparams`` already holds the YAML's description; otherwise it holds the module object,
    which is replaced by :func:`distill.arch.arch_spec`.
    """
    for name, net in networks.items():
        if not isinstance(module.hparams.get(name), Mapping):
            module.hparams[name] = arch_spec(net)


class Classifier(pl.LightningModule):
    """Train any network on labels with cross-entropy (the teacher, or a student's label-only baseline).

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``.

    Args:
        model: the network (or its class_path/init_args description).
        optimizer: optimizer factory, e.g. ``torch.optim.Adam`` with init args from YAML.
        lr_scheduler: optional scheduler factory.
        num_classes: number of classes for the accuracy metrics.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        save_hparams(self, ignore=["optimizer", "lr_scheduler"])
        self.model = as_module(model)
        save_arch_hparams(self, model=self.model)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        # validate_args=False: the per-call input checks cost more than the update itself on small networks
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.test_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc.update(logits.detach(), y)  # update() only: forward() would also compute a per-batch value
        if should_log_step(self):
            self.log("train/loss", loss, prog_bar=True, on_epoch=False)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self.model(x)
        self.log(f"{split}/loss", F.cross_entropy(logits, y), prog_bar=split == "val")
        metric(logits, y)
        self.log(f"{split}/acc", metric, prog_bar=split == "val")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(batch[0]).argmax(-1)

    def configure_optimizers(self) -> Any:
        return configure_optimizers(self, self.model.parameters(), self.optimizer, self.lr_scheduler)


from distill.distillation import Distiller  # noqa: E402
