"""One root per training stage: SFT, reward model, ReMax and PPO."""

from __future__ import annotations

from dataclasses import dataclass, field

from remax.algo.types import Baseline, ExportPolicy, as_enum
from remax.config.algo import PPOAlgoConfig, RemaxAlgoConfig
from remax.config.base import _require
from remax.config.cluster import ClusterConfig
from remax.config.data import DataConfig
from remax.config.deepspeed import DeepSpeedConfig
from remax.config.model import ModelConfig, RewardSourceConfig
from remax.config.rollout import RolloutConfig, RolloutEngine
from remax.config.run import LogConfig, RunConfig
from remax.config.train import CheckpointConfig, OptimConfig, TrainConfig


@dataclass(kw_only=True)
class _StageConfig:
    seed: int = 42
    """Training seed (model init, sampling, data order)."""
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=lambda: DeepSpeedConfig())
    """DeepSpeed engines for the trained model(s) (``hydra_conf/deepspeed/``); off by default."""


@dataclass(kw_only=True)
class SFTJobConfig(_StageConfig):
    """Supervised fine-tuning: NLL on response tokens and EOS."""

    stage = "sft"


@dataclass(kw_only=True)
class RewardModelJobConfig(_StageConfig):
    """Reward model: Bradley–Terry on the end-token score."""

    stage = "reward_model"


@dataclass(kw_only=True)
class RemaxJobConfig(_StageConfig):
    """ReMax RL: policy from ``model.path`` (also the frozen reference), reward from ``reward_model``."""

    stage = "remax"
    algo: RemaxAlgoConfig = field(default_factory=RemaxAlgoConfig)
    reward_model: RewardSourceConfig = field(default_factory=RewardSourceConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """The decoding engine of rollouts and evaluation (``rollout.engine=hf|vllm``)."""
    eval_prompts: int = 128
    """Held-out prompts for the before/after evaluation (>= 64)."""
    export_policy: ExportPolicy = ExportPolicy.last
    """Which actor is exported: the last one, or the best eval reward (the release)."""

    def __post_init__(self) -> None:
        _check_rl_stage(self)
        baseline, k = as_enum(Baseline, self.algo.baseline), self.rollout.samples_per_prompt
        _require(
            k >= baseline.min_samples,
            "rollout.samples_per_prompt",
            k,
            f"algo.baseline={baseline.value} compares each sample with the prompt's other "
            f"samples: use >= {baseline.min_samples} (the rloo preset: 2, grpo: 4)",
        )


# ---- PPO baseline ----


@dataclass(kw_only=True)
class PPOJobConfig(_StageConfig):
    """PPO baseline: actor from ``model.path`` (also the frozen reference), critic initialised from
    the reward model, reward from ``reward_model``."""

    stage = "ppo"
    algo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)
    reward_model: RewardSourceConfig = field(default_factory=RewardSourceConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """The decoding engine of rollouts and evaluation (``rollout.engine=hf|vllm``)."""
    critic_optim: OptimConfig = field(default_factory=OptimConfig)
    """Critic optimizer (DS-Chat ``critic_learning_rate``, ``critic_weight_decay``); ``optim`` is
    the actor's."""
    eval_prompts: int = 128
    """Held-out prompts for the before/after evaluation (>= 64)."""

    def __post_init__(self) -> None:
        _check_rl_stage(self)
        self.rollout.require_one_sample("ppo")
        _require(
            self.train.batch_size % self.algo.mini_batches == 0,
            "algo.mini_batches",
            self.algo.mini_batches,
            f"must divide train.batch_size={self.train.batch_size}",
        )
        minibatch = self.train.batch_size // self.algo.mini_batches
        _require(
            minibatch % self.train.micro_batch_size == 0,
            "train.micro_batch_size",
            self.train.micro_batch_size,
            f"must divide the minibatch train.batch_size / algo.mini_batches = {minibatch}",
        )


def _check_rl_stage(cfg) -> None:
    """What the ReMax and PPO roots share: the held-out evaluation and a reward source."""
    _require(cfg.eval_prompts >= 64, "eval_prompts", cfg.eval_prompts, "use at least 64")
    _require(
        cfg.eval_prompts <= cfg.data.num_eval,
        "eval_prompts",
        cfg.eval_prompts,
        f"must not exceed data.num_eval={cfg.data.num_eval}",
    )
    _require(
        cfg.reward_model.has_reward or cfg.data.source == "synthetic",
        "reward_model.path",
        cfg.reward_model.path,
        "give the reward_model stage's export/ dir or reward_model.kind=function "
        "(only data=synthetic has a built-in reward)",
    )
    ds = cfg.deepspeed
    # vLLM is pushed the actor's full parameters, read inside ``actor.generation()``; under ZeRO-3
    # only a gathered actor has them (otherwise each rank holds empty partitioned tensors).
    _require(
        not (
            cfg.rollout.engine == RolloutEngine.vllm
            and ds.enabled
            and ds.zero_stage == 3
            and not ds.gather_for_generation
        ),
        "deepspeed.gather_for_generation",
        ds.gather_for_generation,
        "rollout.engine=vllm with deepspeed.zero_stage=3 pushes the actor's full parameters to "
        "vLLM, which only a gathered actor has: set deepspeed.gather_for_generation=true "
        "(or rollout.engine=hf)",
    )
