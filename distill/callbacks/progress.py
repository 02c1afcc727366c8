"""A tqdm progress bar that redraws at most every ``min_interval`` seconds instead of after every batch.

Lightning's :class:`~pytorch_lightning.callbacks.TQDMProgressBar` redraws the bar (and formats the metrics beside it)
after every ``refresh_rate``-th batch, by default every batch, bypassing tqdm's own time throttle. For a small network
on a CPU that is a measurable share of the step: 8-12% of ``distill fit``'s LeNet-300-100 throughput (2 threads, the
bar drawn into memory or /dev/null: the cost is tqdm's formatting, before any terminal; ``benchmarks/bench_train.py``).
A batch count does not fit every run -- 20 is right for a 3 ms step and wrong for a 1 s one -- so this bar keeps
Lightning's ``refresh_rate`` and adds a time limit: a batch redraws the bar only if ``min_interval`` seconds have
passed since the last redraw (tqdm's own default, 0.1 s). The last batch of an epoch or loop always redraws, so the
bar ends on the true count.

``distill fit`` uses it in place of Lightning's default bar (``--trainer.enable_progress_bar false`` still turns it
off; a progress bar given in ``trainer.callbacks`` is kept as given).
"""

from __future__ import annotations

import math
import time

from pytorch_lightning.callbacks import TQDMProgressBar
from typing_extensions import override

__all__ = ["ProgressBar"]


class ProgressBar(TQDMProgressBar):
    """:class:`~pytorch_lightning.callbacks.TQDMProgressBar` with a time limit on redraws.

    Args:
        refresh_rate: redraw at most every this many batches (Lightning's argument; 0 disables the bar).
        process_position: Lightning's argument: the bar's line offset, for several concurrent trainers.
        leave: Lightning's argument: keep each epoch's finished bar on screen.
        min_interval: redraw at most every this many seconds (the last batch of a loop always redraws).

    Raises:
        ValueError: if ``min_interval`` is negative or not finite.
    """

    def __init__(
        self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False, min_interval: float = 0.1
    ) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        if not (isinstance(min_interval, int | float) and math.isfinite(min_interval) and min_interval >= 0):
            raise ValueError(f"ProgressBar: min_interval must be a number of seconds >= 0, got {min_interval!r}")
        self.min_interval = float(min_interval)
        self._last_draw = -math.inf

    @override
    def _should_update(self, current: int, total: int) -> bool:
        # Lightning's rule (every refresh_rate-th batch and the last), then the time limit
        if not (self.is_enabled and (current % self.refresh_rate == 0 or current == total)):
            return False
        now = time.monotonic()
        if current != total and now - self._last_draw < self.min_interval:
            return False
        self._last_draw = now
        return True
