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


class _Raise(pl.Callback):
    def __init__(self, at: int, error: type[BaseException]) -> None:
        self.at, self.error = at, error

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            raise self.error("stop")


@pytest.mark.parametrize(("error", "save", "expect_step"), [
    (KeyboardInterrupt, True, 5),  # Ctrl-C mid-epoch: the steps done are kept
    (KeyboardInterrupt, False, None),  # off: Lightning's behaviour
    (FloatingPointError, True, None),  # an error: the broken state is not written over the last good checkpoint
])  # fmt: skip
def test_save_on_interrupt(tmp_path: Path, trainer_kwargs: dict[str, Any], error: type[BaseException], save: bool,
                           expect_step: int | None) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", monitor=None, save_on_interrupt=save,
                           enable_version_counter=False)
    model = Classifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)))
    kwargs = {**trainer_kwargs, "max_epochs": 2, "enable_checkpointing": True, "callbacks": [ckpt, _Raise(5, error)]}
    with pytest.raises((SystemExit, FloatingPointError)):  # Lightning exits after a KeyboardInterrupt
        pl.Trainer(**kwargs).fit(model, random_loader(n=128, batch=16))  # 8 batches an epoch: step 5 is mid-epoch
    files = list((tmp_path / "ckpt").glob("*.ckpt")) if (tmp_path / "ckpt").exists() else []
    if expect_step is None:
        assert not files
    else:
        assert [f.name for f in files] == ["last.ckpt"]
        blob = torch.load(files[0], weights_only=False)
        assert blob["global_step"] == expect_step and blob["epoch"] == 0


def test_distill_fit_keeps_steps_on_ctrl_c_in_last_ckpt_only() -> None:
    from tests.conftest import REPO, ParseOnlyCLI

    cli = ParseOnlyCLI(args=["-c", str(REPO / "configs" / "quickstart" / "teacher.yaml")], run=False)
    assert cli.config["last_checkpoint"]["save_on_interrupt"] is True
    assert cli.config["checkpoint"]["save_on_interrupt"] is False  # the monitored "best" one


def test_atomic_checkpoint_io_keeps_the_old_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save stopped half-way (Ctrl-C, a full disk) leaves the previous checkpoint as it was and no temporary file;
    a finished one replaces it. ``distill fit`` installs it in place of Lightning's default."""
    from distill.callbacks.checkpoint import AtomicCheckpointIO
    from distill.cli import DistillCLI
    from tests.conftest import REPO

    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1

    def half_then_stop(obj: Any, f: Any) -> None:
        Path(f).write_bytes(b"PK\x03\x04" + bytes(100))  # the start of a zip, then the interrupt
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", half_then_stop)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    io.save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 3
    monkeypatch.chdir(tmp_path)
    cli = DistillCLI(args=["-c", str(REPO / "configs" / "quickstart" / "teacher.yaml")], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO


def test_resuming_a_finished_fit_does_the_end_of_training_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint of a training that had reached its end (Ctrl-C while PruneQuantize compressed, say) resumes into
    a fit whose training loop Lightning skips, and with it on_train_end: the quantization and the compressed file are
    then made at fit end, the same file as the first run's."""
    from distill.cli import main
    from tests.conftest import REPO

    monkeypatch.chdir(tmp_path)
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
             "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4"]
    main(["fit", "-c", str(REPO / "configs" / "quickstart" / "teacher.yaml"), *quiet])
    student = ["fit", "-c", str(REPO / "configs" / "quickstart" / "student.yaml"), *quiet]
    main(student)
    runs = tmp_path / "runs" / "quickstart_student"
    main([*student, "--ckpt_path", str(runs / "checkpoints" / "last.ckpt")])
    first, resumed = runs / "version_0", runs / "version_1"
    for name in ("model.dstl", "accuracy.json", "gmm_history.json"):
        assert (resumed / name).is_file(), name
    assert (resumed / "model.dstl").read_bytes() == (first / "model.dstl").read_bytes()
