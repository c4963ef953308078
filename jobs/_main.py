"""``@hydra.main`` for a stage, with Hydra's own output dir, chdir and logging turned off."""

from __future__ import annotations

import hashlib
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from jobs._config import CONF_DIR, compose_stage, to_config
from jobs._stage import run_stage
from remax.config import Backend


def stage_main(stage: str) -> None:
    args = sys.argv[1:]
    if not any(a in ("-m", "--multirun") or a.startswith("-") for a in args):
        # Compose once outside @hydra.main so a typo or a wrong type also fails in one line with
        # exit code 2 (Hydra would print several lines and exit 1).
        compose_stage(stage, args)

    sweep: list = []

    @hydra.main(config_path=CONF_DIR, config_name=stage, version_base=None)
    def _main(cfg: DictConfig) -> None:
        config = to_config(cfg)
        if config.cluster.backend != Backend.slurm:
            run_stage(stage, config)
        elif HydraConfig.get().mode == RunMode.MULTIRUN:
            sweep.append(config)  # all elements become ONE job array once the sweep is composed
        else:
            from jobs._submit import submit

            submit(stage, config)

    _main()
    if sweep:
        from jobs._submit import submit_array

        submit_array(stage, sweep, sweep_id=sweep_id(stage, args))


def sweep_id(stage: str, args: list[str]) -> str:
    """A stable name for a sweep command: the W&B group of its elements and its log folder."""
    digest = hashlib.sha1(
        " ".join(sorted(a for a in args if a not in ("-m", "--multirun"))).encode()
    )
    return f"{stage}-sweep-{digest.hexdigest()[:8]}"
