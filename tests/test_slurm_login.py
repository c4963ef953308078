"""One job per run dir, the submitted code, graceful cancel: against the real local Slurm.

Skipped only when ``sbatch`` is absent and REMAX_REQUIRE_SLURM is not 1 (see tests/test_slurm.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_job
from test_slurm import JOB, _wait_done

from jobs._snapshot import code_files

pytestmark = pytest.mark.slurm
LONG = [*JOB, "log.wandb_mode=disabled", "train.max_steps=300", "train.epochs=10"]


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def _steps(run_dir: Path) -> list[int]:
    """Logged steps; a line still being written is skipped, not an error."""
    path = run_dir / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            continue
    return steps


def _wait_step(run_dir: Path, step: int, timeout: float = 600) -> None:
    # Generous: on the shared 2-core test cluster a job may pend behind others for minutes.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(s >= step for s in _steps(run_dir)):
            return
        time.sleep(0.5)
    raise AssertionError(f"{run_dir} never reached step {step}")


def test_one_job_per_run_dir(tmp_path):
    cmd = [sys.executable, "-m", "jobs.remax", "--json", f"run.root={tmp_path}", *LONG]
    # Two submissions of one config at the same moment: the lock serialises check → sbatch →
    # record, so the second sees the first's live job.
    procs = [
        subprocess.Popen(
            cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    ok = [o for o in outs if o[0] == 0]
    refused = [o for o in outs if o[0] != 0]
    assert len(ok) == 1 and len(refused) == 1, outs
    rec = _last_json(ok[0][1])
    assert refused[0][0] == 2 and rec["job_id"] in refused[0][2]
    run_dir = Path(rec["run_dir"])
    try:
        # squeue failing (a shim on PATH): whether the job is live is unknown, so refuse.
        shim = tmp_path / "bin"
        shim.mkdir()
        (shim / "squeue").write_text(
            "#!/bin/sh\necho 'slurm_load_jobs error: Socket timed out' >&2\nexit 1\n"
        )
        (shim / "squeue").chmod(0o755)
        broken = subprocess.run(
            cmd,
            cwd=REPO,
            env=_env(PATH=f"{shim}:{os.environ['PATH']}"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (
            broken.returncode == 2
            and "squeue" in broken.stderr
            and "nothing was submitted" in broken.stderr
        )
        # A second job started by hand (plain sbatch, no records) on the live run dir.
        _wait_step(run_dir, 1)
        before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.is_file()}
        lease = (run_dir / "lease.json").read_text()
        hand = " ".join(
            [
                sys.executable,
                "-u",
                "-m",
                "jobs.remax",
                "cluster.backend=local",
                f"run.root={tmp_path}",
                *LONG,
            ]
        )
        out_file = tmp_path / "hand.out"
        sub = subprocess.run(
            [
                "sbatch",
                "--parsable",
                "--partition=debug",
                f"--output={out_file}",
                f"--wrap=srun {hand}",
            ],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            check=True,
        )
        hand_id = sub.stdout.strip().split(";")[0]
        states = _wait_done(hand_id, timeout=600)
        assert states[-1][0] == "COMPLETED", states  # exits cleanly: no failure, no requeue
        assert f"owned by live job {rec['job_id']}" in out_file.read_text()
        assert (run_dir / "lease.json").read_text() == lease
        for name in ("config.yaml", "submission.json", "submissions.jsonl", "lease.json"):
            assert (run_dir / name).stat().st_mtime_ns == before[name], name
    finally:
        subprocess.run(["scancel", rec["job_id"]], check=False)
    _wait_done(rec["job_id"])


def test_requeued_job_runs_the_submitted_code(tmp_path):
    src = tmp_path / "src"
    for rel in code_files(REPO):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    env = _env(PYTHONPATH=str(src))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.remax",
            "--json",
            f"run.root={tmp_path / 'runs'}",
            *JOB,
            "log.wandb_mode=disabled",
            "train.max_steps=24",  # short: the point is the second segment's code, not training
        ],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    rec = _last_json(out.stdout)
    run_dir = Path(rec["run_dir"])
    _wait_step(run_dir, 2)
    # Edit the checkout between submission and the requeue: importing it now fails.
    stage = src / "jobs" / "_stage.py"
    stage.write_text('raise RuntimeError("edited code ran")\n' + stage.read_text())
    subprocess.run(["scancel", "--signal=USR2", rec["job_id"]], check=True)
    states = _wait_done(rec["job_id"], timeout=900)
    assert states[-1][0] == "COMPLETED" and any(s == "REQUEUED" for s, _ in states), states
    log = "".join(p.read_text() for p in (run_dir / "slurm").glob("*_log.err"))
    assert "edited code ran" not in log and "resumed remax from" in log
    snapshot = Path(rec["code_dir"])
    assert log.count(f"running code {rec['code_hash']} from {snapshot}") == 2  # both segments
    assert (run_dir / "summary.json").exists()


def test_graceful_cancel_checkpoints_and_does_not_requeue(tmp_path):
    rec = _last_json(run_job("jobs.remax", "--json", f"run.root={tmp_path}", *LONG).stdout)
    run_dir = Path(rec["run_dir"])
    try:
        _wait_step(run_dir, 3)
        out = run_job("jobs.cancel", str(run_dir), "--graceful", "--json")
        assert json.loads(out.stdout)[0]["action"] == "checkpoint, then stop", out.stdout
        states = _wait_done(rec["job_id"], timeout=600)
    finally:  # never leave a 300-step job on the shared test cluster
        subprocess.run(["scancel", rec["job_id"]], check=False)
    assert states[-1][0].startswith("CANCELLED") and "REQUEUED" not in {s for s, _ in states}, (
        states
    )
    steps = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    last = _steps(run_dir)[-1]
    assert steps and steps[-1] == last, (steps, last)  # saved at the step it stopped on
    assert not (run_dir / "stop_requested").exists()
    again = _last_json(run_job("jobs.resume", str(run_dir), "--json").stdout)
    resumed = f"resumed remax from {run_dir / 'checkpoints' / f'step_{steps[-1]}'} "
    try:  # resumable: the next job starts from that checkpoint (no need to train to the end)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            log = "".join(p.read_text() for p in (run_dir / "slurm").glob("*_log.err"))
            if resumed in log:
                break
            time.sleep(1)
        assert resumed in log, log[-2000:]
    finally:
        subprocess.run(["scancel", again["job_id"]], check=False)
    _wait_done(again["job_id"])
