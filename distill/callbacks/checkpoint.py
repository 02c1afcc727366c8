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

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from pytorch_lightning.utilities.types import STEP_OUTPUT
from typing_extensions import override

__all__ = ["ModelCheckpoint"]


class ModelCheckpoint(_LightningModelCheckpoint):
    """:class:`pytorch_lightning.callbacks.ModelCheckpoint` with the same arguments and behaviour, cheaper per step.

    ``distill fit`` uses it for ``checkpoint.*`` and ``last_checkpoint.*``; it is a drop-in for Lightning's class in
    any Trainer.
    """

    _key_cache: tuple[tuple[Any, ...], str] | None = None

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
