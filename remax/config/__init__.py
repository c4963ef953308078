"""Typed configuration: every schema of every stage, validated once in ``__post_init__``.

Plain dataclasses: the library never imports Hydra. ``jobs/_config.py`` registers these classes in
Hydra's ConfigStore and converts the composed config with ``OmegaConf.to_object``, which runs the
``__post_init__`` checks. Validation never rewrites a value; derived quantities are properties.

One module per concern; this package re-exports every schema so callers write
``from remax.config import RemaxJobConfig``:

| module | groups |
|---|---|
| ``base`` | ``ConfigError``, ``DType``, ``Scheduler`` |
| ``model`` | ``model``, ``reward_model`` |
| ``data`` | ``data`` |
| ``train`` | ``optim``, ``train``, ``checkpoint`` (and the per-rank batch arithmetic) |
| ``sampling`` | the decoding triple shared by ReMax, PPO and evaluation |
| ``algo`` | ``algo`` (ReMax, PPO) |
| ``deepspeed`` | ``deepspeed`` |
| ``run`` | ``run``, ``log`` |
| ``cluster`` | ``cluster`` |
| ``rollout`` | ``rollout`` (the decoding engine: hf or vllm) |
| ``stages`` / ``evaluate`` | the stage roots |

Defaults of :class:`RemaxAlgoConfig` are the paper's Algorithm 1 (remax-spec §4.2); every departure
is one explicit line of a preset in ``hydra_conf/algo/``.
"""

from remax.algo.types import (
    Aggregation,
    Baseline,
    ClipTarget,
    DiscountConvention,
    EmptyResponse,
    EvalDecoding,
    ExportPolicy,
    KLEstimator,
    KLMode,
    LogprobDist,
)
from remax.config.algo import PPOAlgoConfig, RemaxAlgoConfig
from remax.config.base import ConfigError, DType, Scheduler
from remax.config.cluster import Backend, ClusterConfig
from remax.config.data import DataConfig
from remax.config.deepspeed import DeepSpeedConfig, deepspeed_json
from remax.config.evaluate import AnswerFormat, EvaluateJobConfig, PromptFormat, ReferenceConfig
from remax.config.model import (
    LoraConfig,
    ModelConfig,
    RewardKind,
    RewardNormalization,
    RewardSourceConfig,
    RewardTemplate,
)
from remax.config.rollout import PushRoute, RolloutConfig, RolloutEngine
from remax.config.run import LogConfig, RunConfig, WandbMode
from remax.config.stages import (
    PPOJobConfig,
    RemaxJobConfig,
    RewardModelJobConfig,
    SFTJobConfig,
)
from remax.config.train import CheckpointConfig, OptimConfig, TrainConfig

__all__ = [
    "Aggregation",
    "AnswerFormat",
    "Backend",
    "Baseline",
    "CheckpointConfig",
    "ClipTarget",
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "DiscountConvention",
    "DType",
    "EmptyResponse",
    "EvalDecoding",
    "EvaluateJobConfig",
    "ExportPolicy",
    "KLEstimator",
    "KLMode",
    "LogConfig",
    "LogprobDist",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "PPOAlgoConfig",
    "PPOJobConfig",
    "PromptFormat",
    "PushRoute",
    "ReferenceConfig",
    "RemaxAlgoConfig",
    "RemaxJobConfig",
    "RewardModelJobConfig",
    "RewardKind",
    "RewardNormalization",
    "RewardSourceConfig",
    "RewardTemplate",
    "RolloutConfig",
    "RolloutEngine",
    "RunConfig",
    "SFTJobConfig",
    "Scheduler",
    "TrainConfig",
    "WandbMode",
    "deepspeed_json",
]
