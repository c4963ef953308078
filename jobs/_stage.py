"""Run one stage in this process: run dir, trainer, loop, summary line."""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from pathlib import Path

import torch

from jobs import _policy
from jobs._config import fail, stage_spec
from jobs._lease import QueueError, claim, live_owner, stop_for_good, stop_requested
from remax import distributed, failure, ledger, preemption, stages, watchdog
from remax.config import ConfigError
from remax.engines import close_all
from remax.inputs import InputError, check_inputs
from remax.log import init_logging
from remax.preemption import StopRequest
from remax.rollout.vllm import check_head_dims
from remax.run_dir import RunDirError, prepare, run_dir_for
from remax.seeding import seed_everything
from remax.trainers.checkpointer import check_resumable
from remax.watchdog import Watchdog

log = logging.getLogger("remax.jobs")


def _load(path: str):
    """The object a stage-table row names (``module:attribute``). Imported here, on use:
    ``python -m jobs.remax --help`` should not pay for transformers."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _trainer(stage: str, config):
    """The trainer of a training stage (the table's ``trainer``), built from ``config``."""
    spec = stages.stage(stage)
    if spec.trainer is None:
        raise ValueError(f"stage {stage!r} has no trainer: it runs {spec.runner}")
    return _load(spec.trainer)(config)


def _runner(spec, config, run_dir: Path):
    """The stage's run: ``(run_dir, stop, end) -> summary or None``. A trainer is built here,
    reading every input; a runner (evaluate) loads its policies one at a time as it goes."""
    if spec.trainer is None:
        run = _load(spec.runner)
        return lambda run_dir, stop, end: run(config, run_dir, stop)
    trainer = _trainer(spec.name, config)
    check_resumable(trainer, run_dir / "checkpoints")

    def train(run_dir, stop, end):
        from remax.trainers import loop

        return loop.run(trainer, config, run_dir, spec.name, stop=stop, end_segment=end)

    return train


def run_stage(stage: str, config, stop: StopRequest | None = None) -> dict | None:
    """Train ``stage`` with ``config`` (a dataclass) to completion or resume it; return the summary.

    Returns None when ``stop`` asked for a checkpoint-and-exit. Inside a Slurm job step (a
    submitit job or a hand-rendered ``slurm_templates/`` script, both run under srun) the stage
    watches USR2 and SIGTERM itself and ends a stopped segment with :class:`SegmentEnd`: the
    process then exits (requeued) or returns None (cancelled by ``jobs.cancel --graceful``).
    """
    in_job = bool(os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_STEP_ID"))
    try:
        return _run_stage(stage, config, stop, in_job)
    finally:
        if in_job:  # the outcome is decided: a late USR2/SIGTERM must not fail the teardown
            preemption.ignore_late_signals()


def _run_stage(stage: str, config, stop: StopRequest | None, in_job: bool) -> dict | None:
    spec = stage_spec(stage)  # an unknown stage: one line, before anything is touched
    run_dir = run_dir_for(config, stage)
    if stop is None and in_job:
        stop = preemption.install(stop_request(config.cluster, run_dir))
    init_logging()
    if not in_job:
        _refuse_live_owner(run_dir)  # a local run must not resume into a live job's files
    threads = config.cluster.num_threads or (in_job and os.environ.get("SLURM_CPUS_PER_TASK"))
    if threads:
        torch.set_num_threads(int(threads))
    # Watched from the first moment: a rendezvous, an input read or a model load that never
    # returns (a stuck NFS mount) must not keep the node billed until the time limit. The
    # watchdog writes into the run dir only when it fires.
    _watch(config, run_dir)
    # One process per GPU (torchrun or Slurm tasks); a no-op in a plain single process.
    env = distributed.init_distributed()
    # Before any model is built or loaded: a run is a function of its config whatever the model
    # source (a tiny model from config or an export); each rank its own reproducible stream.
    seed_everything(distributed.rank_seed(config.seed))
    if env.world_size > 1 and spec.one_rank:
        # Every training stage is data parallel; evaluation is one process (its resumable
        # partial/*.jsonl files have one writer).
        fail(
            f"{stage} runs on one rank only, this launch has {env.world_size}: start it with one "
            "task (cluster.tasks_per_node=1, nodes=1)"
        )
    runner = _checked_runner(spec, config, run_dir)
    owner = claim(run_dir, stage)
    if owner:
        # Another live job owns this run dir: touching it would delete that job's in-progress
        # saves. Return a result (not None) so neither submitit nor the template requeues us.
        log.warning("%s: run dir owned by live job %s; this job exits untouched", stage, owner)
        watchdog.activate(None)
        close_all()
        return {"stage": stage, "run_dir": str(run_dir), "not_owner": owner}
    try:
        if distributed.is_main():
            prepare(config, stage)
    except RunDirError as exc:
        fail(str(exc))
    distributed.barrier()  # rank 0 created (or checked) the run dir
    log.info("%s run dir: %s", stage, run_dir)
    end = SegmentEnd(run_dir, stop) if in_job else None
    summary = _guarded(stage, config, run_dir, stop, runner, end)
    if summary is None:
        log.info("%s stopped at a checkpoint: %s", stage, run_dir)
        if end is not None:
            end()  # evaluate's stop, or a stop the loop ended without its hook
            end.exit()
        return None
    if not distributed.is_main():
        return summary
    print(json.dumps({"stage": stage, "run_dir": str(run_dir), "eval": summary.get("eval")}))
    return summary


def _checked_runner(spec, config, run_dir):
    """Inputs first, run dir second: a missing export or a malformed data file is one line and
    exit 2 with nothing written (the trainer reads every input when it is built), and so is a
    checkpoint whose LoRA adapters fit another base model."""
    try:
        check_inputs(config)
        check_head_dims(config)  # rollout.engine=vllm on CPU: its kernels' head_dims
        return _runner(spec, config, Path(run_dir))
    except (InputError, ConfigError) as exc:  # e.g. a reward function that cannot be imported
        fail(str(exc))


def _refuse_live_owner(run_dir) -> None:
    """Outside Slurm: exit 2, touching nothing, when a live Slurm job owns ``run_dir``."""
    try:
        owner = live_owner(run_dir)
    except QueueError as exc:
        fail(f"{exc}: cannot tell whether a Slurm job still owns {run_dir}; nothing was touched")
    if owner:
        job, state = owner
        fail(
            f"run dir {run_dir} belongs to live Slurm job {job} ({state}): running here would "
            f"resume from its checkpoints and overwrite its files; wait for it, `python -m "
            f"jobs.cancel {run_dir}` first, or use run.attempt=<n> for a separate run"
        )


def stop_request(cluster, run_dir) -> StopRequest:
    """The segment's stop request: the end time from Slurm, the partition's GraceTime, the
    teardown margin, the --signal delay, and whether a signal is a graceful cancel."""
    # GraceTime 0 (a partition that preempts nothing) or unknown: a SIGTERM while RUNNING is then
    # `scancel --signal=TERM` or srun ending the step, with KillWait to go; the --signal delay
    # bounds it as before, instead of a deadline that is already past.
    grace = preemption.partition_grace_s() or cluster.signal_delay_s
    return StopRequest(
        preemption.job_end_time(),
        cluster.deadline_margin_s,
        cluster.signal_delay_s,
        grace_time_s=grace,
        graceful=lambda: stop_requested(run_dir),
    )


class SegmentEnd:
    """The end of a stopped job segment, its checkpoint written: a graceful cancel ends the job
    (``scancel``), anything else requeues it. The one owner of that question for submitit jobs
    and hand-rendered sbatch scripts alike.

    Called on every rank. Rank 0 writes the segment's ledger line and acts; the others wait for
    its outcome, so ``srun --kill-on-bad-exit`` never cuts rank 0 short of its requeue. The loop
    calls it before W&B closes (``loop.run(end_segment=...)``).
    """

    OUTCOMES = ("", "requeued", "cancelled", "failed")

    def __init__(self, run_dir, stop: StopRequest | None) -> None:
        self.run_dir, self.stop, self.outcome = run_dir, stop, None

    def __call__(self) -> None:
        if self.outcome is not None:
            return
        outcome = ""
        if distributed.is_main():
            ledger.finish(_stop_reason(self.stop))
            if stop_for_good(self.run_dir):
                outcome = "cancelled"
            else:
                outcome = "requeued" if preemption.requeue() else "failed"
        self.outcome = _outcome_of_rank0(outcome, self.OUTCOMES)

    def exit(self) -> None:
        """Leave the job step as the outcome says (called after W&B closed)."""
        if self.outcome == "failed":
            raise RuntimeError(
                "stopped for a requeue but `scontrol requeue` failed 5 times: resume with "
                f"`python -m jobs.resume {self.run_dir}`"
            )
        if self.outcome == "requeued":
            sys.exit(preemption.EXIT_REQUEUED)


def _outcome_of_rank0(outcome: str, outcomes: tuple[str, ...]) -> str:
    """Rank 0's ``outcome`` on every rank. The requeue it follows kills the job's tasks, so a
    collective cut short means rank 0 requeued."""
    try:
        code = distributed.sum_over_ranks({"outcome": outcomes.index(outcome)})["outcome"]
    except Exception:  # noqa: BLE001 - a peer killed by the requeue's SIGTERM
        return outcome or "requeued"
    return outcomes[int(code)]


def _guarded(stage: str, config, run_dir, stop, runner, end) -> dict | None:
    """The stage under the failure policy: segment ledger, watchdog, failure classes."""
    main = distributed.is_main()
    ledger.begin()
    if main:
        ledger.attach(run_dir)
        _policy.check_start(config.cluster, run_dir, ledger.current().restart)
    try:
        summary = _run(runner, run_dir, stop, end)
    except Exception as exc:
        if stop is not None:
            stop.failed = True  # a failing segment is never requeued by the stop guard
        # The rank that raised claims the event first; its peers' "connection closed" is the
        # same event, not a second failure (failure.json then names the rank that failed).
        if failure.claim_event(run_dir):
            cls = _policy.on_exception(run_dir, exc, stage)
            ledger.finish("failed", cls.value)
        else:
            ledger.finish("failed")
        if isinstance(exc, ConfigError):  # e.g. a reward function failing on a row: one line
            fail(str(exc))  # exit 2, never requeued; failure.json and the checkpoints stay
        raise
    finally:
        watchdog.activate(None)
    if main:
        reason = "completed" if summary is not None else _stop_reason(stop)
        ledger.finish(reason)
    return summary


def _watch(config, run_dir) -> None:
    """Start this rank's hang watchdog (``cluster.watchdog_s``; 0: none) in its startup phase."""
    if config.cluster.watchdog_s:
        dog = Watchdog(
            run_dir,
            config.cluster.watchdog_s,
            config.cluster.watchdog_factor,
            _policy.on_hang(config.cluster),
        )
        watchdog.activate(dog.start())


def _stop_reason(stop) -> str:
    reason = getattr(stop, "reason", None)
    return reason.value if reason is not None else "stopped"


def _run(runner, run_dir, stop, end) -> dict | None:
    try:
        return runner(run_dir, stop, end)
    except preemption.Stopped:  # a runner's stop between two of its steps: they are on disk
        return None
    finally:
        close_all()  # DeepSpeed engines alive at exit can abort the task (SIGABRT)
