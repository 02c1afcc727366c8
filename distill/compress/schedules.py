"""Learning-rate schedules for prune-then-retrain recipes."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["CyclicMultiStepLR"]


class CyclicMultiStepLR(LRScheduler):
    """A step schedule that restarts every ``period`` epochs (one prune-then-retrain iteration per period).

    Within each period, the learning rate is ``lrs[i]`` where ``i`` is the number of ``milestones`` already reached:
    ``milestones=[3, 10, 16], lrs=[a, b, c, d]`` gives ``a`` for epochs 0-2 of each period, ``b`` for 3-9, ``c`` for
    10-15 and ``d`` from 16 on. Step it once per epoch (``interval: epoch``).

    Args:
        optimizer: the optimizer (its own ``lr`` is overridden).
        period: epochs per iteration, e.g. 20 (align with ``MagnitudePruning(every_n_epochs=period)``).
        milestones: increasing epochs within a period, each ``< period``.
        lrs: ``len(milestones) + 1`` learning rates.
        last_epoch: as in PyTorch schedulers.

    Raises:
        ValueError: on inconsistent arguments.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        period: int,
        milestones: Sequence[int],
        lrs: Sequence[float],
        last_epoch: int = -1,
    ) -> None:
        if period < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        ms = list(milestones)
        if ms != sorted(set(ms)) or any(m <= 0 or m >= period for m in ms):
            raise ValueError(f"milestones must be increasing epochs in 1..{period - 1}, got {ms}")
        if len(lrs) != len(ms) + 1 or any(lr <= 0 for lr in lrs):
            raise ValueError(f"lrs must hold len(milestones) + 1 = {len(ms) + 1} positive rates, got {list(lrs)}")
        self.period, self.milestones, self.lrs = period, ms, [float(lr) for lr in lrs]
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        lr = self.lrs[bisect.bisect_right(self.milestones, self.last_epoch % self.period)]
        return [lr for _ in self.optimizer.param_groups]
