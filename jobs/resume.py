"""``python -m jobs.resume <run_dir> [key=value ...] [--force]``: continue a run from its checkpoint.

Rebuilds the run's config from its ``config.yaml`` (``key=value`` overrides apply on top, e.g.
``cluster.time_min=120``), checks that it still maps to the same run dir, and resubmits it (Slurm)
or runs it here (local). Refused while a job of the run is still live, and when the code changed
since the last submission, unless ``--force``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from jobs._config import SCHEMAS, compose_stage, fail
from remax.config import Backend
from remax.run_dir import differing_keys, run_dir_for, to_plain


def load_run_config(run_dir: Path, overrides: list[str], force: bool):
    stage = run_dir.parent.name
    if stage not in SCHEMAS:
        fail(
            f"{run_dir} is not a run dir (<run.root>/<stage>/<name>-<signature>): stage {stage!r} unknown"
        )
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.exists():
        fail(f"{cfg_file} is missing: pass a run dir that a stage has written")
    saved = yaml.safe_load(cfg_file.read_text())
    config = compose_stage(stage, [*overrides, *(["run.force=true"] if force else [])], saved=saved)
    if Path(run_dir_for(config, stage)).resolve() != run_dir.resolve():
        diff = differing_keys(saved, to_plain(config))
        fail(
            f"{run_dir} no longer matches its config under this code (keys: {', '.join(diff) or 'defaults'}): "
            "the schema or the overrides changed a result key; start a new run instead"
        )
    return stage, config


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print("usage: " + __doc__.strip())
        return None
    from jobs._output import use_json

    use_json("--json" in argv)
    args = [a for a in argv if a not in ("--force", "--json")]
    if not args or not Path(args[0]).is_dir():
        fail(f"usage: python -m jobs.resume <run_dir> [key=value ...] [--force]; got {argv!r}")
    run_dir = Path(args[0])
    stage, config = load_run_config(run_dir, args[1:], force="--force" in argv)
    if config.cluster.backend == Backend.slurm:
        from jobs._submit import submit

        submit(stage, config)
    else:
        from jobs._stage import run_stage

        run_stage(stage, config)


def cli() -> None:
    """Console-script entry point (``remax-resume``)."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
