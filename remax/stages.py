"""The stage table: every stage's config schema, trainer, RL flag and memory-planner builder.

The one place that lists the stages. ``jobs/`` composes, runs, plans and chains them by looking
them up here, so a new stage is one row (docs/architecture.md, "Where a new thing goes"), and a
name that is not a row is refused in one line instead of falling through to a default trainer.

Trainers (``remax/trainers/``, the layer above this one) are named by dotted path, not imported:
``jobs/`` imports them when the stage runs, and ``tests/test_stages.py`` checks every name
resolves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from remax import plan as planner
from remax.config import (
    ConfigError,
    EvaluateJobConfig,
    PPOJobConfig,
    RemaxJobConfig,
    RewardModelJobConfig,
    SFTJobConfig,
)


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One row of the table. Exactly one of ``trainer`` and ``runner`` is set."""

    name: str
    """The command (``python -m jobs.<name>``), the Hydra config (``hydra_conf/<name>.yaml``) and
    the run-dir folder (``<run.root>/<name>/``)."""
    schema: type
    """The root config dataclass, validated once when composed."""
    trainer: str | None = None
    """``module:Class`` of the ``Trainer`` the shared loop (``remax/trainers/loop.py``) drives."""
    runner: str | None = None
    """``module:function`` of a stage that is not a training loop: ``(config, run_dir, stop) ->
    summary``, which may raise :class:`remax.preemption.Stopped` between its resumable steps."""
    rl: bool = False
    """Decodes rollouts from a policy, scored by a reward model (``rollout`` and ``reward_model``
    config sections; planned with a generation phase)."""
    plan_models: Callable | None = None
    """The ``remax.plan`` builder of its models' placements; None: not planned (``jobs.plan``)."""
    rows_per_example: int = 1
    """Sequences per training example (2 for a chosen/rejected pair): the planner's rows."""
    preset_prefix: str | None = None
    """``experiment=<prefix>...`` presets belong to this stage (``jobs.plan`` picks the stage)."""
    one_rank: bool = False
    """Runs as one process: its resumable files have one writer (Slurm gets one task)."""
    in_pipeline: bool = False
    """A step of ``jobs.pipeline``, in table order."""

    def __post_init__(self) -> None:
        if (self.trainer is None) == (self.runner is None):
            raise ValueError(f"stage {self.name!r}: set exactly one of trainer and runner")


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            name="sft",
            schema=SFTJobConfig,
            trainer="remax.trainers.sft:SFTTrainer",
            plan_models=planner.sft_models,
            preset_prefix="sft_",
            in_pipeline=True,
        ),
        Stage(
            name="reward_model",
            schema=RewardModelJobConfig,
            trainer="remax.trainers.reward_model:RewardModelTrainer",
            plan_models=planner.reward_model_models,
            rows_per_example=2,
            preset_prefix="rm_",
            in_pipeline=True,
        ),
        Stage(
            name="remax",
            schema=RemaxJobConfig,
            trainer="remax.trainers.remax:RemaxTrainer",
            rl=True,
            plan_models=planner.remax_models,
            preset_prefix="remax_",
            in_pipeline=True,
        ),
        Stage(
            name="ppo",
            schema=PPOJobConfig,
            trainer="remax.trainers.ppo:PPOTrainer",
            rl=True,
            plan_models=planner.ppo_models,
            preset_prefix="ppo_",
        ),
        Stage(
            name="evaluate",
            schema=EvaluateJobConfig,
            runner="remax.evaluation:run",
            one_rank=True,
            in_pipeline=True,
        ),
    )
}


def stage(name: str) -> Stage:
    """The row of ``name``; an unknown name raises :class:`ConfigError` naming the valid ones."""
    try:
        return STAGES[name]
    except KeyError:
        raise ConfigError(f"unknown stage {name!r}: valid stages are {', '.join(STAGES)}") from None
