"""What the loop saves and when: the one owner of checkpoint policy, on top of
``remax.checkpoint.CheckpointManager``'s how (atomic directories, markers, quarantine, pruning).

- **What**: every engine's files (weights, optimizer, scheduler; each rank its shards), the
  trainer's counters and sampler position, each rank's RNG, and the measured save time.
- **When**: every ``checkpoint.every_steps`` steps, every ``checkpoint.every_minutes`` minutes, or
  (unset) at Young's interval sqrt(2 · save time · mean time between failures): a 94 GB save of
  3 min at one failure a day is due every ~72 min, a tiny model's every few minutes. Never the
  same step twice; on a stop only when the measured save still fits before the kill.
- **Resume**: the newest intact checkpoint, chosen by rank 0 for every rank.

The save time is carried in the checkpoint (``state["timing"]``), so a restarted segment budgets
its deadline stop and its watchdog with the previous segment's save time from its first step on.
Time-based decisions are one rank's clock: the loop takes rank 0's answer for every rank
(``distributed.agree``), since ranks' clocks start seconds apart.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

from remax import distributed, ledger, watchdog
from remax.checkpoint import CheckpointManager, rng_state, set_rng_state
from remax.inputs import InputError
from remax.models.lora import BASE_HASH
from remax.preemption import StopRequest

log = logging.getLogger("remax.loop")

_UNMEASURED_INTERVAL_S = 30 * 60  # before any save was timed (a fresh run with every_steps=0)


class Checkpointer:
    """Saves ``trainer`` under ``root`` when due or asked; resumes it from there.

    ``write`` replaces the real save (tests of the timing alone, with no trainer or directory).
    """

    def __init__(
        self,
        cfg,
        trainer=None,
        root: Path | None = None,
        stop: StopRequest | None = None,
        *,
        write: Callable[[int], None] | None = None,
    ) -> None:
        self.cfg, self.trainer = cfg, trainer
        self.stop = stop if stop is not None else StopRequest()
        self.manager = CheckpointManager(root, keep_last=cfg.keep_last) if root else None
        self._write = write or self._write_step
        self.saved_step = 0  # on disk already: the resumed step, or nothing worth saving (0)
        self.save_s = 0.0
        self.last_save_at = time.monotonic()

    # ------------------------------------------------------------------ resume
    def resume(self, stage: str, signal_delay_s: float | None = None) -> None:
        """Load the newest intact checkpoint, if any: engines, counters, sampler, RNG, save time.
        Rank 0 verifies the files against the marker (quarantining torn ones); every rank
        resumes from its choice."""
        latest = self._latest()
        if latest is None:
            return
        rank, world = distributed.rank(), distributed.world_size()
        state = CheckpointManager.load_state(latest, rank)
        if state.get("world_size", 1) != world:
            raise ValueError(
                f"{latest} was written by {state.get('world_size', 1)} ranks, this run has {world}: "
                "resume with the same number of ranks (each rank's RNG stream is in the checkpoint)"
            )
        check_base(self.trainer, state)  # LoRA: the adapters fit only the base they were trained on
        for engine in self.trainer.engines():  # weights, optimizer and scheduler (own shards)
            engine.load(latest)
        self.trainer.load_state_dict(state["trainer"])
        set_rng_state(state["rng"])
        self.saved_step = self.trainer.step
        self.restore_timing(state.get("timing", {}), signal_delay_s)
        log.info("resumed %s from %s (step %d)", stage, latest, self.trainer.step)

    def _latest(self) -> Path | None:
        latest = self.manager.latest_intact() if distributed.rank() == 0 else None
        if distributed.world_size() > 1:
            step = -1 if latest is None else int(latest.name.split("_")[1])
            mine = step + 1 if distributed.rank() == 0 else 0
            chosen = int(distributed.sum_over_ranks({"step": mine})["step"]) - 1
            latest = self.manager.root / f"step_{chosen}" if chosen >= 0 else None
        return latest

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

    # ------------------------------------------------------------------ when
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
        """A periodic save after ``step`` (the final one is the loop's), by this process's clock:
        the loop takes rank 0's answer for every rank (``distributed.agree``)."""
        if step >= total:
            return False
        every = self.cfg.every_steps
        by_steps = bool(every) and step % every == 0
        return by_steps or time.monotonic() - self.last_save_at >= self.interval_s()

    # ------------------------------------------------------------------ save
    def save(self, step: int) -> bool:
        """Write ``step`` unless it is already on disk (collective); returns whether it wrote."""
        if step == self.saved_step:
            return False  # a stop at a step just saved periodically: never save a step twice
        watchdog.beat("save", step)
        t0 = time.perf_counter()
        self._write(step)
        seconds = time.perf_counter() - t0
        watchdog.beat("step", step)
        self.saved_step, self.last_save_at = step, time.monotonic()
        self._measured(seconds)
        ledger.note_save(step, seconds)
        return True

    def save_if_it_fits(self, step: int) -> None:
        """On a stop: save, unless the measured save would not finish before the kill (then the
        requeue alone keeps the chain alive; the steps since the last checkpoint are redone)."""
        if distributed.any_rank(not self.stop.can_save()):
            log.warning("stop at step %d: no time to save (%.0f s measured)", step, self.save_s)
            return
        self.save(step)

    def _write_step(self, step: int) -> None:
        """``step_<N>/``: every engine's files, the trainer's state, this rank's RNG."""

        def write(directory: Path) -> None:
            for engine in self.trainer.engines():
                engine.save(directory)

        if distributed.rank():  # counters and sampler are identical across ranks: rank 0's
            self.manager.save(step, None, {"rng": rng_state()}, write=write)
            return
        state = {"trainer": self.trainer.state_dict(), "rng": rng_state(), "timing": self.timing()}
        state["world_size"] = distributed.world_size()
        state["base_sha256"] = base_hashes(self.trainer)
        self.manager.save(step, None, state, write=write)

    def _measured(self, seconds: float) -> None:
        self.save_s = seconds
        watchdog.expect("save", seconds)  # a resumed segment's first save has a budget too
        self.stop.observe_save(seconds)


def base_hashes(trainer) -> dict[str, str]:
    """``{engine name: SHA-256 of its frozen base}`` of each adapted engine (``model.lora``)."""
    hashes = {e.name: getattr(e.module, BASE_HASH, None) for e in trainer.engines()}
    return {name: h for name, h in hashes.items() if h is not None}


def check_base(trainer, state: dict) -> None:
    """Raise InputError when a checkpoint's adapters were trained on another base model."""
    saved, now = state.get("base_sha256", {}), base_hashes(trainer)
    for name in sorted(set(saved) | set(now)):
        if saved.get(name) != now.get(name):
            raise InputError(
                f"checkpoint adapters of {name!r} were trained on base weights with SHA-256 "
                f"{str(saved.get(name))[:12]}, model.path now loads {str(now.get(name))[:12]}: "
                "resume with the same base model, or start a new run (run.attempt=<n>)"
            )


def check_resumable(trainer, root: Path) -> None:
    """``check_base`` against the newest complete checkpoint under ``root``, reading only (a job
    calls it before it writes anything)."""
    latest = CheckpointManager(root).latest() if Path(root).is_dir() else None
    if latest is not None:
        check_base(trainer, CheckpointManager.load_state(latest, 0))
