"""Endings of a multi-rank job on the two-node local Slurm (issue #18): 2 nodes × 2 tasks, four
gloo ranks of the tiny model, every state sequence read from ``sacct -D``.

Needs ``LOCAL_SLURM_NODES=2 scripts/local_slurm.sh up`` (``.ci/run`` does it); same skip rule as
``test_slurm.py``, whose helpers these use.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, run_job
from safetensors.torch import load_file
from test_slurm import JOB, _assert_same_export, _sacct, _status, _wait_done, _wait_for

pytestmark = pytest.mark.slurm

# Four ranks on the 2-core machine, one thread each (cpus_per_task=1): ~0.2 s a step. A checkpoint
# every 8 steps. The reward is a function of the tests (PYTHONPATH: _repo_path) that the paced
# runs (PACED, LIGHTLY_PACED) return as late as they need, with the same rewards: every 2×2 run
# ends in the same export.
TWO_BY_TWO = (
    "cluster.nodes=2",
    "cluster.tasks_per_node=2",
    "cluster.gpus_per_node=2",
    "train.max_steps=24",
    "checkpoint.every_steps=8",
    "log.wandb_mode=disabled",
    "reward_model.kind=function",
    "reward_model.function=tests.reward_functions:topic_margin",
)
PACED = ("reward_model.function=tests.reward_functions:paced_topic_margin",)
LIGHTLY_PACED = ("reward_model.function=tests.reward_functions:lightly_paced_topic_margin",)


def _submit(root: Path, *extra: str) -> dict:
    """Submit a 2×2 ReMax job (``TWO_BY_TWO`` is the caller's to pass, like ``test_slurm._submit``)."""
    out = run_job("jobs.remax", "--json", f"run.root={root}", *JOB, *extra, env=_repo_path())
    return json.loads(out.stdout.strip().splitlines()[-1])


def _nodes(job: str) -> set[str]:
    out = subprocess.run(
        ["sacct", "-j", job, "-n", "--parsable2", "-o", "NodeList", "-X"],
        capture_output=True,
        text=True,
        check=True,
    )
    return {n for line in out.stdout.split() for n in _hostnames(line)}


def _hostnames(nodelist: str) -> list[str]:
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True
    )
    return out.stdout.split()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2×2 run: the export every interrupted one must equal bit for bit."""
    rec = _submit(tmp_path_factory.mktemp("ref"), *TWO_BY_TWO)
    states = _wait_done(rec["job_id"], timeout=900)
    assert [s for s, _ in states] == ["COMPLETED"], states
    summary = json.loads((Path(rec["run_dir"]) / "summary.json").read_text())
    assert summary["world_size"] == 4
    assert len(_nodes(rec["job_id"])) == 2, "the job must span both nodes"
    return rec


def test_time_limits_with_time_based_saves_and_a_failing_squeue_in_the_job(tmp_path, reference):
    """A real 3-minute time limit (Slurm's USR2 90 s before it, no signal from the test), saves
    every 12 s by the clock (step-based off), and the job's own ``squeue`` failing (a busy
    controller: the end time is unknown, so the USR2's deadline is ``signal_delay_s``). The ranks
    agree on every save; rank 0 requeues before the others leave: REQUEUED (once or more, each
    segment ends at its time limit), COMPLETED, the uninterrupted export."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "squeue").write_text("#!/bin/sh\necho 'squeue: error: Socket timed out' >&2\nexit 1\n")
    (fake / "squeue").chmod(0o755)
    rec = _submit(
        tmp_path,
        *TWO_BY_TWO,
        *PACED,  # ~4 s a step: 24 steps outlast the first USR2 (60 to 90 s into a segment)
        "checkpoint.every_steps=0",
        "checkpoint.every_minutes=0.2",
        "cluster.time_min=3",
        "cluster.signal_delay_s=90",
        "log.wandb_mode=offline",
        f"cluster.setup=['export PATH={fake}:$PATH']",
    )
    run_dir = Path(rec["run_dir"])
    states = [s for s, _ in _wait_done(rec["job_id"], timeout=900)]
    assert states[-1] == "COMPLETED" and set(states[:-1]) == {"REQUEUED"}, states
    assert len(states) >= 2, f"the time limit never ended a segment: {states}"
    segments = [json.loads(x) for x in (run_dir / "segments.jsonl").read_text().splitlines()]
    assert [s["stop_reason"] for s in segments] == ["usr2"] * (len(states) - 1) + ["completed"]
    # A segment's saves before its stop's save are the clock's (every_steps=0).
    assert any(len(s["checkpoints"]) >= 2 for s in segments[:-1]), segments
    assert not (run_dir / "failure.json").exists()
    _assert_same_export(reference["run_dir"], rec["run_dir"])
    rows = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 25)), "steps continuous across requeues, none logged twice"
    [row] = _status(tmp_path)
    assert row["restarts"] == len(states) - 1 and row["state"] == "COMPLETED"
    assert row["step"] == 24 and row["gpu_hours"] > 0 and row["cost"] > 0  # 4 fake GPUs
    run_id = (run_dir / "wandb_id").read_text().strip()  # one W&B run, a fragment a segment
    fragments = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(fragments) == len(states) and all(f.name.endswith(run_id) for f in fragments)


def test_graceful_cancel_with_steps_longer_than_the_signal_window(tmp_path):
    """``jobs.cancel --graceful`` while a step takes longer than ``signal_delay_s``: the job
    finishes its step, writes exactly one checkpoint and ends CANCELLED; ``jobs.resume`` then
    finishes the run. The actor trains LoRA adapters (#22): the four ranks' checkpoint holds
    only them, and the resumed job loads them onto its base."""
    slow = (
        *TWO_BY_TWO,
        "model.lora.rank=8",
        "train.max_steps=6",
        "checkpoint.every_steps=100",  # no periodic save: the cancel's is the only one
        "cluster.signal_delay_s=5",  # the old guard would requeue 5 s after the signal
        "reward_model.kind=function",
        "reward_model.function=tests.reward_functions:slow_topic_margin",
    )
    out = run_job("jobs.remax", "--json", f"run.root={tmp_path}", *JOB, *slow, env=_repo_path())
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    run_dir = Path(rec["run_dir"])
    _wait_for(run_dir, "metrics.jsonl", timeout=600)  # a first step is done
    run_job("jobs.cancel", str(run_dir), "--graceful")
    states = _wait_done(rec["job_id"], timeout=600)
    assert [s.split()[0] for s, _ in states] == ["CANCELLED"], states  # "CANCELLED by 0"
    [step] = [p.name for p in (run_dir / "checkpoints").glob("step_*")]
    assert (run_dir / "checkpoints" / step / "COMPLETE").exists()
    saved = load_file(run_dir / "checkpoints" / step / "model.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved), sorted(saved)[:4]
    out = run_job("jobs.resume", str(run_dir), "--json", env=_repo_path())
    again = json.loads(out.stdout.strip().splitlines()[-1])
    states = _wait_done(again["job_id"], timeout=600)
    assert [s for s, _ in states] == ["COMPLETED"], states
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 6


def test_one_rank_raises_fails_once_and_names_that_rank(tmp_path):
    args = (
        *TWO_BY_TWO,
        "reward_model.kind=function",
        "reward_model.function=tests.reward_functions:fails_on_rank_3",
    )
    out = run_job("jobs.remax", "--json", f"run.root={tmp_path}", *JOB, *args, env=_repo_path())
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    states = _wait_done(rec["job_id"], timeout=600)
    assert [s for s, _ in states] == ["FAILED"], states
    run_dir = Path(rec["run_dir"])
    records = [json.loads(x) for x in (run_dir / "failures.jsonl").read_text().splitlines()]
    assert [(r["class"], r["rank"]) for r in records] == [("exception", 3)], records
    assert "rank 3" in records[0]["reason"]


def test_a_requeue_racing_a_cancel_leaves_the_job_cancelled(tmp_path):
    """``scancel`` during the stop path: the job's own requeue comes after the cancel and must
    not bring it back (``scontrol requeue Incomplete``)."""
    from remax import preemption

    out = subprocess.run(
        ["sbatch", "--parsable", "--requeue", "-o", str(tmp_path / "log"), "--wrap", "sleep 300"],
        capture_output=True,
        text=True,
        check=True,
    )
    job = out.stdout.strip().split(";")[0]
    _wait_running(job, timeout=600)  # after the jobs of the tests before
    subprocess.run(["scancel", job], check=True)
    os.environ["SLURM_JOB_ID"] = job  # as inside the job, whose stop path requeues itself
    try:
        preemption.requeue(attempts=1, wait_s=0)
    finally:
        del os.environ["SLURM_JOB_ID"]
    time.sleep(8)  # a requeued job would be PENDING (BeginTime) by now, then RUNNING
    assert not subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout
    assert [s for s, _ in _sacct(job)][-1].startswith("CANCELLED")


def _wait_running(job: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True
        )
        if out.stdout.strip() == "RUNNING":
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job} never ran")


def _repo_path() -> dict:
    return {"PYTHONPATH": str(REPO)}  # tests.reward_functions, as a user's own package


def test_usr2_then_a_preemption_each_requeue_and_a_local_run_on_the_live_run_dir_is_refused(
    tmp_path, reference
):
    """A `low` job (PreemptMode=REQUEUE, GraceTime=20) on both nodes. Its first segment gets a
    USR2 from the test (after a local run of the same command on its run dir is refused); its
    second is preempted by a `high` job that needs whole nodes, whose kill comes GraceTime after
    the signal: each save fits, one requeue each, and the export is the uninterrupted one."""
    rec = _submit(tmp_path, *TWO_BY_TWO, *PACED, "cluster.partition=low")
    run_dir = Path(rec["run_dir"])
    _wait_for(run_dir, "checkpoints/step_8", timeout=600)
    # The same command without cluster= maps to the same run dir (cluster keys are not part of
    # the signature): it must exit 2 naming the job, touching nothing.
    local = [a for a in (*JOB, *TWO_BY_TWO, *PACED) if not a.startswith("cluster")]
    before = sorted(p.name for p in run_dir.iterdir())
    out = run_job("jobs.remax", f"run.root={tmp_path}", *local, check=False, env=_repo_path())
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"live Slurm job {rec['job_id']}" in out.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in run_dir.iterdir()) == before
    subprocess.run(["scancel", "--signal=USR2", rec["job_id"]], check=True)
    _wait_for(run_dir, "checkpoints/step_16", timeout=600)  # saved in the second segment
    high = subprocess.run(
        ["sbatch", "--parsable", "-p", "high", "-N2", "--exclusive", "-o", "/dev/null"]
        + ["--wrap", "sleep 2"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    states = [s for s, _ in _wait_done(rec["job_id"], timeout=900)]
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", states
    assert set(states[1:-1]) <= {"REQUEUED", "PREEMPTED"} and len(states) >= 3, states
    assert _wait_done(high)[-1][0] == "COMPLETED"
    segments = [json.loads(x) for x in (run_dir / "segments.jsonl").read_text().splitlines()]
    assert segments[0]["stop_reason"] == "usr2" and segments[-1]["stop_reason"] == "completed"
    assert segments[2]["resume_step"] == segments[1]["checkpoints"][-1] >= 16, segments
    _assert_same_export(reference["run_dir"], rec["run_dir"])


def test_one_hung_rank_is_one_hang_record_one_requeue_then_completion(tmp_path):
    """Rank 3's reward call never returns in the first segment; the other ranks wait for it in
    the next collective, where their watchdogs fire too. One record, one requeue, and the
    second segment finishes the run identically."""
    hang = (
        *TWO_BY_TWO,
        "cluster.watchdog_s=25",  # startup gets twice that (4 ranks load on 2 cores in ~20 s)
        "reward_model.kind=function",
        "reward_model.function=tests.reward_functions:hangs_on_rank_3_once",
    )
    out = run_job("jobs.remax", "--json", f"run.root={tmp_path}", *JOB, *hang, env=_repo_path())
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    states = _wait_done(rec["job_id"], timeout=900)
    assert [s for s, _ in states] == ["REQUEUED", "COMPLETED"], states
    run_dir = Path(rec["run_dir"])
    records = [json.loads(x) for x in (run_dir / "failures.jsonl").read_text().splitlines()]
    assert [r["class"] for r in records] == ["hang"], records
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 24


def _state(job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip()


def _wait_state(job: str, states: set[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _state(job) in states:
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job} never reached {states}: {_sacct(job)}")


def test_a_lost_node_requeues_waits_for_it_and_finishes_identically(tmp_path, reference):
    """The second node dies mid-step (its slurmd and tasks SIGKILLed, as a machine that lost
    power): the job is requeued, waits while the node is down, and when it returns finishes
    with the uninterrupted run's export. The surviving ranks record one ``node_failure``; Slurm
    requeues the job (NODE_FAIL). Seen here: ~30 s after the node returns, slurmctld's retried
    kill of the lost incarnation reaches it and SIGTERMs the new one (same job id), which then
    checkpoints and requeues like any SIGTERM: NODE_FAIL, REQUEUED, COMPLETED; or, once the new
    one has finished, finds it leaving and is ignored: NODE_FAIL, COMPLETED."""
    rec = _submit(tmp_path, *TWO_BY_TWO, *LIGHTLY_PACED)
    run_dir = Path(rec["run_dir"])
    _wait_for(run_dir, "checkpoints/step_8", timeout=600)
    second = sorted(_nodes(rec["job_id"]))[1]  # the batch script runs on the first
    try:
        subprocess.run([*LOCAL_SLURM, "node-down", second], check=True, capture_output=True)
        # Bring it back only once Slurm knows it is gone (SlurmdTimeout): a node that returns
        # before that never was lost, as far as slurmctld can tell.
        _wait_node(second, "down", timeout=120)
        _wait_state(rec["job_id"], {"PENDING"}, timeout=120)
        time.sleep(5)
        assert _state(rec["job_id"]) == "PENDING", "it must wait for the lost node"
        # Held while the node returns: a job allocated in the instant its slurmd re-registers
        # gets a half allocation on this build (srun: "2 != 1" nodes); a real node reboots first.
        subprocess.run(["scontrol", "hold", rec["job_id"]], check=True)
    finally:
        subprocess.run([*LOCAL_SLURM, "node-up", second], check=True, capture_output=True)
    _wait_node(second, "idle", timeout=60)
    time.sleep(5)
    subprocess.run(["scontrol", "release", rec["job_id"]], check=True)
    states = [s for s, _ in _wait_done(rec["job_id"], timeout=900)]
    assert states[-1] == "COMPLETED" and set(states[:-1]) <= {"REQUEUED", "NODE_FAIL"}, states
    assert len(states) >= 2, states
    records = [json.loads(x) for x in (run_dir / "failures.jsonl").read_text().splitlines()]
    assert [r["class"] for r in records] == ["node_failure"], records
    _assert_same_export(reference["run_dir"], rec["run_dir"])


LOCAL_SLURM = ["bash", str(REPO / "scripts" / "local_slurm.sh")]


def _wait_node(node: str, state: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True, text=True
        )
        if out.stdout.strip().startswith(state):
            return
        time.sleep(1)
    raise AssertionError(f"node {node} never became {state}")
