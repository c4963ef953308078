"""The per-class failure policy, applied by the job itself (no babysitter on the login node).

| class        | what the job does                                                      |
|--------------|------------------------------------------------------------------------|
| preemption   | requeue (after a checkpoint when it fits)                              |
| time_limit   | requeue (after a checkpoint when it fits)                              |
| hang         | requeue away from the node, at most ``cluster.max_failure_requeues``   |
| node_failure | same as hang (a peer vanished mid-collective, or at the next start: no line) |
| oom          | stop, with the memory planner's suggestion                             |
| exception    | stop, never requeue: a rerun fails the same way, billed again          |
| no_progress  | stop: ``cluster.no_progress_segments`` segments without a checkpoint   |
|              | (for evaluate: without an answered batch)                              |
| disk_full    | stop                                                                   |
"""

from __future__ import annotations

import logging
from pathlib import Path

from remax import failure, ledger, preemption
from remax.failure import FailureClass

log = logging.getLogger("remax.jobs")

REQUEUE = {FailureClass.preemption, FailureClass.time_limit}
REQUEUE_ELSEWHERE = {FailureClass.hang, FailureClass.node_failure}


class StopJob(RuntimeError):
    """The policy says stop: the job ends FAILED with this message and is never requeued."""


def check_start(cluster, run_dir: Path, restarts: int) -> None:
    """At the start of a restarted segment: record a killed predecessor, apply the bounds."""
    if restarts == 0:
        return
    if restarts > cluster.max_restarts:  # also for hand-written sbatch templates (no submitit)
        _stop(
            run_dir,
            FailureClass.exception,
            f"job restarted {restarts} times, more than cluster.max_restarts={cluster.max_restarts}",
        )
    segments = ledger.read(run_dir)
    fails = failure.history(run_dir)
    job = _job()
    seen = {(s.get("job"), s.get("restart")) for s in segments}
    seen |= {(f.get("job"), f.get("restart")) for f in fails}
    if (job, restarts - 1) not in seen:
        _account_for_killed(run_dir, job, restarts - 1)
        segments, fails = ledger.read(run_dir), failure.history(run_dir)
    elsewhere = [
        f for f in fails if f.get("job") == job and f["class"] in _values(REQUEUE_ELSEWHERE)
    ]
    if len(elsewhere) > cluster.max_failure_requeues:
        _stop(
            run_dir,
            FailureClass(elsewhere[-1]["class"]),
            f"{len(elsewhere)} hangs or node failures, more than cluster.max_failure_requeues="
            f"{cluster.max_failure_requeues}: see failure/ for the stacks",
        )
    k = cluster.no_progress_segments
    last = segments[-k:] if k else []
    if k and len(last) == k and not any(_progressed(s) for s in last):
        _stop(
            run_dir,
            FailureClass.no_progress,
            f"the last {k} segments published no checkpoint nor answered an evaluation batch "
            f"(cluster.no_progress_segments={k}): a step, a save or an evaluation batch does not "
            "fit into one segment; raise cluster.time_min or lower checkpoint.every_minutes",
        )


def _progressed(segment: dict) -> bool:
    """A checkpoint survives the segment; so does an evaluation batch written to ``partial/``
    (the evaluate stage publishes no checkpoints)."""
    return bool(segment.get("checkpoints") or segment.get("answered"))


def _account_for_killed(run_dir: Path, job: str | None, restart: int) -> None:
    """The previous segment was killed before it wrote its line: after a stop signal (a
    preemption, an outside ``scontrol requeue``) it is not a failure; silently, a node failure."""
    live = ledger.read_live(run_dir)
    if live and live.get("job") == job and live.get("restart") == restart:
        signalled = str(live.get("stop_reason") or "").startswith("signal:")
        row = {
            **live,
            "end": None,
            "stop_reason": f"killed ({live.get('stop_reason') or 'silent'})",
        }
        if not signalled:
            row["failure_class"] = FailureClass.node_failure.value
        ledger.append(run_dir, row)
        if signalled:
            return
    failure.record(
        run_dir,
        FailureClass.node_failure,
        f"segment {restart} of job {job} ended without a word (node lost or SIGKILL)",
    )


def on_exception(run_dir: Path, exc: BaseException, stage: str) -> FailureClass:
    """Record why a stage raised; the exception then ends the job (never a requeue)."""
    cls = failure.classify(exc)
    reason = f"{type(exc).__name__}: {exc}"
    if cls == FailureClass.oom:
        reason += (
            f"; run `python -m jobs.plan {stage} <the same overrides>` for the largest "
            "micro-batch that fits, then lower train.micro_batch_size"
        )
    seg = ledger.current()
    failure.record(run_dir, cls, reason, step=seg.last_step if seg else None)
    return cls


def on_hang(cluster):
    """The watchdog's policy: requeue away from this node while the bound allows."""

    def apply(info: dict) -> None:
        n = sum(
            1
            for f in failure.history(Path(info["run_dir"]))
            if f.get("job") == info["job"] and f["class"] in _values(REQUEUE_ELSEWHERE)
        )
        if n > cluster.max_failure_requeues:
            log.error("hang %d > cluster.max_failure_requeues: not requeued", n)
            return
        exclude = info["host"] if cluster.exclude_failed_node else None
        preemption.requeue(exclude=exclude, any_rank=True)

    return apply


def _stop(run_dir: Path, cls: FailureClass, reason: str) -> None:
    failure.record(run_dir, cls, reason)
    raise StopJob(f"{cls.value}: {reason}")


def _values(classes) -> set[str]:
    return {c.value for c in classes}


def _job() -> str | None:
    import os

    return os.environ.get("SLURM_JOB_ID")
