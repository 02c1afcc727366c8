"""distill's ModelCheckpoint: Lightning's files and state, with less per-step work."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint as LightningModelCheckpoint

from distill.callbacks import ModelCheckpoint
from distill.modules import Classifier
from tests.conftest import random_loader


def test_state_key_is_lightnings_and_follows_changes() -> None:
    ours = ModelCheckpoint(monitor="val/acc", mode="max")
    theirs = LightningModelCheckpoint(monitor="val/acc", mode="max")
    assert ours.state_key == theirs.state_key
    ours.monitor = theirs.monitor = "val/loss"  # a changed argument changes the cached key too
    assert ours.state_key == theirs.state_key
    assert "val/loss" in ours.state_key


def _fit(cls: type, tmp_path: Path, trainer_kwargs: dict[str, Any], **ckpt_args: Any) -> tuple[list[str], dict]:
    torch.manual_seed(0)
    ckpt = cls(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}-{step}", **ckpt_args)
    model = Classifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)))
    trainer = pl.Trainer(**{**trainer_kwargs, "max_epochs": 2, "enable_checkpointing": True, "callbacks": [ckpt]})
    trainer.fit(model, random_loader(n=64, batch=16), random_loader(n=32, batch=16))
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    blob = torch.load(tmp_path / "ckpt" / files[-1], weights_only=False)
    return files, blob["callbacks"]


@pytest.mark.parametrize(
    "ckpt_args",
    [{}, {"every_n_train_steps": 3}, {"train_time_interval": timedelta(0)}, {"monitor": "val/acc", "mode": "max"}],
    ids=["per-epoch", "every-3-steps", "time-interval", "monitored"],
)
def test_saves_what_lightnings_saves(tmp_path: Path, trainer_kwargs: dict[str, Any], ckpt_args: dict) -> None:
    ours, our_state = _fit(ModelCheckpoint, tmp_path / "ours", trainer_kwargs, **ckpt_args)
    theirs, their_state = _fit(LightningModelCheckpoint, tmp_path / "theirs", trainer_kwargs, **ckpt_args)
    assert ours == theirs and ours  # the same checkpoints at the same steps
    assert list(our_state) == list(their_state)  # callback state under Lightning's key: resumable with either class
