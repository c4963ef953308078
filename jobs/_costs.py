"""What a run has cost, from Slurm's accounting, and the budget caps that use it.

Each segment of a job (every requeue is one) is billed for the GPUs Slurm allocated to it
(``sacct`` ``AllocTRES``: ``gres/gpu=N``), not for what the last config asked, times its elapsed
time rounded up to ``cluster.billing_granularity_s``. A site whose ``AccountingStorageTRES`` does
not track ``gres/gpu`` reports no GPUs at all: such a segment is billed for the GPUs its
submission record asked for, never for 0. An ``sacct`` failure is an error, never a cost of 0.

Caps (``cluster.budget``): one run across all its requeues and resubmissions, and a budget scope
(a pipeline's stages, a sweep's elements; ``<run.root>/budgets/*.json``) across all its members
together. Both are checked at submission and again when each segment starts
(:mod:`jobs._budget`), where a member still running elsewhere counts for its whole time limit: it
may yet run that long, and the cap must hold whatever it does.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

from remax.fileio import write_json

FIELDS = "JobID,State,ElapsedRaw,AllocTRES"


class SacctError(RuntimeError):
    """``sacct`` did not answer: costs are unknown, not zero."""


def allocated_gpus(alloc_tres: str) -> int | None:
    """GPUs in an ``AllocTRES`` string: ``billing=4,cpu=32,gres/gpu=4,node=1`` → 4 (typed
    entries such as ``gres/gpu:a800=4`` count once, beside the untyped total when both appear);
    None when it names no GPU at all (the site does not account ``gres/gpu``: unknown, not 0)."""
    total = re.search(r"(?:^|,)gres/gpu=(\d+)", alloc_tres)
    if total:
        return int(total.group(1))
    typed = re.findall(r"(?:^|,)gres/gpu:[^=,]+=(\d+)", alloc_tres)
    return sum(int(n) for n in typed) if typed else None


def sacct_segments(job_ids: list[str]) -> dict[str, list[dict]]:
    """``{job_id: [{state, elapsed_s, gpus}, ...]}``, one entry per segment (``-D``); ``gpus`` is
    None where accounting names no GPU. Raises :class:`SacctError`."""
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


def billed_hours(segments: list[dict], granularity_s: int, gpus: int = 0) -> float:
    """GPU-hours billed: each segment's elapsed time rounded up to the billing granularity, on
    the GPUs accounting saw, or ``gpus`` (what the job asked for) where it saw none."""
    g = max(1, int(granularity_s))
    seen = [(s["elapsed_s"], gpus if s["gpus"] is None else s["gpus"]) for s in segments]
    return sum(math.ceil(elapsed / g) * g * n for elapsed, n in seen) / 3600


def history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "submissions.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_cost(records: list[dict], segments: dict[str, list[dict]]) -> tuple[float, float]:
    """(GPU-hours, cost) of a run's records, each job at the rate it was submitted with."""
    hours = cost = 0.0
    for r in records:
        segs = segments.get(r.get("job_id"), [])
        h = billed_hours(segs, r.get("billing_granularity_s", 1), r.get("gpus") or 0)
        hours += h
        cost += h * (r.get("gpu_hour_rate") or 0.0)
    return hours, cost


# ------------------------------------------------------------------ caps
def write_scope(root: Path, name: str, cap: float | None, run_dirs: list) -> Path:
    """``<root>/budgets/<name>.json``: the runs that share one cap (a pipeline, a sweep). Each
    member's submission record points at it (``budget_scope``); a resubmission rewrites it."""
    path = Path(root) / "budgets" / f"{name}.json"
    members = sorted({str(d) for d in run_dirs})
    return write_json(path, {"name": name, "cap": cap, "run_dirs": members})


def read_scope(path) -> dict | None:
    """A scope file's content; None when there is none (a run on its own)."""
    if not path or not Path(path).exists():
        return None
    return json.loads(Path(path).read_text())


def scope_of(run_dir: Path) -> dict | None:
    """The budget scope a run's latest submission belongs to, or None (a run on its own)."""
    records = history(run_dir)
    return read_scope(records[-1].get("budget_scope") if records else None)


def _bound_running(records: list[dict], segments: dict, own: str | None) -> dict:
    """The caller's own RUNNING segment left out (``next_cost`` stands for it); every other
    RUNNING segment counted for its whole time limit (it may yet run that long)."""
    bounded = {}
    for r in records:
        job, limit = r["job_id"], 60 * (r.get("time_min") or 0)
        segs = segments.get(job, [])
        if job == own:
            bounded[job] = [s for s in segs if s["state"] not in ("RUNNING", "PENDING")]
        else:
            bounded[job] = [
                {**s, "elapsed_s": max(s["elapsed_s"], limit)} if s["state"] == "RUNNING" else s
                for s in segs
            ]
    return bounded


def budget_problem(
    run_dir: Path,
    cluster,
    next_cost: float,
    *,
    job_id: str | None = None,
    scope: dict | None = None,
    sacct=sacct_segments,
) -> str | None:
    """Why one more segment of ``run_dir`` (worth ``next_cost`` at most) would break a cap: the
    run's ``cluster.budget``, or its scope's cap summed over every member; None if it fits.
    ``scope``: the scope being submitted (default: the one the run's record names). ``sacct``:
    :func:`sacct_segments` or a stand-in. Raises :class:`SacctError` (unknown is not 0)."""
    scope = scope or scope_of(run_dir)
    caps = []
    if cluster.budget is not None:
        caps.append((f"run {run_dir}", cluster.budget, [str(run_dir)]))
    if scope and scope.get("cap") is not None:
        members = sorted({*scope["run_dirs"], str(run_dir)})
        caps.append((f"{scope['name']} ({len(members)} runs)", scope["cap"], members))
    return cap_problem(caps, next_cost, cluster.currency, job_id=job_id, sacct=sacct)


def cap_problem(caps: list, next_cost: float, currency: str, *, job_id=None, sacct=sacct_segments):
    """The first of ``caps`` (``(label, cap, run dirs)``) that what its runs have cost plus
    ``next_cost`` would exceed, as a message; None if all fit. One sacct query for them all."""
    if not caps:
        return None  # no cap: no sacct query at all
    records = {d: [r for r in history(d) if r.get("job_id")] for _, _, ds in caps for d in ds}
    flat = [r for recs in records.values() for r in recs]
    segments = _bound_running(flat, sacct(sorted({r["job_id"] for r in flat})), job_id)
    for label, cap, members in caps:
        so_far = sum(run_cost(records[d], segments)[1] for d in members)
        if so_far + next_cost > cap:
            return (
                f"{label} has cost {so_far:.2f} {currency} over its jobs and requeues (a "
                f"member still running counts for its whole time limit); {next_cost:.2f} more "
                f"would exceed cluster.budget={cap}: raise the budget or lower cluster.time_min"
            )
    return None


def over_budget(
    run_dir: Path,
    cluster,
    next_cost: float,
    *,
    job_id: str | None = None,
    scope: dict | None = None,
) -> str | None:
    """:func:`budget_problem` at submission: unknown spending (sacct down) refuses too, as a
    cap that fails open is no cap."""
    try:
        return budget_problem(run_dir, cluster, next_cost, job_id=job_id, scope=scope)
    except SacctError as exc:
        return f"{exc}: cannot check cluster.budget={cluster.budget} for {run_dir}"


def scope_refusal(scope: dict | None, next_cost: float, currency: str) -> str | None:
    """At submission: why what a scope's runs have cost plus ``next_cost`` (the estimates of what
    is about to be submitted) breaks its cap, or None; sacct down refuses too."""
    if not scope or scope.get("cap") is None:
        return None
    members = scope["run_dirs"]
    caps = [(f"{scope['name']} ({len(members)} runs)", scope["cap"], members)]
    try:
        return cap_problem(caps, next_cost, currency)
    except SacctError as exc:
        return f"{exc}: cannot check cluster.budget={scope['cap']} for {scope['name']}"
