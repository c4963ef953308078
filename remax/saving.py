"""When the loop checkpoints: every N steps, every M minutes, never the same step twice.

The save time is measured on every save and carried in the checkpoint (``state["timing"]``), so a
restarted segment budgets its deadline stop with the save time of the previous one from its first
step on. ``checkpoint.every_minutes`` unset means Young's interval sqrt(2 · save time · mean time
between failures): a 94 GB save of 3 min at one failure a day is due every ~72 min, a tiny model's
every few minutes, instead of a fixed step count that is right for neither.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from remax import ledger, watchdog

log = logging.getLogger("remax.loop")

_UNMEASURED_INTERVAL_S = 30 * 60  # before any save was timed (a fresh run with every_steps=0)


class Saver:
    """Calls ``write(step)`` when a checkpoint is due or asked for, at most once per step."""

    def __init__(self, cfg, write: Callable[[int], None], stop=None, *, resumed_step: int = 0):
        self.cfg, self.write, self.stop = cfg, write, stop
        # The resumed step is on disk already; a fresh run has nothing worth saving at step 0.
        self.saved_step = resumed_step
        self.save_s = 0.0
        self.last_save_at = time.monotonic()

    def restore_timing(self, timing: dict, signal_delay_s: float | None = None) -> None:
        if "save_s" not in timing:  # a fresh run: nothing measured yet
            return
        self._measured(float(timing["save_s"]))
        if signal_delay_s and self.save_s > signal_delay_s:
            log.warning(
                "the last checkpoint took %.0f s but cluster.signal_delay_s=%s: USR2 comes too "
                "late to save; raise cluster.signal_delay_s above %.0f",
                self.save_s,
                signal_delay_s,
                self.save_s * 1.5,
            )

    def timing(self) -> dict:
        return {"save_s": self.save_s}

    def interval_s(self) -> float:
        c = self.cfg
        if c.every_minutes is not None:
            return c.every_minutes * 60 if c.every_minutes > 0 else math.inf
        if self.save_s <= 0:
            return _UNMEASURED_INTERVAL_S
        return math.sqrt(2 * self.save_s * 86400 / c.failures_per_day)

    def due(self, step: int, total: int) -> bool:
        """A periodic save after ``step`` (the final one is the loop's, not periodic), by this
        process's clock. Ranks' clocks differ (rank 0's starts after ``wandb.init``): the loop
        takes rank 0's answer for every rank (``distributed.agree``), never each rank's own."""
        if step >= total:
            return False
        every = self.cfg.every_steps
        by_steps = bool(every) and step % every == 0
        return by_steps or time.monotonic() - self.last_save_at >= self.interval_s()

    def save(self, step: int) -> bool:
        """Write ``step`` unless it is already on disk; returns whether it wrote."""
        if step == self.saved_step:
            return False  # a stop at a step just saved periodically: never save a step twice
        watchdog.beat("save", step)
        t0 = time.perf_counter()
        self.write(step)
        seconds = time.perf_counter() - t0
        watchdog.beat("step", step)
        self.saved_step, self.last_save_at = step, time.monotonic()
        self._measured(seconds)
        ledger.note_save(step, seconds)
        return True

    def _measured(self, seconds: float) -> None:
        self.save_s = seconds
        watchdog.expect("save", seconds)  # a resumed segment's first save has a budget too
        if self.stop is not None:
            self.stop.observe_save(seconds)
