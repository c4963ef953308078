"""Endings other than a clean USR2 at a step boundary, on the real local Slurm (issue #12).

Same skip rule as ``test_slurm.py`` (whose helpers these use): skipped only without ``sbatch``
and without REMAX_REQUIRE_SLURM=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, run_job
from test_slurm import JOB, _assert_same_export, _status, _submit, _wait_done, _wait_for

pytestmark = pytest.mark.slurm

# 6 steps, checkpoints at 3 and 6; the final evaluation (8 batches of 8 prompts, each checked
# for a stop) starts right after step_6 appears.
SHORT = ("train.max_steps=6", "checkpoint.every_steps=3", "log.wandb_mode=disabled")


def test_usr2_during_the_final_evaluation_requeues_instead_of_timing_out(tmp_path):
    ref = _submit(tmp_path / "ref", *SHORT)
    rec = _submit(tmp_path / "eval", *SHORT)
    run_dir = Path(rec["run_dir"])
    _wait_for(run_dir, "checkpoints/step_6", timeout=600)  # the final save precedes the eval
    subprocess.run(["scancel", "--signal=USR2", rec["job_id"]], check=True)
    states = _wait_done(rec["job_id"], timeout=600)
    assert [s for s, _ in states] == ["REQUEUED", "COMPLETED"], states
    _wait_done(ref["job_id"], timeout=600)
    _assert_same_export(ref["run_dir"], rec["run_dir"])
    segments = [json.loads(line) for line in (run_dir / "segments.jsonl").read_text().splitlines()]
    assert [s["stop_reason"] for s in segments] == ["usr2", "completed"], segments
    assert segments[0]["checkpoints"] == [3, 6]
    assert segments[1]["checkpoints"] == [], "step 6 is never saved twice"
    assert segments[1]["resume_step"] == 6
    [row] = _status(tmp_path / "eval")
    assert row["billed_gpu_h"] >= row["productive_gpu_h"] > 0 and row["wasted_gpu_h"] > 0
    assert row["top_waste"] is not None and row["failure_class"] is None


def test_usr2_as_the_job_finishes_leaves_it_completed(tmp_path):
    """The time limit's USR2 lands as the last segment ends: once while the export and the
    summary are written, once in the interpreter's teardown. Found by the 2×2 time-limit test:
    the task died of the second ("killed by USR2"), the finished job ended FAILED."""
    rec = _submit(tmp_path, "train.max_steps=4", "log.wandb_mode=offline")
    run_dir = Path(rec["run_dir"])
    _wait_for(run_dir, "summary.json", timeout=600)
    for _ in range(2):
        subprocess.run(["scancel", "--signal=USR2", rec["job_id"]], check=True)
        time.sleep(0.5)
    assert [s for s, _ in _wait_done(rec["job_id"], timeout=600)] == ["COMPLETED"]
    segments = [json.loads(line) for line in (run_dir / "segments.jsonl").read_text().splitlines()]
    assert [s["stop_reason"] for s in segments] == ["completed"], segments
    assert not (run_dir / "failure.json").exists()


def test_exception_fails_once_with_failure_json_and_no_requeue(tmp_path):
    args = [a for a in JOB if not a.startswith("eval_prompts")]  # a remax-only key
    out = run_job(
        "jobs.reward_model",
        "--json",
        f"run.root={tmp_path}",
        *args,
        "log.wandb_mode=disabled",
        "train.max_steps=4",
        "data.source=/nonexistent/pairs.jsonl",
    )
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    states = _wait_done(rec["job_id"])
    assert [s for s, _ in states] == ["FAILED"], states  # one segment: never requeued
    # A missing data file is bad input (#11): one `error:` line and exit 2 before the run dir is
    # touched, so no failure.json either (an exception in training: no Slurm test yet).
    assert not (Path(rec["run_dir"]) / "failure.json").exists()
    assert not (Path(rec["run_dir"]) / "checkpoints").exists()


def test_exception_in_training_fails_once_with_failure_json_and_no_requeue(tmp_path):
    """A reward function that raises on a row while ReMax trains (user code failing mid-run): the
    job ends FAILED in one segment, never requeued, with failure.json class `exception` naming the
    row, and one `error:` line at the end of its log."""
    out = run_job(
        "jobs.remax",
        "--json",
        f"run.root={tmp_path}",
        *JOB,
        "log.wandb_mode=disabled",
        "reward_model.kind=function",
        "reward_model.function=tests.reward_functions:fails_on_z",
        "data.max_response_len=16",  # 34 symbols × 16 tokens × 8 rows: some answer has a z
        env={"PYTHONPATH": str(REPO)},  # the function's module, as a user's own package
    )
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    states = _wait_done(rec["job_id"])
    assert [s for s, _ in states] == ["FAILED"], states  # one segment: never requeued
    run_dir = Path(rec["run_dir"])
    info = json.loads((run_dir / "failure.json").read_text())
    assert info["class"] == "exception" and "fails_on_z failed on row" in info["reason"], info
    [segment] = _segments(run_dir)
    assert segment["stop_reason"] == "failed" and segment["failure_class"] == "exception"
    err = "".join(p.read_text() for p in (run_dir / "slurm").glob("*_log.err"))
    ours = [line for line in err.splitlines() if not line.startswith("srun: ")]  # srun's own after
    assert ours[-1].startswith("error: reward function") and "Traceback" not in err, err[-2000:]


def _tiny_export(root: Path) -> str:
    import torch

    from remax.models.tiny import build_tokenizer, llama_config, tiny_policy

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = tiny_policy(
        llama_config(
            len(tok),
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=64,
        )
    )
    model.save_pretrained(root / "export")
    tok.save_pretrained(root / "export")
    return str(root / "export")


def test_evaluate_stage_stopped_mid_answers_requeues_and_resumes_them(tmp_path):
    """USR2 (the time-limit warning) while the evaluate stage answers: its done batches stay in
    partial/, the job requeues, and the answers equal an uninterrupted evaluation's."""
    policy = _tiny_export(tmp_path / "policy")
    args = [
        "cluster=local_slurm",
        f"policies=[{policy}]",
        "names=[a]",
        "num_prompts=128",
        "batch_size=4",
        "log.progress=false",
        "log.wandb_mode=disabled",
    ]
    recs = {}
    for name in ("ref", "usr2"):
        out = run_job("jobs.evaluate", "--json", f"run.root={tmp_path / name}", *args)
        recs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    run_dir = Path(recs["usr2"]["run_dir"])
    partial = run_dir / "partial" / "a.jsonl"
    deadline = time.monotonic() + 600
    while not (partial.exists() and partial.read_text().count("\n") >= 8):  # 2 batches done
        assert time.monotonic() < deadline, "the evaluation never wrote a batch"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", recs["usr2"]["job_id"]], check=True)
    states = _wait_done(recs["usr2"]["job_id"], timeout=600)
    assert [s for s, _ in states] == ["REQUEUED", "COMPLETED"], states
    _wait_done(recs["ref"]["job_id"], timeout=600)
    answers = [(Path(r["run_dir"]) / "answers.jsonl").read_text() for r in recs.values()]
    assert answers[0] == answers[1]
    segments = [json.loads(line) for line in (run_dir / "segments.jsonl").read_text().splitlines()]
    assert [s["stop_reason"] for s in segments] == ["usr2", "completed"], segments


def test_hung_rank_is_requeued_once_then_stopped_with_failure_json_and_stacks(tmp_path):
    """A read that never returns (a FIFO nobody writes: a stuck NFS mount) in the data loading:
    the watchdog ends the segment after its startup budget (2 × cluster.watchdog_s), dumps the
    stacks, and the policy requeues once (cluster.max_failure_requeues=1), then stops."""
    fifo = tmp_path / "pairs.jsonl"
    os.mkfifo(fifo)
    args = [a for a in JOB if not a.startswith("eval_prompts")]  # a remax-only key
    out = run_job(
        "jobs.reward_model",
        "--json",
        f"run.root={tmp_path / 'runs'}",
        *args,
        "log.wandb_mode=disabled",
        f"data.source={fifo}",
        "cluster.watchdog_s=10",
        "cluster.max_failure_requeues=1",
        timeout=120,
    )
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    states = _wait_done(rec["job_id"], timeout=600)
    # sacct reports 0:0 for a requeued segment; the last one carries the watchdog's status 4.
    assert states == [("REQUEUED", "0:0"), ("FAILED", "4:0")], states
    run_dir = Path(rec["run_dir"])
    info = json.loads((run_dir / "failure.json").read_text())
    assert info["class"] == "hang" and info["phase"] == "startup" and info["restart"] == 1, info
    assert "_json_lines" in Path(info["stacks"]).read_text()  # where it was stuck
    assert len(list((run_dir / "failure").glob("stacks-*.txt"))) == 2


def _segments(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "segments.jsonl").read_text().splitlines()]


def test_sigterm_of_a_running_job_checkpoints_and_requeues_bit_identical(tmp_path, slurm_reference):
    """SIGTERM while Slurm still says RUNNING (a preemption's GraceTime signal on sites without
    preempt_send_user_signal; here `scancel --signal=TERM`): checkpoint, requeue, identical run.
    A plain `scancel` (COMPLETING first) still cancels: test_slurm.py, live-job test."""
    ref, inputs = slurm_reference
    rec = _submit(tmp_path / "term", *inputs)
    run_dir = Path(rec["run_dir"])
    _wait_for(run_dir, "checkpoints/step_10")
    subprocess.run(["scancel", "--signal=TERM", rec["job_id"]], check=True)
    states = _wait_done(rec["job_id"])
    assert [s for s, _ in states] == ["REQUEUED", "COMPLETED"], states
    assert [s["stop_reason"] for s in _segments(run_dir)] == ["sigterm", "completed"]
    _wait_done(ref["job_id"])
    _assert_same_export(ref["run_dir"], rec["run_dir"])
