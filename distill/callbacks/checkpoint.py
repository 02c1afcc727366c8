"""Lightning's ``ModelCheckpoint`` without its two per-step costs; the files it writes and its state are the same.

Lightning calls every callback's hooks about six times a training step and, for each call, formats the callback's
``state_key`` into a profiler label, even when no profiler records it. ``ModelCheckpoint.state_key`` builds the
``repr`` of a five-entry dict each time (~1.6 us; 12 calls a step with ``distill fit``'s two checkpoints), and its
``on_train_batch_end`` reads the trainer's state and the clock on every batch even when it saves by epoch only. On a
CPU, where a LeNet-300-100 step takes ~2.5 ms, the two cost ~2% of ``distill fit``'s throughput (measured in
``benchmarks/bench_train.py``). This subclass caches the key (recomputed whenever an argument it is made from
changes) and returns at once from ``on_train_batch_end`` when neither ``every_n_train_steps`` nor
``train_time_interval`` is set, which is exactly when Lightning's version returns without saving.

The class keeps the name ``ModelCheckpoint``, so its ``state_key`` is Lightning's: checkpoints written with either
class resume with the other.
"""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from pytorch_lightning.utilities.types import STEP_OUTPUT
from typing_extensions import override

from distill.io import atomic_path

__all__ = ["AtomicCheckpointIO", "ModelCheckpoint", "training_skipped_on_resume"]


def training_skipped_on_resume(trainer: pl.Trainer) -> bool:
    """Whether this fit resumed from a checkpoint of a training that had already reached its end (e.g. one written
    by Ctrl-C while the end-of-training work, compression or quantization, ran): Lightning then skips the training
    loop, and with it ``on_train_end``, so that work is to be done in ``on_fit_end`` instead."""
    return bool(trainer.state.fn == "fit" and trainer.ckpt_path is not None and trainer.fit_loop.done)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's :class:`TorchCheckpointIO` writing local checkpoints atomically, in their own folder.

    Lightning's save goes through an fsspec transaction, which writes the file in the system's temporary folder and
    then moves it into place: when that folder is on another file system (``$TMPDIR`` on a tmpfs, a scratch disk) the
    move is a copy, and a run stopped during it leaves ``last.ckpt`` cut short, the previous one already gone
    (measured: 400,788 of 801,577 bytes, unreadable). Here the checkpoint is written to a hidden temporary file next to
    its target, flushed to disk and renamed over it (:func:`distill.io.atomic_path`): the old file stays whole until
    the new one is. Remote paths (``s3://``, ...) go to Lightning's own save. ``distill fit`` installs it in place of
    Lightning's default; a checkpoint IO plugin the config names is kept.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        protocol = get_filesystem(path).protocol
        if storage_options is not None or "file" not in (protocol if isinstance(protocol, tuple) else (protocol,)):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_path(os.fspath(path)) as tmp:
            torch.save(checkpoint, tmp)


class ModelCheckpoint(_LightningModelCheckpoint):
    """:class:`pytorch_lightning.callbacks.ModelCheckpoint` with the same arguments and behaviour, cheaper per step,
    and one more: ``save_on_interrupt``.

    ``distill fit`` uses it for ``checkpoint.*`` and ``last_checkpoint.*`` (the latter with ``save_on_interrupt``, so
    that Ctrl-C in the middle of a long epoch keeps the steps done: ``--ckpt_path last`` resumes from there); it is a
    drop-in for Lightning's class in any Trainer.

    Args:
        save_on_interrupt: an unmonitored checkpoint (``monitor=None``) is also written when training is interrupted
            with Ctrl-C (``KeyboardInterrupt``). Unlike Lightning's ``save_on_exception``, other exceptions write
            nothing: a run stopped by an error (e.g. a non-finite loss) keeps its last good checkpoint instead of
            overwriting it with the broken state.
        *args, **kwargs: Lightning's ``ModelCheckpoint`` arguments.
    """

    _key_cache: tuple[tuple[Any, ...], str] | None = None

    def __init__(self, *args: Any, save_on_interrupt: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.save_on_interrupt = bool(save_on_interrupt)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if (
            self.save_on_interrupt
            and isinstance(exception, KeyboardInterrupt)
            and self.monitor is None  # a monitored "best" checkpoint would rank the interrupted state on old metrics
            and trainer.state.fn == "fit"
            and not getattr(trainer, "fast_dev_run", False)
            and not trainer.sanity_checking
            and self._last_global_step_saved != trainer.global_step
        ):
            self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_exception(trainer, pl_module, exception)

    @property
    @override
    def state_key(self) -> str:
        args = (self.monitor, self.mode, self._every_n_train_steps, self._every_n_epochs, self._train_time_interval)
        cache = self._key_cache
        if cache is None or cache[0] != args:
            cache = (args, super().state_key)
            self._key_cache = cache
        return cache[1]

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: STEP_OUTPUT, batch: Any, batch_idx: int
    ) -> None:
        if self._every_n_train_steps < 1 and self._train_time_interval is None:
            return  # saves at epoch or validation end only: Lightning's version returns here too, after more work
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
