"""The budget check when a job segment starts, before it spends anything.

Every segment (the first one and every requeue) asks whether one more segment at its upper bound
still fits the caps of :func:`jobs._costs.budget_problem`: the run's own ``cluster.budget`` and the
cap its pipeline or sweep shares. Three outcomes:

- it fits: the segment runs;
- it does not: the job ends at once, before loading anything, and is not requeued; the job fails,
  so ``--kill-on-invalid-dep`` cancels the stages waiting on it;
- ``sacct`` does not answer (slurmdbd restarting, a busy controller): the spending is unknown,
  which is neither "fits" (a cap that fails open is no cap) nor "over" (a transient outage must not
  end a run for good). After a few short retries the segment requeues itself: it holds no
  checkpoint yet, so nothing is lost, and the GPUs are not kept billed while sacct is away.
"""

from __future__ import annotations

import os
import sys
import time
from typing import NamedTuple

from jobs._costs import SacctError, budget_problem, sacct_segments
from remax import preemption

RETRY_WAIT_S = 5.0
"""Wait before sacct's n-th retry: n × this (seconds while the allocation is billed)."""


class Decision(NamedTuple):
    action: str  # "run", "stop" (over a cap) or "requeue" (sacct did not answer)
    reason: str | None = None


def decide(
    run_dir,
    cluster,
    next_cost: float,
    *,
    job_id: str | None,
    sacct=sacct_segments,
    attempts: int = 3,
    sleep=None,
) -> Decision:
    """What a segment starting in ``run_dir`` does, asking ``sacct`` up to ``attempts`` times
    (:data:`RETRY_WAIT_S` × try number between tries). ``sacct``, ``sleep``: stand-ins."""
    for attempt in range(1, attempts + 1):
        try:
            reason = budget_problem(run_dir, cluster, next_cost, job_id=job_id, sacct=sacct)
        except SacctError as exc:
            error = exc
            if attempt < attempts:
                (sleep or time.sleep)(RETRY_WAIT_S * attempt)
            continue
        return Decision("stop", reason) if reason else Decision("run")
    return Decision(
        "requeue",
        f"{error} {attempts} times: cannot check cluster.budget for {run_dir}, so this segment "
        "spends nothing and requeues itself to check again",
    )


def check_segment(run_dir, cluster, next_cost: float, *, job_id: str | None, requeue=None, **kw):
    """Apply :func:`decide` on rank 0 (one sacct query per segment, and no two ranks deciding
    differently: when rank 0 exits, ``srun --kill-on-bad-exit`` ends the others).

    Returns when the segment may run; raises ``SystemExit(EXIT_REQUEUED)`` after a requeue and
    RuntimeError (the job fails, no requeue) over a cap or when the requeue itself failed.
    No cap set: returns without asking sacct. ``requeue``: a stand-in for
    :func:`remax.preemption.requeue`; ``kw`` goes to :func:`decide`.
    """
    if int(os.environ.get("SLURM_PROCID") or 0):
        return
    decision = decide(run_dir, cluster, next_cost, job_id=job_id, **kw)
    if decision.action == "run":
        return
    print(f"error: {decision.reason}", file=sys.stderr, flush=True)
    if decision.action == "stop":
        raise RuntimeError(decision.reason)
    if (requeue or preemption.requeue)():
        raise SystemExit(preemption.EXIT_REQUEUED)
    raise RuntimeError(
        f"{decision.reason}; `scontrol requeue` failed too: resume with "
        f"`python -m jobs.resume {run_dir}` once sacct answers"
    )
