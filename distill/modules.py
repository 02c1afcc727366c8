"""LightningModules: a classifier trained on labels (the teacher), and the distillation modules.

Every module takes its network as a constructor argument (``model: nn.Module``), so a YAML config sets it with
``class_path``/``init_args``, and its optimizer and scheduler as LightningCLI callables.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from distill.module_utils import (
    FastSetattrMixin,
    ResumableRNGMixin,
    as_module,
    configure_optimizers,
    raise_batch_error,
    save_arch_hparams,
    save_hparams,
    should_log_step,
)

__all__ = ["Classifier", "Distiller"]  # the shared helpers are public in distill.module_utils


class Classifier(ResumableRNGMixin, FastSetattrMixin, pl.LightningModule):
    """Train any network on labels with cross-entropy (the teacher, or a student's label-only baseline).

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``.

    Args:
        model: the network (or its class_path/init_args description).
        optimizer: optimizer factory, e.g. ``torch.optim.Adam`` with init args from YAML.
        lr_scheduler: optional scheduler factory.
        num_classes: number of classes for the accuracy metrics.
    """

    train_correct: torch.Tensor
    train_seen: torch.Tensor

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
        # training accuracy as two counters: torchmetrics' update costs ~0.1 ms a step, ~9x an argmax-compare-sum
        self.register_buffer("train_correct", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("train_seen", torch.zeros((), dtype=torch.long), persistent=False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.test_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        try:
            return self._training_step(batch)
        except Exception as err:  # a network built for other data: say so (nothing to pay when the step works)
            raise_batch_error(err, [("model", self.model)], batch)

    def _training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        # in place: `+=` on a buffer re-assigns it through nn.Module.__setattr__ each step
        self.train_correct.add_((logits.detach().argmax(-1) == y).sum())
        self.train_seen.add_(y.numel())
        if should_log_step(self):
            self.log("train/loss", loss, prog_bar=True, on_epoch=False)
        return loss

    def on_train_epoch_start(self) -> None:
        self.train_correct.zero_()
        self.train_seen.zero_()

    def on_train_epoch_end(self) -> None:
        # Logged once per epoch, not per step: each self.log of a Metric object walks Lightning's result collection
        # (~1 ms a step on a CPU, a quarter of a LeNet-300-100 step). The counts are summed over DDP ranks.
        counts = self.trainer.strategy.reduce(torch.stack([self.train_correct, self.train_seen]), reduce_op="sum")
        if int(counts[1]) > 0:
            self.log("train/acc", counts[0].float() / counts[1].float())

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        try:
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
        except Exception as err:
            raise_batch_error(err, [("model", self.model)], batch)
        self.log(f"{split}/loss", loss, prog_bar=split == "val")
        metric(logits, y)
        self.log(f"{split}/acc", metric, prog_bar=split == "val")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        try:
            return self.model(batch[0]).argmax(-1)
        except Exception as err:
            raise_batch_error(err, [("model", self.model)], batch)

    def configure_optimizers(self) -> Any:
        return configure_optimizers(self, self.model.parameters(), self.optimizer, self.lr_scheduler)


from distill.distillation import Distiller  # noqa: E402
