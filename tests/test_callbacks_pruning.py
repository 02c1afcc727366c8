"""MagnitudePruning in a plain LightningModule: masks hold against momentum, weight decay, resume and DDP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from distill.callbacks import MagnitudePruning
from tests.conftest import random_loader


class Plain(pl.LightningModule):
    """Knows nothing about pruning."""

    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        self.optimizer = optimizer

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self.net(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.5)


class ZeroWatcher(pl.Callback):
    """Records, after every optimizer step, whether the weights zeroed at ``watch_epoch`` are still exactly zero."""

    def __init__(self, watch_epoch: int, zero_by_hand: bool = False) -> None:
        self.watch_epoch, self.zero_by_hand = watch_epoch, zero_by_hand
        self.zeros: dict[str, torch.Tensor] = {}
        self.violations: list[int] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != self.watch_epoch:
            return
        for name in ("net.1.weight", "net.3.weight"):
            p = pl_module.get_parameter(name)
            if self.zero_by_hand:  # the naive way: zero once, let the optimizer run
                with torch.no_grad():
                    p[p.abs() < p.abs().median()] = 0
            self.zeros[name] = (p == 0).clone()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        for name, z in self.zeros.items():
            self.violations.append(int((pl_module.get_parameter(name)[z] != 0).sum()))


def loaders() -> tuple[Any, Any]:
    return random_loader(64, (16,), 4, 16), random_loader(32, (16,), 4, 16)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_pruned_weights_stay_exactly_zero(optimizer: str, trainer_kwargs: dict[str, Any]) -> None:
    # Control: zeroing once is undone by momentum / weight decay state built in epoch 0.
    control = ZeroWatcher(watch_epoch=1, zero_by_hand=True)
    pl.Trainer(**{**trainer_kwargs, "max_epochs": 2}, callbacks=[control]).fit(Plain(optimizer), *loaders())
    assert sum(control.violations) > 0
    # With the callback (pruning at epoch 1, after the optimizer state exists), the zeros hold after every step,
    # even checked before the callback re-applies its mask (the watcher runs first).
    pruning = MagnitudePruning(sparsity=0.5, prune_epochs=[1])
    watcher = ZeroWatcher(watch_epoch=1)
    model = Plain(optimizer)
    pl.Trainer(**{**trainer_kwargs, "max_epochs": 3}, callbacks=[pruning, watcher]).fit(model, *loaders())
    assert watcher.violations and sum(watcher.violations) == 0
    for name, mask in pruning.masks.items():
        w = model.get_parameter(name)
        assert torch.equal(w == 0, ~mask | (w == 0)) and not w[~mask].any()
        assert (~mask).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_schedule_history_and_logging(trainer_kwargs: dict[str, Any], tmp_path: Path) -> None:
    pruning = MagnitudePruning(quality=[0.5, 1.0, 1.5], every_n_epochs=2, max_iterations=3)
    trainer = pl.Trainer(**{**trainer_kwargs, "max_epochs": 6})
    trainer.callbacks.append(pruning)
    trainer.fit(Plain(), *loaders())
    history = json.loads((tmp_path / "pruning_history.json").read_text())["iterations"]
    assert [r["epoch"] for r in history] == [0, 2, 4]
    assert [r["quality"] for r in history] == [0.5, 1.0, 1.5]
    rates = [r["zero_rate"] for r in history]
    assert rates == sorted(rates) and rates[-1] > 0.5  # quality 1.5 keeps ~13% of a Gaussian-ish layer
    assert set(history[0]["sparsity"]) == {"net.1", "net.3"} and set(history[0]["threshold"]) == {"net.1", "net.3"}
    assert all(isinstance(r["val_acc"], float) for r in history)
    assert pruning.output_paths() == {"pruning history": str(tmp_path / "pruning_history.json")}


def test_logs_sparsity_to_the_logger(trainer_kwargs: dict[str, Any], tmp_path: Path) -> None:
    from pytorch_lightning.loggers import CSVLogger

    logger = CSVLogger(str(tmp_path), name="log")
    trainer = pl.Trainer(
        **{**trainer_kwargs, "logger": logger, "max_epochs": 1}, callbacks=[MagnitudePruning(quality=1.0)]
    )
    trainer.fit(Plain(), *loaders())
    text = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "prune/sparsity/net.1" in text and "prune/zero_rate" in text
    assert (Path(logger.log_dir) / "pruning_history.json").is_file()  # the run folder is trainer.log_dir


def test_masks_survive_resume(trainer_kwargs: dict[str, Any], tmp_path: Path) -> None:
    first = MagnitudePruning(sparsity=0.6, prune_epochs=[0])
    model = Plain("adamw")
    trainer = pl.Trainer(**{**trainer_kwargs, "max_epochs": 1}, callbacks=[first])
    trainer.fit(model, *loaders())
    ckpt = tmp_path / "resume.ckpt"
    trainer.save_checkpoint(ckpt)
    masks = {n: m.clone() for n, m in first.masks.items()}
    # A fresh callback and a freshly initialised (dense) model: everything must come from the checkpoint.
    second = MagnitudePruning(sparsity=0.6, prune_epochs=[0])
    resumed = Plain("adamw")
    watcher = ZeroWatcher(watch_epoch=1)
    trainer2 = pl.Trainer(**{**trainer_kwargs, "max_epochs": 3}, callbacks=[second, watcher])
    trainer2.fit(resumed, *loaders(), ckpt_path=str(ckpt))
    assert len(second.iterations) == 1  # epoch 0 is not pruned again
    for name, mask in masks.items():
        assert torch.equal(second.masks[name].cpu(), mask)
        assert not resumed.get_parameter(name)[~mask].any()
    assert watcher.violations and sum(watcher.violations) == 0


def test_filter_parameters_prefers_the_student() -> None:
    class WithTeacher(Plain):
        def __init__(self) -> None:
            super().__init__()
            self.student = nn.Linear(4, 4)
            self.teacher = nn.Linear(4, 4)

    params = MagnitudePruning(quality=1.0).filter_parameters(WithTeacher())
    assert list(params) == ["student.weight"]
    with pytest.raises(ValueError, match=r"parameter_names \['nope'\] are not parameters"):
        MagnitudePruning(quality=1.0, parameter_names=["nope"]).filter_parameters(Plain())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of quality or sparsity"),
        ({"quality": 1.0, "sparsity": 0.5}, "exactly one of quality or sparsity"),
        ({"quality": -1.0}, "quality must be a number >= 0"),
        ({"sparsity": [0.5, 1.5]}, r"sparsity must be a number in \[0, 1\]"),
        ({"quality": 1.0, "prune_epochs": [0], "every_n_epochs": 2}, "not both"),
        ({"quality": 1.0, "prune_epochs": [-1]}, "prune_epochs must be a non-empty list"),
        ({"quality": 1.0, "every_n_epochs": 0}, "every_n_epochs must be an integer >= 1"),
    ],
)
def test_misconfiguration_is_rejected(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MagnitudePruning(**kwargs)


def rank_dependent_quality(iteration: int) -> float:
    """A quality that differs between ranks: without the broadcast, ranks would disagree on the masks."""
    return 0.3 + 0.5 * (torch.distributed.get_rank() if torch.distributed.is_initialized() else 0)


class SaveMasks(pl.Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pruning = next(c for c in trainer.callbacks if isinstance(c, MagnitudePruning))
        torch.save({n: m.cpu() for n, m in pruning.masks.items()}, f"{self.folder}/masks{trainer.global_rank}.pt")


@pytest.mark.slow
def test_identical_masks_under_ddp(trainer_kwargs: dict[str, Any], tmp_path: Path) -> None:
    pruning = MagnitudePruning(quality=rank_dependent_quality, prune_epochs=[0])
    trainer = pl.Trainer(
        **{**trainer_kwargs, "devices": 2, "strategy": "ddp_spawn", "max_epochs": 1},
        callbacks=[pruning, SaveMasks(str(tmp_path))],
    )
    trainer.fit(Plain(), *loaders())
    m0 = torch.load(tmp_path / "masks0.pt", weights_only=True)
    m1 = torch.load(tmp_path / "masks1.pt", weights_only=True)
    assert m0.keys() == m1.keys() and all(torch.equal(m0[k], m1[k]) for k in m0)


def test_per_layer_sparsity_mapping(trainer_kwargs: dict[str, Any], tmp_path: Path) -> None:
    pruning = MagnitudePruning(sparsity={"net.1": [0.5, 0.9], "*": [0.25, 0.5]}, prune_epochs=[0, 1])
    trainer = pl.Trainer(**{**trainer_kwargs, "max_epochs": 2}, callbacks=[pruning])
    trainer.fit(Plain(), *loaders())
    history = json.loads((tmp_path / "pruning_history.json").read_text())["iterations"]
    assert [r["sparsity_target"] for r in history] == [{"net.1": 0.5, "net.3": 0.25}, {"net.1": 0.9, "net.3": 0.5}]
    assert history[-1]["sparsity"] == pytest.approx({"net.1": 0.9, "net.3": 0.5}, abs=1 / 128)
    with pytest.raises(ValueError, match=r"no entry for 'net.3.weight'"):
        MagnitudePruning(sparsity={"1": 0.5}).value_for(0, "net.3.weight")
    with pytest.raises(ValueError, match=r"sparsity\['net.1'\] must be a number in \[0, 1\]"):
        MagnitudePruning(sparsity={"net.1": 1.5})
