"""A per-rank hang watchdog: progress beats from the loop, a budget per phase, a stack dump.

A rank stuck outside a collective (an NFS read, a stale JIT build lock, W&B, a deadlock) keeps the
node billed until the time limit; one stuck inside a collective waits out the process group's
timeout. The loop beats at each phase (``startup``, ``step``, ``save``, ``eval``, ``export``); the
watchdog thread ends the process when the current phase has run longer than its budget:
``max(floor, factor × the longest this phase took so far)`` (twice the floor for ``startup``, which
also loads the models). On expiry it dumps every thread's stack to
``<run_dir>/failure/stacks-<job>-r<restart>-rank<rank>.txt``, writes ``failure.json`` with class
``hang``, calls ``on_expiry`` (the job's policy: requeue away from this node, or not) and exits
with :data:`remax.failure.EXIT_HANG`.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from remax import failure, ledger

log = logging.getLogger("remax.watchdog")


class Watchdog:
    def __init__(
        self,
        run_dir: Path,
        floor_s: float,
        factor: float = 4.0,
        on_expiry: Callable[[dict], None] | None = None,
    ) -> None:
        self.run_dir, self.floor_s, self.factor = Path(run_dir), floor_s, factor
        self.on_expiry = on_expiry
        self.phase, self.step, self.since = "startup", None, time.monotonic()
        self.longest: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def beat(self, phase: str, step: int | None = None) -> None:
        """Progress: the previous phase ended now, ``phase`` begins."""
        now = time.monotonic()
        with self._lock:
            took = now - self.since
            self.longest[self.phase] = max(self.longest.get(self.phase, 0.0), took)
            self.phase, self.since = phase, now
            if step is not None:
                self.step = step

    def expect(self, phase: str, seconds: float) -> None:
        """``phase`` is known to take ``seconds`` (measured in an earlier segment)."""
        with self._lock:
            self.longest[phase] = max(self.longest.get(phase, 0.0), seconds)

    def budget(self, phase: str) -> float:
        floor = 2 * self.floor_s if phase == "startup" else self.floor_s
        return max(floor, self.factor * self.longest.get(phase, 0.0))

    def start(self) -> Watchdog:
        threading.Thread(target=self._watch, name="remax-watchdog", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, self.floor_s / 4)):
            with self._lock:
                phase, step, elapsed = self.phase, self.step, time.monotonic() - self.since
            if elapsed > self.budget(phase):
                self._expire(phase, step, elapsed)
                return

    def _expire(self, phase: str, step: int | None, elapsed: float) -> None:
        try:
            self._report(phase, step, elapsed)
        finally:  # whatever failed in the report, the hung process must not stay billed
            os._exit(failure.EXIT_HANG)

    def _report(self, phase: str, step: int | None, elapsed: float) -> None:
        if not failure.claim_event(self.run_dir):
            # Another rank reported this segment's failure (most likely the hung one, while
            # this rank waited for it in a collective): its record and requeue stand for both.
            log.error(
                "watchdog: no progress in phase %r; stacks in %s (reported by another rank)",
                phase,
                self._dump_stacks(),
            )
            return
        info = failure.record(
            self.run_dir,
            failure.FailureClass.hang,
            f"no progress in phase {phase!r} for {elapsed:.0f} s (budget {self.budget(phase):.0f} s)",
            phase=phase,
            step=step,
            stacks=str(self._dump_stacks()),
            run_dir=str(self.run_dir),
        )
        log.error("watchdog: %s; stacks in %s", info["reason"], info["stacks"])
        if self.on_expiry is not None:
            try:
                self.on_expiry(info)
            except Exception as exc:  # noqa: BLE001 - the exit below must happen regardless
                log.error("watchdog policy failed: %s", exc)
        ledger.finish("hang", failure_class="hang")

    def _dump_stacks(self) -> Path:
        folder = self.run_dir / "failure"
        folder.mkdir(parents=True, exist_ok=True)  # a hang before the run dir was prepared
        job = os.environ.get("SLURM_JOB_ID", "local")
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        rank = os.environ.get("SLURM_PROCID") or os.environ.get("RANK") or "0"
        path = folder / f"stacks-{job}-r{restart}-rank{rank}.txt"
        with open(path, "w") as fh:
            faulthandler.dump_traceback(fh, all_threads=True)
        return path


_ACTIVE: Watchdog | None = None


def activate(dog: Watchdog | None) -> None:
    global _ACTIVE
    if _ACTIVE is not None and dog is not _ACTIVE:
        _ACTIVE.stop()
    _ACTIVE = dog


def expect(phase: str, seconds: float) -> None:
    """Module-level :meth:`Watchdog.expect`; a no-op without a watchdog."""
    if _ACTIVE is not None:
        _ACTIVE.expect(phase, seconds)


def beat(phase: str, step: int | None = None) -> None:
    """Module-level beat for the loop and the evaluation loops; a no-op without a watchdog."""
    if _ACTIVE is not None:
        _ACTIVE.beat(phase, step)
