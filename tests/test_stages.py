"""The stage table (``remax/stages.py``): every row is whole, and a name that is no row is refused."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path

import pytest

from jobs._config import CONF_DIR, compose_stage
from remax import plan as planner
from remax import stages
from remax.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
# What the loop calls on a trainer (remax/trainers/loop.py's Trainer protocol), methods only:
# its attributes are set when it is built.
TRAINER_METHODS = (
    "engines",
    "before_training",
    "train_step",
    "should_stop_early",
    "evaluate_final",
    "export_model",
)


def _resolve(path: str):
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


@pytest.mark.parametrize("name", list(stages.STAGES))
def test_every_stage_in_the_table_is_consistent(name):
    spec = stages.STAGES[name]
    assert spec.name == name and spec.schema.stage == name, "the schema names its own stage"
    assert (Path(CONF_DIR) / f"{name}.yaml").is_file(), f"hydra_conf/{name}.yaml"
    assert f'stage_main("{name}")' in (REPO / "jobs" / f"{name}.py").read_text()
    if spec.trainer is not None:
        trainer = _resolve(spec.trainer)
        assert inspect.isclass(trainer), spec.trainer
        missing = [m for m in TRAINER_METHODS if not callable(getattr(trainer, m, None))]
        assert not missing, f"{spec.trainer} lacks {missing}"
    else:
        run = _resolve(spec.runner)
        assert list(inspect.signature(run).parameters)[:3] == ["cfg", "run_dir", "stop"]
    fields = {f.name for f in dataclasses.fields(spec.schema)}
    # An RL stage decodes rollouts scored by a reward model: both config sections, and a plan.
    assert spec.rl == ({"rollout", "reward_model", "algo"} <= fields)
    if spec.plan_models is not None:
        assert getattr(planner, spec.plan_models.__name__) is spec.plan_models
        assert spec.preset_prefix, "jobs.plan picks a planned stage by its presets' prefix"
        assert "model" in fields and "train" in fields
    else:
        assert spec.trainer is None, "every training stage can be planned before it is paid for"


def test_the_table_lists_every_stage_root_and_nothing_else():
    roots = {p.stem for p in Path(CONF_DIR).glob("*.yaml")}
    assert set(stages.STAGES) == roots


def test_a_row_names_exactly_one_way_to_run():
    with pytest.raises(ValueError, match="exactly one of trainer and runner"):
        stages.Stage(name="x", schema=object)
    with pytest.raises(ValueError, match="exactly one of trainer and runner"):
        stages.Stage(name="x", schema=object, trainer="a:B", runner="a:c")


def test_an_unknown_stage_name_is_refused():
    with pytest.raises(
        ConfigError, match=r"unknown stage 'rm': valid stages are sft, reward_model"
    ):
        stages.stage("rm")


def test_running_an_unknown_stage_is_one_line_and_touches_nothing(tmp_path, capsys):
    """It used to fall through to a ReMax trainer (jobs/_stage.py's if-chain)."""
    from jobs._stage import run_stage

    config = compose_stage("remax", ["experiment=smoke", f"run.root={tmp_path}"])
    with pytest.raises(SystemExit) as exit_:
        run_stage("rm", config)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown stage 'rm': valid stages are " + ", ".join(stages.STAGES)]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, stage",
    [
        (["experiment=rm_opt_1.3b_official"], "reward_model"),
        (["experiment=sft_x", "algo=ppo_dschat"], "sft"),  # the experiment names the stage first
        (["algo=ppo_dschat"], "ppo"),
        (["algo=rloo"], "remax"),  # the critic-free stage runs RLOO and GRPO
        (["model=opt_350m"], "remax"),
    ],
)
def test_the_planner_picks_the_stage_from_the_tables_preset_prefixes(args, stage):
    from jobs.plan import stage_of

    assert stage_of(args) == stage
