"""``@hydra.main`` for a stage, with Hydra's own output dir, chdir and logging turned off."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from jobs._config import CONF_DIR, to_config
from jobs._stage import run_stage


def stage_main(stage: str) -> None:
    @hydra.main(config_path=CONF_DIR, config_name=stage, version_base=None)
    def _main(cfg: DictConfig) -> None:
        run_stage(stage, to_config(cfg))

    _main()
