"""The stop path, checkpoints that cannot lie, the watchdog and W&B, without a cluster.

Every test here runs the tiny CPU stages of ``test_resume`` (a few seconds each); the same paths on
the real local Slurm are in ``test_slurm_failures.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from test_resume import STEPS, _assert_identical, _config, _run, _trainer

from remax import ledger, preemption
from remax.checkpoint import MARKER, CheckpointManager, DiskFullError
from remax.preemption import StopRequest
from remax.run_dir import prepare
from remax.trainers import loop


def _stop_after(trainer, stop: StopRequest, k: int, signum: int | None = None) -> None:
    """Set ``stop`` once the trainer has done ``k`` steps (as USR2 would, mid-step k); with
    ``signum``, as that signal's handler does."""
    train_step = trainer.train_step

    def step():
        if trainer.step + 1 == k:
            stop.on_signal(signum) if signum else stop.set()
        return train_step()

    trainer.train_step = step


def _saves(monkeypatch) -> list[int]:
    steps: list[int] = []
    save = CheckpointManager.save

    def counting(self, step, *args, **kwargs):
        steps.append(step)
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(CheckpointManager, "save", counting)
    return steps


def test_deadline_budgets_step_save_due_eval_and_teardown():
    stop = StopRequest(end_time=time.time() + 100, margin_s=10)
    stop.observe(20.0)
    stop.observe_save(30.0)
    assert not stop.requested  # 20 + 30 + 10 = 60 < 100
    stop.observe_eval(50.0)
    assert not stop.requested  # the eval is not due at the next boundary
    stop.eval_due = True
    assert stop.requested and stop.reason == preemption.StopReason.deadline  # 110 >= 100


def test_save_that_cannot_finish_before_the_kill_is_skipped():
    stop = StopRequest(end_time=None, margin_s=5, grace_time_s=60)
    stop.on_signal(15)  # SIGTERM of a preemption: the kill is expected GraceTime (60 s) later
    assert stop.reason == preemption.StopReason.sigterm and stop.kill_time() is not None
    stop.observe_save(10.0)
    assert stop.can_save()  # 10 + 5 < 60
    stop.observe_save(58.0)
    assert not stop.can_save()  # 58 + 5 >= 60: requeue without saving


@pytest.mark.parametrize("state", ["COMPLETING", "CANCELLED", None])
def test_sigterm_of_a_cancel_ends_the_segment_without_a_stop(state, monkeypatch):
    # scancel, scontrol requeue and the time limit mark the job COMPLETING before the SIGTERM
    # (measured on slurm-wlm 22.05, remax/preemption.py); a state Slurm does not give (None) is
    # not taken for a preemption either: requeueing a cancelled job would bill unasked hours.
    exits = []
    monkeypatch.setattr(preemption.os, "_exit", exits.append)
    stop = StopRequest()
    preemption._on_sigterm(stop, state)
    assert exits == [143] and stop.reason is None and not stop.requested


def test_sigterm_of_a_preemption_takes_the_stop_path(monkeypatch):
    # A preemption's GraceTime SIGTERM finds the job still RUNNING: checkpoint, then requeue.
    monkeypatch.setattr(preemption.os, "_exit", lambda code: pytest.fail(f"exited {code}"))
    stop = StopRequest(grace_time_s=60)
    preemption._on_sigterm(stop, "RUNNING")
    assert stop.requested and stop.reason == preemption.StopReason.sigterm
    assert stop.kill_time() is not None


def test_stop_at_a_periodic_save_saves_that_step_once(tmp_path, monkeypatch):
    saves = _saves(monkeypatch)
    cfg = _config("sft", tmp_path)  # every_steps=2
    run_dir = prepare(cfg, "sft")
    trainer, stop = _trainer("sft", cfg), StopRequest()
    _stop_after(trainer, stop, 2)
    assert loop.run(trainer, cfg, run_dir, "sft", stop=stop) is None
    assert saves == [2], "the periodic save of step 2 and the stop's save are one save"
    assert CheckpointManager(run_dir / "checkpoints").complete_steps() == [2]


def test_stop_between_periodic_saves_saves_the_current_step(tmp_path, monkeypatch):
    saves = _saves(monkeypatch)
    cfg = _config("sft", tmp_path)  # every_steps=2
    run_dir = prepare(cfg, "sft")
    trainer, stop = _trainer("sft", cfg), StopRequest()  # an in-process flag: no kill time
    _stop_after(trainer, stop, 3)
    assert loop.run(trainer, cfg, run_dir, "sft", stop=stop) is None
    assert saves == [2, 3]


def test_no_time_to_save_requeues_without_a_checkpoint(tmp_path, monkeypatch):
    saves = _saves(monkeypatch)
    cfg = _config("sft", tmp_path)
    run_dir = prepare(cfg, "sft")
    trainer = _trainer("sft", cfg)
    stop = StopRequest(end_time=None, margin_s=5, signal_delay_s=30)
    stop.observe_save(1000.0)  # as measured by an earlier segment
    _stop_after(trainer, stop, 1, signal.SIGUSR2)  # before the first periodic save (every_steps=2)
    assert loop.run(trainer, cfg, run_dir, "sft", stop=stop) is None
    assert saves == [] and trainer.step == 1  # returned for the requeue, nothing written


def test_stop_during_final_evaluation_requeues_and_the_rerun_is_identical(tmp_path):
    straight, _ = _run("remax", _config("remax", tmp_path / "a"))
    cfg = _config("remax", tmp_path / "b")
    run_dir = prepare(cfg, "remax")
    trainer, stop = _trainer("remax", cfg), StopRequest()
    evaluate_final = trainer.evaluate_final

    def usr2_then_evaluate(run_dir, stop):
        stop.set()  # arrives while the final evaluation runs
        return evaluate_final(run_dir, stop)

    trainer.evaluate_final = usr2_then_evaluate
    assert loop.run(trainer, cfg, run_dir, "remax", stop=stop) is None
    assert not (run_dir / "export").exists() and not (run_dir / "summary.json").exists()
    assert CheckpointManager(run_dir / "checkpoints").complete_steps()[-1] == STEPS
    resumed = _trainer("remax", cfg)
    calls, train_step = [], resumed.train_step
    resumed.train_step = lambda: calls.append(1) or train_step()
    assert loop.run(resumed, cfg, run_dir, "remax") is not None
    assert calls == [], "resumed at the final step: only evaluation and export are redone"
    _assert_identical(straight, run_dir)


def test_truncated_latest_checkpoint_is_quarantined_and_the_previous_used(tmp_path):
    straight, _ = _run("sft", _config("sft", tmp_path / "a"))
    cfg = _config("sft", tmp_path / "b")
    run_dir = prepare(cfg, "sft")
    trainer, stop = _trainer("sft", cfg), StopRequest()
    _stop_after(trainer, stop, 4)
    assert loop.run(trainer, cfg, run_dir, "sft", stop=stop) is None
    ckpt = CheckpointManager(run_dir / "checkpoints")
    assert ckpt.complete_steps() == [2, 4]
    weights = run_dir / "checkpoints" / "step_4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # torn after it was marked complete
    resumed = _trainer("sft", cfg)
    calls, train_step = [], resumed.train_step
    resumed.train_step = lambda: calls.append(1) or train_step()
    assert loop.run(resumed, cfg, run_dir, "sft") is not None
    assert len(calls) == STEPS - 2, "resumed from step 2, the intact one"
    assert [p.name.split("-")[0] for p in (ckpt.root / "quarantine").iterdir()] == ["step_4"]
    _assert_identical(straight, run_dir)


def test_marker_lists_sizes_and_hashes_and_resave_keeps_one_complete_dir(tmp_path):
    import torch

    ckpt = CheckpointManager(tmp_path, keep_last=1)
    ckpt.save(1, {"w": torch.ones(3)}, {"x": 1})
    marker = json.loads((tmp_path / "step_1" / MARKER).read_text())
    assert set(marker["files"]) == {"model.safetensors", "state.pt"}
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in marker["files"].values())
    ckpt.save(1, {"w": torch.zeros(3)}, {"x": 2})  # a re-save replaces it, renamed aside first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]
    assert CheckpointManager.load(tmp_path / "step_1", "cpu")[1] == {"x": 2}
    ckpt.save(2, {"w": torch.zeros(3)}, {"x": 3})  # prunes step_1 (keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2"]


def test_save_refused_when_the_disk_cannot_hold_it(tmp_path, monkeypatch):
    import shutil

    import torch

    ckpt = CheckpointManager(tmp_path)
    ckpt.save(1, {"w": torch.ones(1000)}, {})
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=100))
    with pytest.raises(DiskFullError, match="GB free"):
        ckpt.save(2, {"w": torch.ones(1000)}, {})
    assert ckpt.complete_steps() == [1] and not list(tmp_path.glob(".tmp_step_*"))


def test_a_prune_killed_midway_leaves_nothing_behind_after_the_next_start(tmp_path, monkeypatch):
    import shutil

    import torch

    class Killed(Exception):
        pass

    real_rmtree = shutil.rmtree

    def dying_rmtree(path, ignore_errors=False):
        path = Path(path)
        if path.name.endswith("step_1") and path.exists():  # one file gone, then the kill
            next(f for f in path.iterdir() if f.name != MARKER).unlink()
            raise Killed
        real_rmtree(path, ignore_errors=ignore_errors)

    ckpt = CheckpointManager(tmp_path, keep_last=1)
    ckpt.save(1, {"w": torch.ones(3)}, {"x": 1})
    monkeypatch.setattr(shutil, "rmtree", dying_rmtree)
    with pytest.raises(Killed):
        ckpt.save(2, {"w": torch.ones(3)}, {"x": 2})  # killed while pruning step_1
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert ckpt.complete_steps() == [2]  # the half-deleted step_1 is never complete
    (tmp_path / "step_7").mkdir()  # an unmarked step dir an earlier version's prune left
    restarted = CheckpointManager(tmp_path, keep_last=1)
    assert restarted.latest_intact() == tmp_path / "step_2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2"]


def test_a_resave_killed_between_its_renames_keeps_the_old_copy(tmp_path):
    import torch

    ckpt = CheckpointManager(tmp_path)
    ckpt.save(1, {"w": torch.ones(3)}, {"x": 1})
    # replace_dir renamed the complete step_1 aside; the kill came before the new one moved in.
    os.replace(tmp_path / "step_1", tmp_path / ".step_1.old.123")
    (tmp_path / ".tmp_step_1_456").mkdir()
    assert CheckpointManager(tmp_path).latest_intact() == tmp_path / "step_1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]
    assert CheckpointManager.load_state(tmp_path / "step_1") == {"x": 1}


def test_quarantine_keeps_the_newest_only_and_gives_way_to_a_save(tmp_path, monkeypatch):
    import shutil

    import torch

    ckpt = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        ckpt.save(step, {"w": torch.full((1000,), float(step))}, {"x": step})
    for torn, fallback in ((3, 2), (2, 1)):
        weights = tmp_path / f"step_{torn}" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
        assert ckpt.latest_intact() == tmp_path / f"step_{fallback}"
    quarantined = [p.name.split("-")[0] for p in (tmp_path / "quarantine").iterdir()]
    assert quarantined == ["step_2"], "only the newest torn checkpoint is kept"
    usage = shutil.disk_usage(tmp_path)
    quarantine = tmp_path / "quarantine"
    # The disk is full until the quarantined checkpoint is deleted.
    monkeypatch.setattr(
        shutil, "disk_usage", lambda _: usage._replace(free=100 if quarantine.exists() else 10**12)
    )
    ckpt.save(4, {"w": torch.ones(1000)}, {"x": 4})
    assert not quarantine.exists() and ckpt.complete_steps() == [1, 4]


HANG = """
import sys, time
from remax import watchdog
from remax.watchdog import Watchdog
dog = Watchdog(sys.argv[1], floor_s=1.0, factor=4.0)
watchdog.activate(dog.start())
for step in range(3):
    time.sleep(0.1)
    watchdog.beat("step", step + 1)
def stuck_in_a_read():
    time.sleep(600)
stuck_in_a_read()
"""


def test_hung_rank_exits_with_failure_json_and_stack_dump(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", HANG, str(tmp_path)], cwd=REPO, timeout=120, capture_output=True
    )
    assert out.returncode == 4, out.stderr.decode()[-2000:]  # EXIT_HANG, long before 600 s
    info = json.loads((tmp_path / "failure.json").read_text())
    assert info["class"] == "hang" and info["phase"] == "step" and info["step"] == 3
    stacks = Path(info["stacks"]).read_text()
    assert "stuck_in_a_read" in stacks and "remax-watchdog" not in stacks.split("\n")[0]


def test_no_progress_guard_stops_after_k_segments_without_a_checkpoint(tmp_path, monkeypatch):
    from jobs import _policy
    from remax.config import ClusterConfig

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    for restart in range(3):
        ledger.append(tmp_path, {"job": "77", "restart": restart, "checkpoints": []})
    cluster = ClusterConfig(no_progress_segments=3)
    with pytest.raises(_policy.StopJob, match="no_progress"):
        _policy.check_start(cluster, tmp_path, restarts=3)
    assert json.loads((tmp_path / "failure.json").read_text())["class"] == "no_progress"
    ledger.append(tmp_path, {"job": "77", "restart": 3, "checkpoints": [40]})
    _policy.check_start(cluster, tmp_path, restarts=4)  # progress in the last 3: runs on


def test_no_progress_counts_an_evaluate_segments_answered_batches(tmp_path, monkeypatch):
    from jobs import _policy
    from remax.config import ClusterConfig

    monkeypatch.setenv("SLURM_JOB_ID", "78")
    cluster = ClusterConfig(no_progress_segments=2)
    # An evaluation publishes no checkpoints: each segment answered (and kept) batches instead.
    for restart, answered in enumerate((5, 0, 3, 0)):
        ledger.append(
            tmp_path, {"job": "78", "restart": restart, "checkpoints": [], "answered": answered}
        )
    _policy.check_start(cluster, tmp_path, restarts=4)  # 3 batches in the last 2 segments: runs on
    ledger.append(tmp_path, {"job": "78", "restart": 4, "checkpoints": [], "answered": 0})
    with pytest.raises(_policy.StopJob, match="answered an evaluation batch"):
        _policy.check_start(cluster, tmp_path, restarts=5)


def test_wandb_online_without_network_falls_back_to_offline(tmp_path, monkeypatch):
    import remax.log

    monkeypatch.setenv("WANDB_API_KEY", "0123456789" * 4)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: refused
    monkeypatch.setattr(remax.log, "WANDB_INIT_TIMEOUT_S", 5)
    writer = remax.log.MetricWriter(
        tmp_path, run_id="remax-test", stage="remax", config={}, wandb_mode="online"
    )
    assert writer._wandb is not None and writer._wandb.settings.mode == "offline"
    writer.log(1, {"loss": 1.0})
    assert writer.close(timeout_s=60)
    assert list((tmp_path / "wandb").glob("offline-run-*-remax-test"))


HANGING_WANDB = """
import atexit, time
class Settings:
    def __init__(self, **kw):
        self.__dict__.update(kw)
class Run:
    summary = {}
    def log(self, row, step=None):
        pass
    def finish(self):
        time.sleep(3600)  # an upload that never ends
def init(**kw):
    atexit.register(time.sleep, 3600)  # wandb's teardown waits for the same upload, unbounded
    return Run()
def teardown():
    pass
"""

CLOSE_THEN_END = """
import sys
from pathlib import Path
from remax.log import MetricWriter
writer = MetricWriter(Path(sys.argv[1]), run_id="r", stage="sft", config={}, wandb_mode="offline")
writer.log(1, {"loss": 1.0})
assert writer.close(timeout_s=0.5) is False
{end}
"""


@pytest.mark.parametrize(
    "end, status", [("pass", 0), ("sys.exit(3)", 3), ("raise RuntimeError('boom')", 1)]
)
def test_an_abandoned_wandb_finish_does_not_keep_the_process_alive(tmp_path, end, status):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "wandb.py").write_text(HANGING_WANDB)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{REPO}"}
    out = subprocess.run(
        [sys.executable, "-c", CLOSE_THEN_END.replace("{end}", end), str(run_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # before the fix: blocked in the fake teardown's hour-long sleep
    )
    assert out.returncode == status, out.stderr[-2000:]
    assert "without waiting for W&B's teardown" in out.stderr
    assert json.loads((run_dir / "metrics.jsonl").read_text()) == {"step": 1, "loss": 1.0}


def test_waste_splits_billed_time_by_the_segment_ledger(tmp_path):
    from jobs._waste import waste

    # Segment 0: started 0, first step 10, last checkpoint 70, stopped at 100 (30 s lost).
    # Segment 1: started 200, first step 215 (15 s reload), completed at 300.
    ledger.append(
        tmp_path,
        {"start": 0, "first_step_at": 10, "saved_at": [40, 70], "end": 100, "stop_reason": "usr2"},
    )
    ledger.append(
        tmp_path,
        {
            "start": 200,
            "first_step_at": 215,
            "saved_at": [],
            "end": 300,
            "stop_reason": "completed",
        },
    )
    out = waste(tmp_path, billed_s=210, gpus=4)  # sacct: 210 s, 10 more than ledger
    hours = 4 / 3600
    assert out["productive_gpu_h"] == round((70 + 85) * hours, 5)  # 0..70 and 215..300
    assert out["waste_by_reason_gpu_h"] == {
        "lost steps": round(30 * hours, 5),
        "restart": round(15 * hours, 5),
        "outside the ledger": round(10 * hours, 5),
    }
    assert out["wasted_gpu_h"] == round(55 * hours, 5) and out["top_waste"] == "lost steps"
    assert out["billed_gpu_h"] == round(210 * hours, 5)
