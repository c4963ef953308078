"""``@hydra.main`` for a stage, with Hydra's own output dir, chdir and logging turned off."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from jobs._config import CONF_DIR, compose_stage, to_config
from jobs._stage import run_stage


def stage_main(stage: str) -> None:
    args = sys.argv[1:]
    if not any(a in ("-m", "--multirun") or a.startswith("-") for a in args):
        # Compose once outside @hydra.main so a typo or a wrong type also fails in one line with
        # exit code 2 (Hydra would print several lines and exit 1).
        compose_stage(stage, args)

    @hydra.main(config_path=CONF_DIR, config_name=stage, version_base=None)
    def _main(cfg: DictConfig) -> None:
        run_stage(stage, to_config(cfg))

    _main()
