"""The time-limited progress bar, alone and as ``distill fit``'s default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar

from distill.callbacks import progress
from distill.callbacks.progress import ProgressBar
from distill.modules import Classifier
from tests.conftest import REPO, ParseOnlyCLI, random_loader


def test_redraws_by_batch_count_and_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    bar = ProgressBar(refresh_rate=2, min_interval=0.5)
    assert bar._should_update(2, 10)  # the first due batch draws
    assert not bar._should_update(3, 10)  # not a multiple of refresh_rate
    clock[0] += 0.4
    assert not bar._should_update(4, 10)  # too soon
    assert bar._should_update(10, 10)  # the last batch always draws
    clock[0] += 0.1
    assert not bar._should_update(2, 10)
    clock[0] += 0.5
    assert bar._should_update(6, 10)
    assert not ProgressBar(refresh_rate=0)._should_update(10, 10)  # disabled


def test_bad_interval() -> None:
    with pytest.raises(ValueError, match="min_interval must be a number of seconds >= 0"):
        ProgressBar(min_interval=-1)


def test_bar_ends_on_the_true_count(trainer_kwargs: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = Classifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)))
    kwargs = {**trainer_kwargs, "enable_progress_bar": True, "callbacks": [ProgressBar(min_interval=60.0)]}
    pl.Trainer(**kwargs).fit(model, random_loader(n=112, batch=16))
    out = capsys.readouterr().out  # Lightning's bars write to stdout
    assert "7/7" in out and "3/7" not in out  # 7 batches: within the minute only the last was drawn


def _trainer_callbacks(tmp_path: Path, *args: str) -> list[pl.Callback]:
    class BuildTrainerCLI(ParseOnlyCLI):
        def instantiate_classes(self) -> None:
            self.config_init = self.parser.instantiate_classes(self.config)
            self.trainer = self.instantiate_trainer()

    config = REPO / "configs" / "quickstart" / "teacher.yaml"
    cli = BuildTrainerCLI(args=["-c", str(config), "--trainer.default_root_dir", str(tmp_path), *args], run=False)
    return list(cli.trainer.callbacks)


def test_distill_fit_default_bar_is_time_limited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    bars = [cb for cb in _trainer_callbacks(tmp_path) if isinstance(cb, TQDMProgressBar)]
    assert len(bars) == 1 and type(bars[0]) is ProgressBar
    off = _trainer_callbacks(tmp_path, "--trainer.enable_progress_bar", "false")
    assert not any(isinstance(cb, TQDMProgressBar) for cb in off)
    mine = _trainer_callbacks(
        tmp_path, "--trainer.callbacks+=pytorch_lightning.callbacks.TQDMProgressBar",
        "--trainer.callbacks.refresh_rate", "5",
    )  # fmt: skip
    bars = [cb for cb in mine if isinstance(cb, TQDMProgressBar)]
    assert len(bars) == 1 and type(bars[0]) is TQDMProgressBar and bars[0].refresh_rate == 5  # the user's, kept
