"""One job per run dir: a file lock on the login node, a lease inside the job.

Two jobs on one run dir delete each other's in-progress checkpoints and can publish a torn one, so
ownership is decided twice:

- **At submission** (:func:`submit_lock`): check → sbatch → record runs under an exclusive
  ``flock`` on ``<run_dir>/.submit.lock``, so two submissions started at the same moment see each
  other's record. A job counts as live in every state Slurm still holds it in except the terminal
  ones, and an ``squeue`` that keeps failing refuses the submission rather than guessing "dead".
- **In the job** (:func:`take_lease`): before touching the run dir, every task takes (or renews)
  ``<run_dir>/lease.json`` under the same lock. A job that finds the lease held by another live
  job exits cleanly without touching anything — this covers hand-rendered templates and jobs
  started by ``sbatch`` outside our records.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from remax.fileio import write_json

# States after which Slurm will never run the job again. Everything else (PENDING, RUNNING,
# REQUEUED, REQUEUE_HOLD, REQUEUE_FED, SPECIAL_EXIT, STOPPED, SUSPENDED, RESV_DEL_HOLD, SIGNALING,
# STAGE_OUT, RESIZING, COMPLETING, CONFIGURING, ...) can still write into the run dir.
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "TIMEOUT",
    }
)
SQUEUE_TRIES = 3


class QueueError(RuntimeError):
    """``squeue`` failed: whether a job is live is unknown, so nothing may be submitted."""


def _squeue(job_id: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60
    )


def live_state(job_id: str, tries: int = SQUEUE_TRIES, backoff_s: float = 1.0) -> str | None:
    """The job's state while Slurm may still run it, else None; raises :class:`QueueError`.

    ``squeue -j`` answers "Invalid job id" for a job that left the queue: that is an answer
    ("not live"). Any other failure is retried, then raised.
    """
    error = ""
    for attempt in range(tries):
        try:
            out = _squeue(job_id)
        except (OSError, subprocess.TimeoutExpired) as exc:
            error = str(exc)
        else:
            if out.returncode == 0:
                states = {s.strip().split()[0] for s in out.stdout.split() if s.strip()}
                live = sorted(states - TERMINAL_STATES)
                return live[0] if live else None
            if "invalid job id" in out.stderr.lower():
                return None
            error = (out.stderr or out.stdout).strip().splitlines()[-1:] or [f"rc={out.returncode}"]
            error = error[0]
        if attempt + 1 < tries:
            time.sleep(backoff_s * (attempt + 1))
    raise QueueError(f"squeue -j {job_id} failed {tries} times ({error})")


def live_states(job_ids: list[str], tries: int = SQUEUE_TRIES) -> dict[str, str]:
    """``{job_id: state}`` of the live ones among ``job_ids``, in one ``squeue -r`` call (a sweep
    resubmission checks 100 elements at once); raises :class:`QueueError` like :func:`live_state`."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    if len(ids) == 1:
        state = live_state(ids[0], tries)
        return {ids[0]: state} if state else {}
    cmd = ["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i|%T"]
    error = ""
    for attempt in range(tries):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            error = str(exc)
        else:
            if out.returncode == 0:
                pairs = (line.split("|", 1) for line in out.stdout.splitlines() if "|" in line)
                wanted = set(ids)
                return {j: st for j, st in pairs if j in wanted and st not in TERMINAL_STATES}
            if "invalid job id" in out.stderr.lower():
                # One unknown id fails the whole call: fall back to asking one by one.
                return {j: st for j in ids if (st := live_state(j, tries))}
            error = (out.stderr or out.stdout).strip()[-200:] or f"rc={out.returncode}"
        if attempt + 1 < tries:
            time.sleep(attempt + 1)
    raise QueueError(f"squeue -j {','.join(ids)[:60]}... failed {tries} times ({error})")


@contextlib.contextmanager
def submit_lock(run_dirs: list[Path]):
    """Exclusive lock on each run dir (sorted: two sweeps sharing dirs cannot deadlock)."""
    with contextlib.ExitStack() as stack:
        for run_dir in sorted({Path(d) for d in run_dirs}):
            run_dir.mkdir(parents=True, exist_ok=True)
            handle = stack.enter_context(open(run_dir / ".submit.lock", "a"))
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def current_job_id(environ=None) -> str | None:
    """This job's id as the records spell it: ``<array>_<task>`` for array elements."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def take_lease(run_dir: Path, job_id: str) -> str | None:
    """Take ``run_dir``'s lease for ``job_id``; returns the owning job's id if another live job
    holds it (the caller must then leave the run dir alone), else None."""
    run_dir = Path(run_dir)
    with submit_lock([run_dir]):
        path = run_dir / "lease.json"
        if path.exists():
            try:
                owner = json.loads(path.read_text()).get("job_id")
            except (json.JSONDecodeError, OSError):
                owner = None
            # The lease always holds the records' spelling (current_job_id), so ids compare as text.
            if owner and owner != job_id and live_state(owner):
                return owner
            if owner == job_id:
                return None  # another task of this job, or this job after a requeue
        lease = {"job_id": job_id, "host": socket.gethostname(), "taken_at": time.time()}
        write_json(path, lease)
    return None


def claim(run_dir: Path, stage: str) -> str | None:
    """Inside a Slurm job: take ``run_dir``'s lease; returns the other live owner's job id, if
    any. Outside Slurm (a laptop, a test) nothing is claimed.

    A job started by hand (a rendered template, plain ``sbatch``) also gets a line in the run
    dir's ``submissions.jsonl``, so ``jobs.status`` and ``jobs.cancel`` see it like a submitted one.
    """
    job_id = current_job_id()
    if job_id is None:
        return None
    owner = take_lease(run_dir, job_id)
    if owner is None:
        _record_hand_started(Path(run_dir), stage, job_id)
    return owner


def live_owner(run_dir: Path) -> tuple[str, str] | None:
    """(job id, state) of a live Slurm job that owns ``run_dir`` (its lease or its last
    submission), for a process that is not that job; None on a machine without Slurm. Raises
    :class:`QueueError` when squeue does not answer."""
    run_dir = Path(run_dir)
    if shutil.which("squeue") is None:  # a laptop: no job can own anything here
        return None
    mine = current_job_id()
    for name in ("lease.json", "submission.json"):
        try:
            job = json.loads((run_dir / name).read_text()).get("job_id")
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if job and str(job) != mine and (state := live_state(str(job))):
            return str(job), state
    return None


def _record_hand_started(run_dir: Path, stage: str, job_id: str) -> None:
    with submit_lock([run_dir]):
        history = run_dir / "submissions.jsonl"
        if history.exists() and f'"job_id": "{job_id}"' in history.read_text():
            return
        record = {"stage": stage, "job_id": job_id, "run_dir": str(run_dir), "source": "sbatch"}
        record["submitted_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        with open(history, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        write_json(run_dir / "submission.json", record)


# ------------------------------------------------------------------ graceful stop (jobs.cancel)
STOP_FILE = "stop_requested"


def request_stop(run_dir: Path) -> None:
    """Ask the run's job to checkpoint and stop for good (``jobs.cancel --graceful``): the file
    tells the job, at its next checkpoint-and-requeue, to cancel itself instead of requeueing."""
    (Path(run_dir) / STOP_FILE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")


def clear_stop(run_dir: Path) -> None:
    (Path(run_dir) / STOP_FILE).unlink(missing_ok=True)


def stop_requested(run_dir: Path) -> bool:
    """Whether ``jobs.cancel --graceful`` asked this run to stop for good (a stat: signal-safe)."""
    return (Path(run_dir) / STOP_FILE).exists()


def stop_for_good(run_dir: Path) -> bool:
    """In the job, after a checkpoint: True (and the job cancelled) when a graceful cancel asked
    for it; the caller then returns without requeueing. The state ends CANCELLED; resumable."""
    if not stop_requested(run_dir):
        return False
    job_id = current_job_id()
    if os.environ.get("SLURM_PROCID", "0") == "0":
        clear_stop(run_dir)
        if job_id:
            subprocess.run(["scancel", job_id], check=False, timeout=60)
    return True
