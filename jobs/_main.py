"""The entry point of every stage: ``python -m jobs.<stage> [-m] [--json] [key=value ...]``.

Plain runs and ``-m`` sweeps are composed here, through :func:`jobs._config.compose_stage` (no
``@hydra.main``): one composition per run, one per config-group choice for a sweep
(:mod:`jobs._sweep`). Only Hydra's own flags (``--cfg``, ``--info``, ...) still go to
``@hydra.main``. Nothing here imports torch: submitting from the login node stays fast.
"""

from __future__ import annotations

import hashlib
import sys

from jobs._config import CONF_DIR, compose_stage, to_config
from jobs._output import use_json
from remax.config import Backend

OWN_FLAGS = ("-m", "--multirun", "--json", "-h", "--help")


def stage_main(stage: str, argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        from jobs._help import stage_help

        print(stage_help(stage, sys.modules["__main__"].__doc__ or f"python -m jobs.{stage}"))
        return
    use_json("--json" in args)
    args = [a for a in args if a != "--json"]
    if any(a.startswith("-") and a not in OWN_FLAGS for a in args):
        return _hydra_main(stage)  # --cfg job, --info, --resolve, ...
    sweep = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    if not sweep:
        return _run_or_submit(stage, compose_stage(stage, overrides))
    from jobs._sweep import sweep_configs

    configs = sweep_configs(stage, overrides)
    if configs[0].cluster.backend == Backend.slurm:
        from jobs._submit import submit_array

        submit_array(stage, configs, sweep_id=sweep_id(stage, args))
        return
    for config in configs:  # a local sweep runs its elements one after the other
        _run_or_submit(stage, config)


def _run_or_submit(stage: str, config) -> None:
    if config.cluster.backend == Backend.slurm:
        from jobs._submit import submit

        submit(stage, config)
        return
    from jobs._stage import run_stage  # imports torch: only when the stage runs here

    run_stage(stage, config)


def _hydra_main(stage: str) -> None:
    import hydra
    from omegaconf import DictConfig

    sys.argv = [sys.argv[0], *[a for a in sys.argv[1:] if a != "--json"]]

    @hydra.main(config_path=CONF_DIR, config_name=stage, version_base=None)
    def _main(cfg: DictConfig) -> None:
        _run_or_submit(stage, to_config(cfg))

    _main()


def sweep_id(stage: str, args: list[str]) -> str:
    """A stable name for a sweep command: the W&B group of its elements and its log folder."""
    digest = hashlib.sha1(
        " ".join(sorted(a for a in args if a not in ("-m", "--multirun", "--json"))).encode()
    )
    return f"{stage}-sweep-{digest.hexdigest()[:8]}"
