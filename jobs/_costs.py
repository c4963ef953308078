"""What a run has cost, from Slurm's accounting, and the budget caps that use it.

Each segment of a job (every requeue is one) is billed for the GPUs Slurm allocated to it
(``sacct`` ``AllocTRES``: ``gres/gpu=N``), not for what the last config asked, times its elapsed
time rounded up to ``cluster.billing_granularity_s``. An ``sacct`` failure is an error, never a cost
of 0. Caps: ``cluster.budget`` bounds one run across all its requeues and resubmissions (checked
at submission and again when each segment starts) and a sweep's or pipeline's total at submission.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

FIELDS = "JobID,State,ElapsedRaw,AllocTRES"


class SacctError(RuntimeError):
    """``sacct`` did not answer: costs are unknown, not zero."""


def allocated_gpus(alloc_tres: str) -> int:
    """GPUs in an ``AllocTRES`` string: ``billing=4,cpu=32,gres/gpu=4,node=1`` → 4 (typed
    entries such as ``gres/gpu:a800=4`` count once, beside the untyped total when both appear)."""
    total = re.search(r"(?:^|,)gres/gpu=(\d+)", alloc_tres)
    if total:
        return int(total.group(1))
    return sum(int(n) for n in re.findall(r"(?:^|,)gres/gpu:[^=,]+=(\d+)", alloc_tres))


def sacct_segments(job_ids: list[str]) -> dict[str, list[dict]]:
    """``{job_id: [{state, elapsed_s, gpus}, ...]}``, one entry per segment (``-D``)."""
    if not job_ids:
        return {}
    cmd = ["sacct", "-j", ",".join(job_ids), "-D", "-X", "-n", "--parsable2", "-S", "2000-01-01"]
    try:
        out = subprocess.run([*cmd, "-o", FIELDS], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SacctError(f"sacct failed ({exc})") from None
    if out.returncode != 0:
        raise SacctError(f"sacct failed (rc {out.returncode}: {out.stderr.strip()[:200]})")
    segments: dict[str, list[dict]] = {}
    for line in out.stdout.splitlines():
        parts = line.split("|")
        if len(parts) != 4:
            continue
        job, state, elapsed, tres = parts
        segments.setdefault(job, []).append(
            {
                "state": state.split()[0],
                "elapsed_s": int(elapsed or 0),
                "gpus": allocated_gpus(tres),
            }
        )
    return segments


def billed_hours(segments: list[dict], granularity_s: int) -> float:
    """GPU-hours billed: each segment's elapsed time rounded up to the billing granularity."""
    g = max(1, int(granularity_s))
    return sum(math.ceil(s["elapsed_s"] / g) * g * s["gpus"] for s in segments) / 3600


def history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "submissions.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_cost(records: list[dict], segments: dict[str, list[dict]]) -> tuple[float, float]:
    """(GPU-hours, cost) of a run's records, each job at the rate it was submitted with."""
    hours = cost = 0.0
    for r in records:
        h = billed_hours(segments.get(r.get("job_id"), []), r.get("billing_granularity_s", 1))
        hours += h
        cost += h * (r.get("gpu_hour_rate") or 0.0)
    return hours, cost


def spent(run_dir: Path, *, exclude_running: str | None = None) -> float:
    """What a run has cost so far (all jobs, all requeues); ``exclude_running``: a job id whose
    RUNNING segment (the caller's own, just started) is left out. Raises :class:`SacctError`."""
    records = [r for r in history(run_dir) if r.get("job_id")]
    segments = sacct_segments(sorted({r["job_id"] for r in records}))
    if exclude_running and exclude_running in segments:
        segments[exclude_running] = [
            s for s in segments[exclude_running] if s["state"] not in ("RUNNING", "PENDING")
        ]
    return run_cost(records, segments)[1]


def over_budget(
    run_dir: Path, cluster, next_cost: float, *, job_id: str | None = None
) -> str | None:
    """Why one more segment (worth ``next_cost`` at most) would break ``cluster.budget`` for this
    run, or None. Unknown spending (sacct down) refuses too: a cap that fails open is no cap."""
    if cluster.budget is None:
        return None
    try:
        so_far = spent(run_dir, exclude_running=job_id)
    except SacctError as exc:
        return f"{exc}: cannot check cluster.budget={cluster.budget} for {run_dir}"
    if so_far + next_cost > cluster.budget:
        return (
            f"run {run_dir} has cost {so_far:.2f} {cluster.currency} over its jobs and requeues; "
            f"one more segment (≤ {next_cost:.2f}) would exceed cluster.budget={cluster.budget}: "
            "raise the budget or lower cluster.time_min"
        )
    return None
