"""Run one stage in this process: run dir, trainer, loop, summary line."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import torch

from jobs._config import fail
from remax import distributed
from remax.config import ConfigError
from remax.engines import close_all
from remax.log import init_logging
from remax.run_dir import RunDirError, prepare, run_dir_for

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


def run_stage(stage: str, config, stop=None) -> dict | None:
    """Train ``stage`` with ``config`` (a dataclass) to completion or resume it; return the summary.

    Returns None when ``stop`` asked for a checkpoint-and-exit (a Slurm requeue). Inside a
    hand-submitted sbatch script (``slurm_templates/``) the stage watches USR2 itself and requeues
    its own job after the checkpoint.
    """
    from remax.trainers import loop

    requeue_self = (
        stop is None and os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_STEP_ID")
    )
    if requeue_self:
        from jobs._submit import SlurmStop, job_end_time

        stop = SlurmStop(job_end_time(), config.cluster.deadline_margin_s)
        signal.signal(signal.SIGUSR2, stop.on_signal)

    init_logging()
    if config.cluster.num_threads:
        torch.set_num_threads(config.cluster.num_threads)
    # One process per GPU (torchrun or Slurm tasks); a no-op in a plain single process.
    env = distributed.init_distributed()
    if env.world_size > 1 and stage == "evaluate":
        # Every training stage is data parallel; evaluation is one process (its resumable
        # partial/*.jsonl files have one writer).
        fail(
            f"evaluate runs on one rank only, this launch has {env.world_size}: start it with one "
            "task (cluster.tasks_per_node=1, nodes=1)"
        )
    try:
        run_dir = prepare(config, stage) if distributed.is_main() else None
    except RunDirError as exc:
        fail(str(exc))
    distributed.barrier()  # rank 0 created (or checked) the run dir
    run_dir = run_dir or run_dir_for(config, stage)
    log.info("%s run dir: %s", stage, run_dir)
    if stage == "evaluate":
        # Not a training loop: answer, score, summarise; resumable batch by batch on its own.
        from remax.evaluation import run as evaluate

        try:
            summary = evaluate(config, run_dir)
        except ConfigError as exc:  # a reward model or function that cannot serve: one line
            fail(str(exc))
    else:
        try:
            summary = loop.run(_trainer(stage, config), config, run_dir, stage, stop=stop)
        except ConfigError as exc:  # e.g. a reward function failing on a row; checkpoints stay
            fail(str(exc))
        finally:
            close_all()  # DeepSpeed engines alive at exit can abort the task (SIGABRT)
    if summary is None:
        log.info("%s stopped at a checkpoint for a requeue: %s", stage, run_dir)
        if requeue_self:
            if distributed.is_main():  # one requeue per job, not one per task
                subprocess.run(
                    ["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True, timeout=60
                )
            sys.exit(0)
        return None
    if not distributed.is_main():
        return summary
    print(json.dumps({"stage": stage, "run_dir": str(run_dir), "eval": summary.get("eval")}))
    return summary
