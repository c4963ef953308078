"""Typed configuration: every schema of every stage, validated once in ``__post_init__``.

Plain dataclasses: the library never imports Hydra. ``jobs/_config.py`` registers these classes in
Hydra's ConfigStore and converts the composed config with ``OmegaConf.to_object``, which runs the
``__post_init__`` checks below. Validation never rewrites a value; derived quantities are properties.

Defaults of :class:`RemaxAlgoConfig` are the paper's Algorithm 1 (remax-spec §4.1); every departure
is one explicit line of a preset in ``hydra_conf/algo/``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

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

__all__ = [
    "Aggregation",
    "Backend",
    "Baseline",
    "CheckpointConfig",
    "ClipTarget",
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "DiscountConvention",
    "DType",
    "EmptyResponse",
    "EvalDecoding",
    "ExportPolicy",
    "KLEstimator",
    "KLMode",
    "LogConfig",
    "LogprobDist",
    "ModelConfig",
    "OptimConfig",
    "RemaxAlgoConfig",
    "RemaxJobConfig",
    "RewardModelJobConfig",
    "RewardSourceConfig",
    "RunConfig",
    "SFTJobConfig",
    "Scheduler",
    "TrainConfig",
    "WandbMode",
]


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the key, the value seen and the fix."""


def _require(ok: bool, key: str, value: object, fix: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config: {key}={value!r}: {fix}")


class DType(str, enum.Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"


class Scheduler(str, enum.Enum):
    cosine = "cosine"
    constant = "constant"


class WandbMode(str, enum.Enum):
    auto = "auto"  # online when an API key is present and WANDB_MODE is not "offline", else offline
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "tiny"
    """Label used in run names and logs."""
    path: str | None = None
    """HF hub name or local directory (an ``export/`` of an earlier stage). None: build a tiny
    random-init Llama from the fields below, with the in-process tokenizer."""
    hidden_size: int = 64
    """Tiny model only: width."""
    num_layers: int = 2
    """Tiny model only: decoder layers."""
    num_heads: int = 4
    """Tiny model only: attention heads."""
    num_kv_heads: int = 2
    """Tiny model only: key/value heads (grouped-query attention as in Llama-2-70B / Mistral)."""
    intermediate_size: int = 128
    """Tiny model only: MLP width."""
    dtype: DType = DType.float32
    """Parameter and compute dtype. bf16 on GPUs; fp16 is not offered (refused by DeepSpeed on CPU)."""
    grad_checkpointing: bool = False
    """Recompute activations in backward (the release turns it on for every trained model)."""

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            value = getattr(self, key)
            _require(value > 0, f"model.{key}", value, "use a positive integer")
        _require(
            self.hidden_size % self.num_heads == 0,
            "model.hidden_size",
            self.hidden_size,
            f"must be divisible by model.num_heads={self.num_heads}",
        )
        _require(
            self.num_heads % self.num_kv_heads == 0,
            "model.num_kv_heads",
            self.num_kv_heads,
            f"must divide model.num_heads={self.num_heads}",
        )


@dataclass(kw_only=True)
class RewardSourceConfig:
    path: str | None = None
    """Reward model for RL: an ``export/`` of the reward_model stage or an HF name. None with
    ``data=synthetic``: the task's programmatic gold score is the reward (a rule-based reward),
    so ``python -m jobs.remax`` runs with no argument."""


@dataclass(kw_only=True)
class DataConfig:
    name: str = "synthetic"
    """Label used in run names."""
    source: str = "synthetic"
    """``synthetic`` (the in-repo task), an HF dataset name, or a local json/jsonl/parquet path."""
    template: str = "plain"
    """Chat template applied to prompts (``remax.data.templates.ChatTemplate``)."""
    max_prompt_len: int = 12
    """Prompts are left-truncated to this many tokens, then left-padded (release: 256)."""
    max_response_len: int = 10
    """Maximum generated tokens, EOS included (release: 256)."""
    max_seq_len: int = 24
    """SFT / reward-model sequence cap (release: 512)."""
    num_train: int = 4096
    """Synthetic task: training examples per stage (SFT demos, preference pairs, RL prompts)."""
    num_eval: int = 256
    """Synthetic task: held-out examples (eval prompts for RL must be >= 64)."""
    split: list[int] = field(default_factory=lambda: [2, 4, 4])
    """Real data: DeepSpeed-Chat ``--data_split`` weights for the SFT / RM / RL stages."""
    seed: int = 1234
    """Seed of data generation and splits; independent of the training seed."""

    def __post_init__(self) -> None:
        for key in ("max_prompt_len", "max_response_len", "max_seq_len", "num_train"):
            value = getattr(self, key)
            _require(value > 0, f"data.{key}", value, "use a positive integer")
        _require(self.num_eval >= 64, "data.num_eval", self.num_eval, "use at least 64")
        _require(
            len(self.split) == 3 and all(w >= 0 for w in self.split) and sum(self.split) > 0,
            "data.split",
            self.split,
            "give three non-negative weights, e.g. [2,4,4]",
        )


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate (release: SFT/RM 1e-5, ReMax actor 1e-6)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam betas; the release uses (0.9, 0.95)."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    scheduler: Scheduler = Scheduler.cosine
    """Learning-rate schedule over ``train.max_steps`` (the release: cosine, warmup 0)."""
    warmup_steps: int = 0
    """Linear warm-up steps."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", self.lr, "use a positive learning rate, e.g. 1e-6")
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "use >= 0")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            self.betas,
            "give two values in [0, 1), e.g. [0.9,0.95]",
        )
        _require(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "use >= 0 (0 disables)")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "use >= 0")


@dataclass(kw_only=True)
class TrainConfig:
    batch_size: int = 32
    """Examples (RL: prompts) per optimizer step."""
    micro_batch_size: int = 32
    """Examples per forward/backward; batch_size / micro_batch_size micro-batches per step."""
    max_steps: int = 200
    """Cap on optimizer steps."""
    epochs: int = 1
    """Passes over the training data; training stops at whichever of epochs/max_steps ends first."""
    log_every: int = 10
    """Write a metrics.jsonl row every N steps."""
    eval_every: int = 0
    """RL: evaluate every N steps (0: only before and after training)."""

    def __post_init__(self) -> None:
        for key in ("batch_size", "micro_batch_size", "max_steps", "epochs", "log_every"):
            value = getattr(self, key)
            _require(value > 0, f"train.{key}", value, "use a positive integer")
        _require(
            self.batch_size % self.micro_batch_size == 0,
            "train.micro_batch_size",
            self.micro_batch_size,
            f"must divide train.batch_size={self.batch_size}",
        )
        _require(self.eval_every >= 0, "train.eval_every", self.eval_every, "use >= 0")

    @property
    def grad_accum(self) -> int:
        return self.batch_size // self.micro_batch_size


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 50
    """Write ``checkpoints/step_<N>/`` every N optimizer steps (and at the end); 0 disables."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted after a newer one is complete."""

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, "checkpoint.every_steps", self.every_steps, "use >= 0")
        _require(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "use >= 1")


@dataclass(kw_only=True)
class RunConfig:
    root: str = "runs"
    """Root of all run directories: ``<root>/<stage>/<name>-<signature>/``."""
    name: str = "default"
    """Human label, the prefix of the run directory name."""
    attempt: int = 0
    """Part of the signature: bump it for a deliberately fresh run of an identical config."""
    force: bool = False
    """Start even when the run directory holds a different config (the old one is kept as
    config.previous.yaml)."""

    def __post_init__(self) -> None:
        _require(
            bool(self.name) and "/" not in self.name, "run.name", self.name, "use a plain name"
        )


@dataclass(kw_only=True)
class LogConfig:
    wandb_mode: WandbMode = WandbMode.auto
    """W&B mode. ``auto``: online with an API key, offline otherwise (compute nodes)."""
    wandb_project: str = "remax"
    """W&B project."""
    wandb_entity: str | None = None
    """W&B entity (team); None uses the key's default."""
    wandb_group: str | None = None
    """W&B group; None groups by run name (a pipeline or sweep shares one)."""
    progress: bool = True
    """Show progress bars (tqdm)."""


class Backend(str, enum.Enum):
    local = "local"  # in this process
    slurm = "slurm"  # a Slurm job through submitit; the command returns at once


@dataclass(kw_only=True)
class ClusterConfig:
    """Where a stage runs. Cluster keys never change a run's result, so they are not part of the
    run-dir signature: the same config moves between a laptop and the cluster and resumes."""

    name: str = "local"
    """Preset name (for records and the status table)."""
    backend: Backend = Backend.local
    """``local``: run in this process. ``slurm``: submit a job (or an array for ``-m``)."""
    device: str = "auto"
    """``auto`` (cuda when available), ``cpu`` or ``cuda``."""
    num_threads: int = 0
    """torch intra-op threads on CPU; 0 keeps torch's default."""
    partition: str | None = None
    """Slurm partition; None uses the site default."""
    account: str | None = None
    """Slurm account to bill."""
    qos: str | None = None
    """Slurm quality of service."""
    nodes: int = 1
    """Nodes per job."""
    gpus_per_node: int = 0
    """GPUs per node (an A800 node has 4)."""
    tasks_per_node: int = 1
    """Processes (ranks) per node: one per GPU (``gpus_per_node``) for data parallel training,
    each started by srun with its own GPU; 1 runs one process that sees every GPU of the node."""
    cpus_per_task: int = 4
    """CPU cores per task."""
    mem_gb: int | None = None
    """Memory per node in GB; 0 = the whole node; None = the site default."""
    time_min: int = 60
    """Time limit of one job segment, minutes."""
    signal_delay_s: int = 120
    """USR2 is sent this long before the time limit: time for one step plus a checkpoint."""
    deadline_margin_s: int = 60
    """Without a signal, checkpoint when now + one step + this margin passes the job's end time."""
    max_num_timeout: int = 10
    """Requeues after hitting the time limit before giving up (submitit's countdown)."""
    max_restarts: int = 50
    """Requeues of any cause (preemptions included) before the job refuses to run again."""
    array_parallelism: int = 16
    """Array elements running at once (``%K`` of ``--array``)."""
    gres: bool = False
    """Request GPUs as ``--gres=gpu:N`` instead of ``--gpus-per-node`` (some sites accept only that)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the job step (``module load ...``, ``source venv/bin/activate``)."""
    gpu_hour_rate: float = 0.0
    """Price of one GPU-hour, for cost estimates and the status table."""
    currency: str = "CNY"
    """Currency of ``gpu_hour_rate``."""
    budget: float | None = None
    """Refuse a submission (or sweep) whose estimated cost exceeds this; None: no cap."""
    dry_run: bool = False
    """Print the sbatch script and the estimate; submit nothing."""
    check_memory: bool = True
    """Refuse to submit an RL stage the memory planner (``jobs.plan``) says cannot fit."""

    def __post_init__(self) -> None:
        _require(
            self.device in ("auto", "cpu", "cuda"),
            "cluster.device",
            self.device,
            "use auto, cpu or cuda",
        )
        for key in ("nodes", "tasks_per_node", "cpus_per_task", "time_min", "array_parallelism"):
            value = getattr(self, key)
            _require(value > 0, f"cluster.{key}", value, "use a positive integer")
        for key in (
            "gpus_per_node",
            "signal_delay_s",
            "deadline_margin_s",
            "max_num_timeout",
            "max_restarts",
        ):
            value = getattr(self, key)
            _require(value >= 0, f"cluster.{key}", value, "use an integer >= 0")
        _require(
            not self.gpus_per_node or self.tasks_per_node <= self.gpus_per_node,
            "cluster.tasks_per_node",
            self.tasks_per_node,
            f"use at most one task per GPU (cluster.gpus_per_node={self.gpus_per_node})",
        )
        _require(self.gpu_hour_rate >= 0, "cluster.gpu_hour_rate", self.gpu_hour_rate, "use >= 0")
        _require(
            self.budget is None or self.budget >= 0,
            "cluster.budget",
            self.budget,
            "use >= 0 or null",
        )
        _require(
            self.mem_gb is None or self.mem_gb >= 0,
            "cluster.mem_gb",
            self.mem_gb,
            "use >= 0 or null",
        )

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def estimate(self, jobs: int = 1) -> dict:
        """Upper bound for ``jobs`` job segments: every GPU for the whole time limit."""
        gpu_hours = jobs * self.gpus * self.time_min / 60
        return {
            "gpu_hours": round(gpu_hours, 3),
            "cost": round(gpu_hours * self.gpu_hour_rate, 2),
            "currency": self.currency,
        }


@dataclass(kw_only=True)
class RemaxAlgoConfig:
    """ReMax conventions (remax-spec §4). Defaults are Algorithm 1 of the paper."""

    baseline: Baseline = Baseline.greedy
    """``greedy``: b(x) = r(x, greedy response) (ReMax). ``none``: vanilla REINFORCE (ablation)."""
    samples_per_prompt: int = 1
    """Sampled responses per prompt, all sharing one greedy baseline."""
    kl_coef: float = 0.0
    """β of the per-token KL penalty in the return."""
    kl_mode: KLMode = KLMode.own_token
    """``own_token``: token i carries its own KL (the release); ``reward_to_go``: Σ_{j>=i} (verl)."""
    kl_estimator: KLEstimator = KLEstimator.k1
    """Per-token KL estimator (k1 = log-ratio, as the release)."""
    gamma: float = 1.0
    """Discount of the terminal reward term, in (0, 1]."""
    discount_convention: DiscountConvention = DiscountConvention.official
    """``official``: token i of n gets γ^(n−i) (last token γ¹); ``textbook``: γ^(n−1−i)."""
    reward_clip: float | None = None
    """Clip bound, None for no clip (release: 5.0)."""
    clip_target: ClipTarget = ClipTarget.advantage
    """``advantage``: clip r − r_greedy (the release); ``reward``: clip each score."""
    aggregation: Aggregation = Aggregation.seq_sum
    """``seq_sum`` (Algorithm 1) or ``token_mean`` (the release)."""
    temperature: float = 1.0
    """Sampling temperature (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int = 0
    """Top-k sampling, 0 disables."""
    logprob_dist: LogprobDist = LogprobDist.raw_softmax
    """Which distribution the log-probs score (see remax-spec test 19)."""
    train_on_eos: bool = True
    """EOS is a trained action and the RM reads it."""
    empty_response: EmptyResponse = EmptyResponse.mask
    """Handling of answers that end at once: ``space_token`` (release) or ``mask``."""
    eval_decoding: EvalDecoding = EvalDecoding.sampled
    """Decoding of evaluation answers."""
    early_stop_kl: float | None = None
    """Stop when eval KL reaches this value (release: 1.0); None never stops."""
    entropy_coef: float = 0.0
    """Entropy bonus (parsed but unused upstream; kept for ablation)."""
    epochs: int = 1
    """Passes over one rollout. Fixed at 1: ReMax is on-policy with no importance ratio."""

    def __post_init__(self) -> None:
        _require(self.kl_coef >= 0, "algo.kl_coef", self.kl_coef, "use a value >= 0, e.g. 0.05")
        _require(0 < self.gamma <= 1, "algo.gamma", self.gamma, "use a value in (0, 1], e.g. 0.99")
        _require(
            self.reward_clip is None or self.reward_clip > 0,
            "algo.reward_clip",
            self.reward_clip,
            "use a positive bound or null for no clip",
        )
        _require(self.temperature > 0, "algo.temperature", self.temperature, "use a value > 0")
        _require(0 < self.top_p <= 1, "algo.top_p", self.top_p, "use a value in (0, 1]")
        _require(self.top_k >= 0, "algo.top_k", self.top_k, "use >= 0 (0 disables)")
        _require(
            self.samples_per_prompt >= 1,
            "algo.samples_per_prompt",
            self.samples_per_prompt,
            "use >= 1",
        )
        _require(
            self.epochs == 1,
            "algo.epochs",
            self.epochs,
            "ReMax is on-policy without an importance ratio: use 1 (use the PPO stage for reuse)",
        )
        _require(
            self.early_stop_kl is None or self.early_stop_kl > 0,
            "algo.early_stop_kl",
            self.early_stop_kl,
            "use a positive KL or null",
        )
        _require(self.entropy_coef >= 0, "algo.entropy_coef", self.entropy_coef, "use >= 0")


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
    eval_prompts: int = 128
    """Held-out prompts for the before/after evaluation (>= 64)."""
    export_policy: ExportPolicy = ExportPolicy.last
    """Which actor is exported: the last one, or the best eval reward (the release)."""

    def __post_init__(self) -> None:
        _require(self.eval_prompts >= 64, "eval_prompts", self.eval_prompts, "use at least 64")
        _require(
            self.eval_prompts <= self.data.num_eval,
            "eval_prompts",
            self.eval_prompts,
            f"must not exceed data.num_eval={self.data.num_eval}",
        )
        _require(
            self.reward_model.path is not None or self.data.source == "synthetic",
            "reward_model.path",
            self.reward_model.path,
            "give the reward_model stage's export/ dir (only data=synthetic has a built-in reward)",
        )


# ---- PPO baseline ----


@dataclass(kw_only=True)
class PPOAlgoConfig:
    """PPO as DeepSpeed-Chat defines it (remax-spec §7). Defaults are DS-Chat's trainer constants."""

    kl_coef: float = 0.1
    """β of the per-token k1 KL reward −β·(log π_old − log π_ref) (DS-Chat ``kl_ctl``)."""
    gamma: float = 1.0
    """GAE discount, in (0, 1]."""
    lam: float = 0.95
    """GAE λ, in [0, 1]: 1 gives Monte-Carlo returns, 0 one-step TD."""
    clip_range: float = 0.2
    """ε of the clipped policy surrogate (DS-Chat ``cliprange``)."""
    clip_range_value: float = 0.2
    """Clip of the critic's value around its experience-time value, in reward units
    (DS-Chat ``cliprange_value``)."""
    ppo_epochs: int = 1
    """Passes over one rollout batch."""
    mini_batches: int = 1
    """Optimizer steps per epoch: the rollout batch is cut into this many minibatches, in order.
    Must divide ``train.batch_size``."""
    reward_clip: float | None = 5.0
    """Clip of the raw reward-model score before it is added on the last token (DS-Chat
    ``clip_reward_value``); None for no clip."""
    temperature: float = 1.0
    """Sampling temperature (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int = 0
    """Top-k sampling, 0 disables."""
    train_on_eos: bool = True
    """EOS is a trained action and carries the score (the ReMax release's convention; DS-Chat's
    "+1" end index expresses the same placement, remax-spec §7)."""
    empty_response: EmptyResponse = EmptyResponse.mask
    """Answers that end at once: ``space_token`` (the ReMax release) or ``mask`` (no gradient; the
    closest to DS-Chat, which drops answers of at most one token)."""
    eval_decoding: EvalDecoding = EvalDecoding.sampled
    """Decoding of evaluation answers (the same as the ReMax run's for a fair comparison)."""

    def __post_init__(self) -> None:
        _require(self.kl_coef >= 0, "algo.kl_coef", self.kl_coef, "use a value >= 0, e.g. 0.1")
        _require(0 < self.gamma <= 1, "algo.gamma", self.gamma, "use a value in (0, 1], e.g. 1.0")
        _require(0 <= self.lam <= 1, "algo.lam", self.lam, "use a value in [0, 1], e.g. 0.95")
        _require(
            self.clip_range > 0, "algo.clip_range", self.clip_range, "use a value > 0, e.g. 0.2"
        )
        _require(
            self.clip_range_value > 0,
            "algo.clip_range_value",
            self.clip_range_value,
            "use a value > 0, e.g. 0.2",
        )
        _require(self.ppo_epochs >= 1, "algo.ppo_epochs", self.ppo_epochs, "use >= 1")
        _require(self.mini_batches >= 1, "algo.mini_batches", self.mini_batches, "use >= 1")
        _require(
            self.reward_clip is None or self.reward_clip > 0,
            "algo.reward_clip",
            self.reward_clip,
            "use a positive bound or null for no clip",
        )
        _require(self.temperature > 0, "algo.temperature", self.temperature, "use a value > 0")
        _require(0 < self.top_p <= 1, "algo.top_p", self.top_p, "use a value in (0, 1]")
        _require(self.top_k >= 0, "algo.top_k", self.top_k, "use >= 0 (0 disables)")


@dataclass(kw_only=True)
class PPOJobConfig(_StageConfig):
    """PPO baseline: actor from ``model.path`` (also the frozen reference), critic initialised from
    the reward model, reward from ``reward_model``."""

    stage = "ppo"
    algo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)
    reward_model: RewardSourceConfig = field(default_factory=RewardSourceConfig)
    critic_optim: OptimConfig = field(default_factory=OptimConfig)
    """Critic optimizer (DS-Chat ``critic_learning_rate``, ``critic_weight_decay``); ``optim`` is
    the actor's."""
    eval_prompts: int = 128
    """Held-out prompts for the before/after evaluation (>= 64)."""

    def __post_init__(self) -> None:
        _require(self.eval_prompts >= 64, "eval_prompts", self.eval_prompts, "use at least 64")
        _require(
            self.eval_prompts <= self.data.num_eval,
            "eval_prompts",
            self.eval_prompts,
            f"must not exceed data.num_eval={self.data.num_eval}",
        )
        _require(
            self.reward_model.path is not None or self.data.source == "synthetic",
            "reward_model.path",
            self.reward_model.path,
            "give the reward_model stage's export/ dir (only data=synthetic has a built-in reward)",
        )
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


# ---- evaluation ----


class PromptFormat(str, enum.Enum):
    prompts = "prompts"  # one prompt per row; columns detected (prompt, instruction, HH, .txt, ...)
    alpaca_eval = "alpaca_eval"  # an AlpacaEval set: one ``instruction`` per row
    mt_bench = "mt_bench"  # FastChat questions: ``question_id`` and ``turns``, every turn answered


class AnswerFormat(str, enum.Enum):
    none = "none"
    alpaca_eval = "alpaca_eval"  # alpaca_eval/<name>.json: [{instruction, output, generator}]
    mt_bench = "mt_bench"  # mt_bench/model_answer/<name>.jsonl, as FastChat gen_model_answer.py


@dataclass(kw_only=True)
class ReferenceConfig:
    path: str | None = None
    """Reference policy of the KL column: an ``export/`` dir or HF name (usually the SFT export);
    None: no KL."""


@dataclass(kw_only=True)
class EvaluateJobConfig:
    """Evaluation: answers of one or more policies on one prompt set, scored and compared (A vs B)."""

    stage = "evaluate"
    seed: int = 42
    """Seed of sampled decoding; batch k is seeded from (seed, k), so answers do not depend on
    batch order or on resuming."""
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    """Held-out prompts (``prompt_source=held_out``), the chat template, ``max_prompt_len``."""
    log: LogConfig = field(default_factory=LogConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    policies: list[str] = field(default_factory=list)
    """Policies to evaluate: ``export/`` dirs or HF names. A = the first, B = the second."""
    names: list[str] = field(default_factory=list)
    """Labels of the policies (answer-file names, AlpacaEval ``generator``, MT-bench ``model_id``);
    empty: ``<stage>-<run dir>`` of an ``export/`` path, else the path's last part."""
    reward_model: RewardSourceConfig = field(default_factory=RewardSourceConfig)
    """Reward model of the win rate; None on held-out synthetic prompts: the gold score; None on
    other prompts: no reward (answer files only)."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    prompt_source: str = "held_out"
    """``held_out``: the held-out RL prompts of ``data`` (the synthetic task's by default); else a
    prompt set, a local file or an HF data set name, read as ``prompt_format``."""
    prompt_format: PromptFormat = PromptFormat.prompts
    """How a prompt set is read (``held_out`` ignores it: it is always single-turn)."""
    prompt_split: str = "train"
    """Split of an HF prompt set (AlpacaEval's is ``eval``); ignored for local files."""
    num_prompts: int | None = None
    """The first N prompts; None: all (``held_out``: data.num_eval)."""
    decoding: EvalDecoding = EvalDecoding.sampled
    """``sampled`` (the distribution RL optimised, as the ReMax stage evaluates) or ``greedy``
    (one deterministic answer per prompt, common for judge submissions)."""
    temperature: float = 1.0
    """Sampled decoding: temperature (> 0)."""
    top_p: float = 1.0
    """Sampled decoding: nucleus mass, in (0, 1]."""
    top_k: int = 0
    """Sampled decoding: top-k, 0 disables."""
    max_new_tokens: int | None = None
    """Generated tokens per answer (per turn), EOS included; None: data.max_response_len."""
    batch_size: int = 64
    """Prompts per generation batch."""
    answer_format: AnswerFormat = AnswerFormat.none
    """Also write one judge answer file per policy (``alpaca_eval`` or ``mt_bench``)."""
    dtype: DType = DType.float32
    """Parameter and compute dtype of every loaded model (bf16 on GPUs)."""

    def __post_init__(self) -> None:
        _require(
            len(self.policies) >= 1,
            "policies",
            self.policies,
            "give one or more export/ dirs or HF names, e.g. policies=[runs/remax/<dir>/export]",
        )
        _require(
            not self.names or len(self.names) == len(self.policies),
            "names",
            self.names,
            f"give one name per policy ({len(self.policies)}) or none",
        )
        labels = self.labels
        _require(
            len(set(labels)) == len(labels) and all(n and "/" not in n for n in labels),
            "names",
            labels,
            "labels must be distinct plain names: set names=[a,b,...]",
        )
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "use >= 1")
        _require(
            self.num_prompts is None or self.num_prompts >= 1,
            "num_prompts",
            self.num_prompts,
            "use >= 1, or null for all",
        )
        _require(
            not (self.prompt_source == "held_out" and self.data.source == "synthetic")
            or (self.num_prompts or 0) <= self.data.num_eval,
            "num_prompts",
            self.num_prompts,
            f"must not exceed data.num_eval={self.data.num_eval}",
        )
        _require(
            self.max_new_tokens is None or self.max_new_tokens >= 1,
            "max_new_tokens",
            self.max_new_tokens,
            "use >= 1, or null for data.max_response_len",
        )
        _require(self.temperature > 0, "temperature", self.temperature, "use a value > 0")
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "use a value in (0, 1]")
        _require(self.top_k >= 0, "top_k", self.top_k, "use >= 0 (0 disables)")
        _require(
            self.answer_format != AnswerFormat.mt_bench
            or self.prompt_format == PromptFormat.mt_bench,
            "answer_format",
            self.answer_format.value,
            "MT-bench answers need MT-bench questions: set prompt_format=mt_bench",
        )
        _require(
            self.answer_format != AnswerFormat.alpaca_eval
            or self.prompt_format != PromptFormat.mt_bench,
            "answer_format",
            self.answer_format.value,
            "AlpacaEval answers are single-turn: use answer_format=mt_bench for MT-bench questions",
        )
        _require(
            self.prompt_source != "synthetic",
            "prompt_source",
            self.prompt_source,
            "use held_out for the synthetic task's held-out prompts",
        )

    @property
    def labels(self) -> list[str]:
        """The policies' names: ``names``, or derived from the paths."""
        if self.names:
            return list(self.names)
        out = []
        for path in self.policies:
            parts = path.rstrip("/").split("/")
            is_export = parts[-1] == "export" and len(parts) >= 3
            out.append(f"{parts[-3]}-{parts[-2]}" if is_export else parts[-1])
        return out

    @property
    def response_len(self) -> int:
        """Generated tokens per answer: ``max_new_tokens``, else ``data.max_response_len``."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return self.data.max_response_len

    @property
    def template(self) -> str:
        """Chat template of the prompts; held-out synthetic prompts are never templated (as in
        training, ``remax.data.stage_data.format_prompts``)."""
        if self.prompt_source == "held_out" and self.data.source == "synthetic":
            return "plain"
        return self.data.template


__all__ += ["AnswerFormat", "EvaluateJobConfig", "PromptFormat", "ReferenceConfig"]


# ---- DeepSpeed (multi-rank engines) ----


@dataclass(kw_only=True)
class DeepSpeedConfig:
    """How the actor (and the frozen reference and RM) are placed across ranks under DeepSpeed.

    Only placement: the numbers a run computes come from ``model``, ``optim`` and ``train``, which
    :func:`deepspeed_json` reads (bf16 from ``model.dtype``, clipping from ``optim.grad_clip``,
    batch sizes from ``train``), so the JSON DeepSpeed receives is generated, never kept by hand.
    Presets: ``hydra_conf/deepspeed/`` (zero0, zero2, zero3, zero3_offload).
    """

    enabled: bool = False
    """Off: plain PyTorch data parallelism (world size 1 behaves exactly as without DeepSpeed)."""
    zero_stage: int = 2
    """Actor ZeRO stage: 0 (replicated), 1 (optimizer), 2 (+ gradients), 3 (+ parameters)."""
    offload_optimizer: bool = False
    """Optimizer state in CPU memory (needs DeepSpeed's cpu_adam op, built once per cache)."""
    offload_params: bool = False
    """The actor's ZeRO-3 parameters in CPU memory."""
    inference_offload_params: bool = False
    """The frozen reference's and RM's ZeRO-3 parameters in CPU memory (release:
    ``--offload_reference_model --offload_reward_model``); any actor stage."""
    reduce_bucket_size: int = 500_000_000
    """Elements per gradient reduce/partition bucket."""
    allgather_bucket_size: int = 500_000_000
    """Elements per ZeRO-1/2 parameter all-gather bucket."""
    overlap_comm: bool = True
    """Overlap gradient reduction with the backward pass."""
    inference_zero_stage: int = 3
    """Stage of the frozen reference and reward model engines (3 = sharded, no optimizer)."""
    gather_for_generation: bool = True
    """ZeRO-3: gather the actor's parameters once per rollout, not once per decoding step."""

    def __post_init__(self) -> None:
        for key in ("zero_stage", "inference_zero_stage"):
            value = getattr(self, key)
            _require(value in (0, 1, 2, 3), f"deepspeed.{key}", value, "use 0, 1, 2 or 3")
        _require(
            not self.offload_params or self.zero_stage == 3,
            "deepspeed.offload_params",
            self.offload_params,
            f"parameter offload needs deepspeed.zero_stage=3 (is {self.zero_stage})",
        )
        _require(
            not self.inference_offload_params or self.inference_zero_stage == 3,
            "deepspeed.inference_offload_params",
            self.inference_offload_params,
            f"parameter offload needs deepspeed.inference_zero_stage=3 "
            f"(is {self.inference_zero_stage})",
        )
        _require(
            not self.offload_optimizer or self.zero_stage >= 1,
            "deepspeed.offload_optimizer",
            self.offload_optimizer,
            "optimizer offload needs deepspeed.zero_stage >= 1",
        )
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            value = getattr(self, key)
            _require(value > 0, f"deepspeed.{key}", value, "use a positive element count")


def deepspeed_json(
    ds: DeepSpeedConfig,
    *,
    optim: OptimConfig,
    train: TrainConfig,
    dtype: DType,
    world_size: int,
    rows_per_prompt: int = 1,
    inference: bool = False,
) -> dict:
    """The DeepSpeed config dict of the actor (or, ``inference=True``, of a frozen model).

    Batch sizes are in rows (prompts × ``rows_per_prompt``) per rank. The optimizer is the client's
    ``torch.optim.AdamW`` (passed to ``deepspeed.initialize``), so no ``optimizer`` block appears
    and no fused/CPU Adam op is JIT-built (python-stack.md) unless optimizer offload asks for it.
    """
    _require(
        train.batch_size % world_size == 0,
        "train.batch_size",
        train.batch_size,
        f"is not divisible by the world size {world_size}: use a multiple of {world_size}",
    )
    per_rank = train.batch_size // world_size
    micro = min(train.micro_batch_size, per_rank)
    _require(
        per_rank % micro == 0,
        "train.micro_batch_size",
        train.micro_batch_size,
        f"must divide the per-rank batch {per_rank} (train.batch_size / world size {world_size})",
    )
    stage = ds.inference_zero_stage if inference else ds.zero_stage
    zero: dict = {"stage": stage}
    if stage in (1, 2):
        zero.update(
            reduce_bucket_size=ds.reduce_bucket_size,
            allgather_bucket_size=ds.allgather_bucket_size,
            overlap_comm=ds.overlap_comm,
            contiguous_gradients=True,
        )
    if stage == 3:
        zero.update(reduce_bucket_size=ds.reduce_bucket_size, overlap_comm=ds.overlap_comm)
        if ds.inference_offload_params if inference else ds.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_optimizer and not inference:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    out = {
        "train_micro_batch_size_per_gpu": micro * rows_per_prompt,
        "gradient_accumulation_steps": per_rank // micro,
        "train_batch_size": train.batch_size * rows_per_prompt,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == DType.bfloat16},
        "fp16": {"enabled": False},  # refused on CPU; bf16 needs no loss scaling on A800s
        "steps_per_print": 10**9,  # our MetricWriter logs; DeepSpeed's own prints stay quiet
        "wall_clock_breakdown": False,
    }
    if not inference:
        out["gradient_clipping"] = optim.grad_clip
    return out


__all__ += ["DeepSpeedConfig", "deepspeed_json"]
