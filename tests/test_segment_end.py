"""Issue #18's stop-path fixes that need no cluster: when the kill comes (graceful cancel,
preemption GraceTime, time-limit warning), one failure event counted once, the watchdog's save
budget across a restart, requeue before W&B closes, and ranks agreeing on every save.

The same paths on the real two-node Slurm are in ``test_slurm_multirank.py``.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, start_method
from test_distributed import _entry, free_port, spawn
from test_resume import _config, _trainer
from test_stop_path import _stop_after

from remax import failure, preemption, watchdog
from remax.checkpoint import CheckpointManager
from remax.preemption import StopReason, StopRequest
from remax.run_dir import prepare
from remax.trainers import loop
from remax.trainers.checkpointer import Checkpointer


# ------------------------------------------------------------------ when the kill comes
def test_graceful_cancel_has_no_kill_deadline_but_the_end_time():
    now = time.time()
    stop = StopRequest(now + 3600, 10, 120, grace_time_s=20, graceful=lambda: True)
    stop.on_signal(signal.SIGUSR2)  # jobs.cancel --graceful: the stop file exists at the signal
    assert stop.reason == StopReason.graceful
    assert stop.kill_time() == now + 3600  # not signal + 120 s, not signal + GraceTime
    stop.observe_save(600.0)  # a 7B save after a long step: still written
    assert stop.can_save()


def test_usr2_near_the_end_time_is_the_time_limit_warning():
    now = time.time()
    stop = StopRequest(now + 100, 5, 120, grace_time_s=20)  # USR2@120, 100 s left: the limit
    stop.on_signal(signal.SIGUSR2)
    assert stop.reason == StopReason.usr2 and stop.kill_time() == now + 100


def test_usr2_far_from_the_end_time_is_a_preemption_killed_after_gracetime():
    stop = StopRequest(time.time() + 3600, 5, 120, grace_time_s=20)
    stop.on_signal(signal.SIGUSR2)
    assert stop.kill_time() == pytest.approx(stop.signalled_at + 20)
    stop.observe_save(30.0)
    assert not stop.can_save()  # 30 + 5 s do not fit into GraceTime: requeue without a save


def test_sigterm_of_a_preemption_is_killed_after_the_partitions_gracetime():
    stop = StopRequest(time.time() + 3600, 5, 120, grace_time_s=300)
    preemption._on_sigterm(stop, "RUNNING")
    assert stop.kill_time() == pytest.approx(stop.signalled_at + 300)  # not signal_delay_s


def test_usr2_with_no_end_time_and_no_gracetime_falls_back_to_the_signal_delay():
    stop = StopRequest(None, 5, 120)  # squeue failed and the partition preempts nothing
    stop.on_signal(signal.SIGUSR2)
    assert stop.kill_time() == pytest.approx(stop.signalled_at + 120)


# A task of a job step, in a fresh interpreter: what Slurm's USR2 or SIGTERM (argv[1]) does to it
# before its stop path exists (still importing) and after its outcome is decided (tearing down).
_TASK = """
import os, signal, sys, time
import jobs  # a task's first import of ours
signum = getattr(signal, sys.argv[1])
os.kill(os.getpid(), signum)  # a preemption's warning, a stale kill, while four ranks import torch
sent = time.time()
time.sleep(0.2)
from remax import preemption
stop = preemption.install(preemption.StopRequest(end_time=sent + 600, signal_delay_s=120))
while stop.reason is None and time.time() < sent + 30:  # SIGTERM: triaged by squeue, off-thread
    time.sleep(0.1)
print(stop.reason.value, stop.signalled_at <= time.time())
preemption.ignore_late_signals()  # what run_stage does once the segment's outcome is decided
os.kill(os.getpid(), signum)  # the time limit's warning, or a stale kill, during the teardown
time.sleep(0.2)
print("alive")
"""


@pytest.mark.parametrize("name", ["SIGUSR2", "SIGTERM"])
def test_a_signal_while_a_task_imports_is_its_stop_and_after_its_outcome_is_ignored(name, tmp_path):
    """On the two-node Slurm a USR2 arriving as a segment ended killed a task in the
    interpreter's teardown (Python drops its handlers there), and so did the retried kill of a
    lost node's old incarnation (SIGTERM): a COMPLETED segment became FAILED and its chain was
    cancelled. Before the stop path was installed either signal killed the task too. Here the
    job is RUNNING (a fake squeue): the SIGTERM is a preemption's."""
    (tmp_path / "squeue").write_text("#!/bin/sh\necho RUNNING\n")
    (tmp_path / "squeue").chmod(0o755)
    env = {
        **os.environ,
        "SLURM_JOB_ID": "1",
        "SLURM_STEP_ID": "0",
        "PYTHONPATH": str(REPO),
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
    }
    out = subprocess.run(
        [sys.executable, "-c", _TASK, name], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    reason = "usr2" if name == "SIGUSR2" else "sigterm"
    assert out.stdout.split() == [reason, "True", "alive"]


def test_partition_gracetime_is_read_from_scontrol(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text(
        '#!/bin/sh\n[ "$3" = low ] && echo "PartitionName=low AllowGroups=ALL GraceTime=20 '
        'Hidden=NO MaxTime=UNLIMITED PreemptMode=REQUEUE"\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_PARTITION", "low")
    assert preemption.partition_grace_s() == 20.0
    monkeypatch.setenv("SLURM_JOB_PARTITION", "other")  # no answer: unknown, not 0
    assert preemption.partition_grace_s() is None


# ------------------------------------------------------------------ one event, one record
def test_a_hang_seen_by_every_rank_is_one_record_and_one_requeue(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    requeues = []
    for rank in range(4):  # the hung rank, then three waiting for it in a collective
        monkeypatch.setenv("SLURM_PROCID", str(rank))
        dog = watchdog.Watchdog(tmp_path, 60, on_expiry=requeues.append)
        dog._report("step", 7, 75.0)
    records = failure.history(tmp_path)
    assert [r["class"] for r in records] == ["hang"] and records[0]["rank"] == 0
    assert len(requeues) == 1
    assert len(list((tmp_path / "failure").glob("stacks-4242-r1-rank*.txt"))) == 4  # all dumped
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # the next segment's hang is a new event
    watchdog.Watchdog(tmp_path, 60, on_expiry=requeues.append)._report("step", 9, 80.0)
    assert len(failure.history(tmp_path)) == 2 and len(requeues) == 2


def test_the_first_saves_budget_after_a_restart_is_the_measured_save(tmp_path):
    dog = watchdog.Watchdog(tmp_path, floor_s=60, factor=4.0)
    watchdog.activate(dog)
    try:
        ckpt = Checkpointer(_config("sft", tmp_path).checkpoint)
        ckpt.restore_timing({"save_s": 200.0})  # the previous segment's 7B save
        assert dog.budget("save") == 800.0  # not the 60 s floor: the first save is not a hang
    finally:
        watchdog.activate(None)


# ------------------------------------------------------------------ the segment's end
def test_the_segment_end_runs_before_wandb_closes(tmp_path, monkeypatch):
    from remax.log import MetricWriter

    order = []
    close = MetricWriter.close
    monkeypatch.setattr(
        MetricWriter, "close", lambda self, **kw: (order.append("close"), close(self, **kw))
    )
    cfg = _config("sft", tmp_path)
    run_dir = prepare(cfg, "sft")
    trainer, stop = _trainer("sft", cfg), StopRequest()
    _stop_after(trainer, stop, 3, signal.SIGUSR2)
    ended = lambda: order.append("requeue")  # noqa: E731
    assert loop.run(trainer, cfg, run_dir, "sft", stop=stop, end_segment=ended) is None
    assert order == ["requeue", "close"]  # the kill after a requeue may cut the close short
    assert CheckpointManager(run_dir / "checkpoints").complete_steps()[-1] == 3


# ------------------------------------------------------------------ ranks agree on saves
def _skewed_clocks(rank, world, cfg):
    """Each rank's clock says a time-based save is due at another step (as when rank 0 starts
    its clock after wandb.init): rank 1 alone at step 2, rank 0 alone at step 3."""
    from jobs._stage import run_stage
    from remax import distributed

    Checkpointer.due = lambda self, step, total: {1: 2, 0: 3}[distributed.rank()] == step
    run_stage("remax", cfg)


def test_time_based_saves_are_rank_zeros_decision_on_every_rank(tmp_path):
    from test_distributed import _resume_config

    from remax.run_dir import run_dir_for

    cfg = _resume_config(tmp_path)
    spawn(_skewed_clocks, 2, cfg)  # per-rank decisions: rank 1 saves alone into a missing dir
    run_dir = run_dir_for(cfg, "remax")
    assert CheckpointManager(run_dir / "checkpoints").complete_steps() == [3, 5]
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    assert not (run_dir / "failure.json").exists()


def test_the_guard_never_requeues_a_failing_segment(monkeypatch):
    # A rank raised: srun ends the step's other tasks with SIGTERM while the job is still
    # RUNNING, which reads like a preemption. The failing segment must end FAILED, not requeue.
    calls = []
    monkeypatch.setattr(preemption, "requeue", lambda **kw: calls.append("requeue") or True)
    monkeypatch.setattr(preemption.os, "_exit", lambda code: calls.append(code))
    stop = StopRequest(None, 0.0, 30, grace_time_s=0.2)
    stop.failed = True  # set by jobs._stage when the stage raised
    stop.on_signal(signal.SIGTERM)
    preemption._guard(stop)
    assert calls == []
    stop.failed = False  # the same SIGTERM of a preemption: requeued without a save
    preemption._guard(stop)
    assert calls == ["requeue", preemption.EXIT_REQUEUED]


def _collective_with_a_vanishing_peer(rank: int, world: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    dist.barrier()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # a lost node: no exception, no word
    try:
        dist.all_reduce(torch.ones(4))
    except RuntimeError as exc:
        Path(out).write_text(failure.classify(exc).value)


def test_a_peer_that_vanishes_mid_collective_is_a_node_failure_not_an_exception(tmp_path):
    """What the surviving ranks of a lost node raise (gloo: "Connection closed by peer") is
    classed node_failure (bounded by cluster.max_failure_requeues), not a bug in the code."""
    import torch.multiprocessing as mp

    out, port = tmp_path / "class", free_port()
    # Not spawn(): it would SIGTERM rank 0 as soon as rank 1 dies, before rank 0 sees the loss.
    ctx = mp.get_context(start_method())
    args = (_collective_with_a_vanishing_peer, 2, port, (str(out),), dict(os.environ))
    ranks = [ctx.Process(target=_entry, args=(r, *args)) for r in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(120)
    assert [p.exitcode for p in ranks] == [0, -signal.SIGKILL]
    assert out.read_text() == "node_failure"
