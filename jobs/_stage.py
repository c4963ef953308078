"""Run one stage in this process: run dir, trainer, loop, summary line."""

from __future__ import annotations

import json
import logging
import os
import sys

import torch

from jobs import _policy
from jobs._config import fail
from jobs._lease import claim, stop_for_good
from remax import distributed, ledger, preemption, watchdog
from remax.config import ConfigError
from remax.engines import close_all
from remax.inputs import InputError, check_inputs
from remax.log import init_logging
from remax.preemption import StopRequest
from remax.run_dir import RunDirError, prepare, run_dir_for
from remax.seeding import seed_everything
from remax.watchdog import Watchdog

log = logging.getLogger("remax.jobs")


def _trainer(stage: str, config):
    # Imported here: `python -m jobs.remax --help` should not pay for transformers.
    if stage == "sft":
        from remax.trainers.sft import SFTTrainer

        return SFTTrainer(config)
    if stage == "reward_model":
        from remax.trainers.reward_model import RewardModelTrainer

        return RewardModelTrainer(config)
    if stage == "ppo":
        from remax.trainers.ppo import PPOTrainer

        return PPOTrainer(config)
    from remax.trainers.remax import RemaxTrainer

    return RemaxTrainer(config)


def run_stage(stage: str, config, stop: StopRequest | None = None) -> dict | None:
    """Train ``stage`` with ``config`` (a dataclass) to completion or resume it; return the summary.

    Returns None when ``stop`` asked for a checkpoint-and-exit (a Slurm requeue). Inside a
    hand-submitted sbatch script (``slurm_templates/``) the stage watches USR2 and SIGTERM itself
    and requeues its own job after the checkpoint.
    """
    requeue_self = (
        stop is None and os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_STEP_ID")
    )
    if requeue_self:
        stop = preemption.install(stop_request(config.cluster))
    init_logging()
    if config.cluster.num_threads:
        torch.set_num_threads(config.cluster.num_threads)
    # Watched from the first moment: a rendezvous, an input read or a model load that never
    # returns (a stuck NFS mount) must not keep the node billed until the time limit. The
    # watchdog writes into the run dir only when it fires.
    _watch(config, run_dir_for(config, stage))
    # One process per GPU (torchrun or Slurm tasks); a no-op in a plain single process.
    env = distributed.init_distributed()
    # Before any model is built or loaded: a run is a function of its config whatever the model
    # source (a tiny model from config or an export); each rank its own reproducible stream.
    seed_everything(distributed.rank_seed(config.seed))
    if env.world_size > 1 and stage == "evaluate":
        # Every training stage is data parallel; evaluation is one process (its resumable
        # partial/*.jsonl files have one writer).
        fail(
            f"evaluate runs on one rank only, this launch has {env.world_size}: start it with one "
            "task (cluster.tasks_per_node=1, nodes=1)"
        )
    # Inputs first, run dir second: a missing export or a malformed data file is one line and
    # exit 2 with nothing written (the trainer reads every input when it is built).
    try:
        check_inputs(config)
        trainer = None if stage == "evaluate" else _trainer(stage, config)
    except (InputError, ConfigError) as exc:  # e.g. a reward function that cannot be imported
        fail(str(exc))
    owner = claim(run_dir_for(config, stage), stage)
    if owner:
        # Another live job owns this run dir: touching it would delete that job's in-progress
        # saves. Return a result (not None) so neither submitit nor the template requeues us.
        log.warning("%s: run dir owned by live job %s; this job exits untouched", stage, owner)
        watchdog.activate(None)
        close_all()
        return {"stage": stage, "run_dir": str(run_dir_for(config, stage)), "not_owner": owner}
    try:
        run_dir = prepare(config, stage) if distributed.is_main() else None
    except RunDirError as exc:
        fail(str(exc))
    distributed.barrier()  # rank 0 created (or checked) the run dir
    run_dir = run_dir or run_dir_for(config, stage)
    log.info("%s run dir: %s", stage, run_dir)
    summary = _guarded(stage, config, run_dir, stop, trainer)
    if summary is None:
        log.info("%s stopped at a checkpoint for a requeue: %s", stage, run_dir)
        if requeue_self and stop_for_good(run_dir):
            sys.exit(0)  # jobs.cancel --graceful: checkpoint written, job cancelled, no requeue
        if requeue_self:
            requeue_or_fail(run_dir)
        return None
    if not distributed.is_main():
        return summary
    print(json.dumps({"stage": stage, "run_dir": str(run_dir), "eval": summary.get("eval")}))
    return summary


def stop_request(cluster) -> StopRequest:
    """The segment's stop request: end time from Slurm, the teardown margin, the signal window."""
    return StopRequest(preemption.job_end_time(), cluster.deadline_margin_s, cluster.signal_delay_s)


def requeue_or_fail(run_dir) -> None:
    """Requeue this job (retried) and exit; a requeue that never succeeds fails the job loudly."""
    if not preemption.requeue():
        raise RuntimeError(
            "stopped for a requeue but `scontrol requeue` failed 5 times: resume with "
            f"`python -m jobs.resume {run_dir}`"
        )
    sys.exit(preemption.EXIT_REQUEUED)


def _guarded(stage: str, config, run_dir, stop, trainer) -> dict | None:
    """The stage under the failure policy: segment ledger, watchdog, failure classes."""
    main = distributed.is_main()
    ledger.begin()
    if main:
        ledger.attach(run_dir)
        _policy.check_start(config.cluster, run_dir, ledger.current().restart)
    try:
        summary = _run(stage, config, run_dir, stop, trainer)
    except Exception as exc:
        if main:
            cls = _policy.on_exception(run_dir, exc, stage)
            ledger.finish("failed", cls.value)
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


def _run(stage: str, config, run_dir, stop, trainer) -> dict | None:
    from remax.trainers import loop

    if stage == "evaluate":
        # Not a training loop: answer, score, summarise; resumable batch by batch on its own.
        from remax.evaluation import run as evaluate

        try:
            return evaluate(config, run_dir)
        except preemption.Stopped:  # between two answer batches: the done ones are on disk
            return None
    try:
        return loop.run(trainer, config, run_dir, stage, stop=stop)
    finally:
        close_all()  # DeepSpeed engines alive at exit can abort the task (SIGABRT)
