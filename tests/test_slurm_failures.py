"""Endings other than a clean USR2 at a step boundary, on the real local Slurm (issue #12).

Same skip rule as ``test_slurm.py`` (whose helpers these use): skipped only without ``sbatch``
and without REMAX_REQUIRE_SLURM=1.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import run_job
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


def test_exception_fails_once_with_failure_json_and_no_requeue(tmp_path):
    args = [a for a in JOB if not a.startswith("eval_prompts")]  # a remax-only key
    out = run_job(
        "jobs.reward_model",
        f"run.root={tmp_path}",
        *args,
        "log.wandb_mode=disabled",
        "train.max_steps=4",
        "data.source=/nonexistent/pairs.jsonl",
    )
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    states = _wait_done(rec["job_id"])
    assert [s for s, _ in states] == ["FAILED"], states  # one segment: never requeued
    info = json.loads((Path(rec["run_dir"]) / "failure.json").read_text())
    assert info["class"] == "exception" and "nonexistent" in info["reason"], info
    assert info["job"] == rec["job_id"] and info["restart"] == 0
