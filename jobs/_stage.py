"""Run one stage in this process: run dir, trainer, loop, summary line."""

from __future__ import annotations

import json
import logging

import torch

from jobs._config import fail
from remax.log import init_logging
from remax.run_dir import RunDirError, prepare

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


def run_stage(stage: str, config) -> dict:
    """Train ``stage`` with ``config`` (a dataclass) to completion or resume it; return the summary."""
    from remax.trainers import loop

    init_logging()
    if config.cluster.num_threads:
        torch.set_num_threads(config.cluster.num_threads)
    try:
        run_dir = prepare(config, stage)
    except RunDirError as exc:
        fail(str(exc))
    log.info("%s run dir: %s", stage, run_dir)
    summary = loop.run(_trainer(stage, config), config, run_dir, stage)
    print(json.dumps({"stage": stage, "run_dir": str(run_dir), "eval": summary.get("eval")}))
    return summary
