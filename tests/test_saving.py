"""Time-based checkpointing (``checkpoint.every_minutes``, Young's interval) and the save time
carried across a restart (issue #12, item 5), on the tiny SFT stage of ``test_resume``."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import pytest
from test_resume import STEPS, _config, _trainer

from remax.checkpoint import CheckpointManager
from remax.config import CheckpointConfig
from remax.preemption import StopRequest
from remax.run_dir import prepare
from remax.trainers import loop
from remax.trainers.checkpointer import Checkpointer


class Clock:
    """``time.monotonic`` under the test's control."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr("remax.trainers.checkpointer.time.monotonic", clock)
    return clock


def test_every_minutes_saves_when_the_time_is_up_and_not_before(clock):
    written = []
    saver = Checkpointer(CheckpointConfig(every_steps=0, every_minutes=2.0), write=written.append)
    clock.now += 119
    assert not saver.due(5, total=100)
    clock.now += 1  # 120 s = 2 min since the start of the segment
    assert saver.due(5, total=100)
    assert saver.save(5) and written == [5]
    assert not saver.due(6, total=100)  # the clock restarts at each save
    clock.now += 120
    assert saver.due(7, total=100) and not saver.due(100, total=100)  # the last step: the loop's


def test_default_interval_is_youngs_from_the_measured_save_time(clock):
    cfg = CheckpointConfig(every_steps=0, failures_per_day=4.0)
    saver = Checkpointer(cfg, write=lambda step: None)
    assert saver.interval_s() == 30 * 60  # nothing measured yet
    saver.restore_timing({"save_s": 180.0})
    # sqrt(2 · 180 s · 86400 s / 4) = sqrt(7_776_000) = 2788.5 s ≈ 46 min
    assert saver.interval_s() == pytest.approx(math.sqrt(2 * 180 * 86400 / 4), rel=1e-12)
    assert Checkpointer(replace(cfg, every_minutes=0)).interval_s() == math.inf


def test_a_save_is_timed_and_fed_to_the_deadline_stop(clock, monkeypatch):
    ticks = iter([0.0, 2.5])  # perf_counter before and after the write
    monkeypatch.setattr("remax.trainers.checkpointer.time.perf_counter", lambda: next(ticks))
    stop = StopRequest()
    saver = Checkpointer(CheckpointConfig(), stop=stop, write=lambda step: None)
    saver.save(3)
    assert saver.timing() == {"save_s": 2.5} and stop.save_s == 2.5
    assert not saver.save(3), "the same step is never written twice"


def test_signal_delay_shorter_than_the_measured_save_is_warned_about(caplog):
    saver = Checkpointer(CheckpointConfig())
    with caplog.at_level(logging.WARNING, logger="remax.loop"):
        saver.restore_timing({"save_s": 40.0}, signal_delay_s=30)
    assert "raise cluster.signal_delay_s above 60" in caplog.text


def test_time_based_saves_in_a_real_run_and_the_save_time_survives_a_restart(tmp_path):
    # every_steps=0, every_minutes=1e-9: a save after every step but the last (the loop's own).
    cfg = _config("sft", tmp_path)
    cfg = replace(
        cfg, checkpoint=CheckpointConfig(every_steps=0, every_minutes=1e-9, keep_last=STEPS)
    )
    run_dir = prepare(cfg, "sft")
    stop, measured = StopRequest(), []
    stop.observe_save = measured.append
    loop.run(_trainer("sft", cfg), cfg, run_dir, "sft", stop=stop)
    saved = CheckpointManager(run_dir / "checkpoints").complete_steps()
    assert saved == list(range(1, STEPS + 1)) and len(measured) == STEPS
    # A restarted segment starts with a measured save time: the one known when the newest
    # checkpoint was written (the save before it; a save cannot contain its own duration).
    resumed = Checkpointer(cfg.checkpoint, _trainer("sft", cfg), run_dir / "checkpoints")
    resumed.resume("sft")
    assert resumed.save_s == measured[-2] > 0 and resumed.saved_step == STEPS
