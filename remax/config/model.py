"""The policy or reward model a stage loads (``model``, ``reward_model``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from remax.config.base import DType, _require


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA adapters (``model.lora``), on the PEFT library; applied after the model loads."""

    rank: int = 0
    """Adapter rank r; 0: no adapters, the whole model trains (the default)."""
    alpha: float = 16.0
    """Scale numerator: the update is (alpha / rank) · B A."""
    dropout: float = 0.0
    """Dropout on the adapters' input (0 keeps a step deterministic given its RNG state)."""
    target_modules: list[str] | None = None
    """Module names that get adapters; None: the architecture's default (every attention and
    MLP projection of Llama/Mistral, the attention and MLP linears of OPT)."""

    def __post_init__(self) -> None:
        _require(self.rank >= 0, "model.lora.rank", self.rank, "use 0 (off) or a positive rank")
        _require(self.alpha > 0, "model.lora.alpha", self.alpha, "use a positive scale")
        _require(
            0.0 <= self.dropout < 1.0, "model.lora.dropout", self.dropout, "use a value in [0, 1)"
        )
        _require(
            self.target_modules is None or len(self.target_modules) > 0,
            "model.lora.target_modules",
            self.target_modules,
            "name at least one module, or leave it unset for the architecture's default",
        )

    @property
    def enabled(self) -> bool:
        return self.rank > 0


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
    num_heads: int = 2
    """Tiny model only: attention heads (head_dim 64 / 2 = 32: vLLM's CPU attention needs >= 32)."""
    num_kv_heads: int = 1
    """Tiny model only: key/value heads (grouped-query attention as in Llama-2-70B / Mistral)."""
    intermediate_size: int = 128
    """Tiny model only: MLP width."""
    dtype: DType = DType.float32
    """Parameter and compute dtype. bf16 on GPUs; fp16 is not offered (refused by DeepSpeed on CPU)."""
    grad_checkpointing: bool = False
    """Recompute activations in backward (the release turns it on for every trained model)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters; ``model.lora.rank=0`` (the default) trains every weight."""

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


class RewardKind(str, enum.Enum):
    """How the reward is computed (``reward_model.kind``); ``remax.models.reward_adapters`` maps
    each model kind to its loader and head, ``remax.rewards`` the function kind."""

    export = "export"  # this project's reward_model export: ``score`` head read at the end token
    hf_seq_cls = "hf_seq_cls"  # any AutoModelForSequenceClassification, pooled where HF pools
    regression_head = "regression_head"  # UltraRM-style: Llama backbone + ``regression_head``
    function = "function"  # a Python ``module:function`` of (prompts, responses) -> floats


class RewardTemplate(str, enum.Enum):
    """The text the reward model reads (``reward_model.template``)."""

    policy = "policy"  # the policy's prompt text (its chat template) + response (+ EOS if stopped)
    tokenizer = "tokenizer"  # the RM tokenizer's own chat template over [user, assistant]
    format = "format"  # ``reward_model.format`` with {prompt} and {response}, BOS as the RM adds it


class RewardNormalization(str, enum.Enum):
    """What is done to the raw score before RL uses it (``reward_model.normalize``)."""

    none = "none"  # the raw score (the release, the Mistral card)
    fixed = "fixed"  # (score − reward_model.offset) / reward_model.scale, constants measured once


ULTRARM_FORMAT = "Human: {prompt}\nAssistant: {response}"


@dataclass(kw_only=True)
class RewardSourceConfig:
    path: str | None = None
    """Reward model for RL: an ``export/`` of the reward_model stage or an HF name. None with
    ``data=synthetic``: the task's programmatic gold score is the reward (a rule-based reward),
    so ``python -m jobs.remax`` runs with no argument."""
    kind: RewardKind = RewardKind.export
    """``export`` (this project's RM), ``hf_seq_cls`` (any HF sequence-classification RM),
    ``regression_head`` (UltraRM-13B's custom head) or ``function`` (``reward_model.function``)."""
    function: str | None = None
    """``kind=function`` only: ``module:function`` taking (prompts, responses) as lists of text and
    returning one float per row, e.g. ``remax.data.synthetic:gold_rewards``."""
    template: RewardTemplate = RewardTemplate.policy
    """Text the RM scores: the policy's (same-tokenizer RMs, this project's exports), the RM
    tokenizer's chat template, or ``reward_model.format``."""
    format: str = ULTRARM_FORMAT
    """``template=format`` only: the RM's training format; the default is UltraRM-13B's."""
    max_len: int | None = None
    """RM tokens per row; longer rows keep their last tokens (and a leading BOS), so the token the
    RM reads survives. None: no limit (``template=policy`` prompts keep data.max_prompt_len)."""
    trust_remote_code: bool = False
    """Run the RM repository's own modelling code. Only when you trust that repository."""
    normalize: RewardNormalization = RewardNormalization.none
    """Score normalisation; clipping is ``algo.reward_clip`` with ``algo.clip_target``."""
    offset: float = 0.0
    """``normalize=fixed``: subtracted from every score (e.g. the SFT policy's mean reward)."""
    scale: float = 1.0
    """``normalize=fixed``: the shifted score is divided by it (e.g. the SFT policy's reward std)."""

    def __post_init__(self) -> None:
        is_fn = self.kind == RewardKind.function
        _require(
            not is_fn or _is_import_spec(self.function),
            "reward_model.function",
            self.function,
            "kind=function needs an importable module:function, e.g. "
            "reward_model.function=remax.data.synthetic:gold_rewards",
        )
        _require(
            is_fn or self.function is None,
            "reward_model.function",
            self.function,
            f"only read with reward_model.kind=function (kind is {self.kind.value}); drop it",
        )
        _require(
            not is_fn or self.path is None,
            "reward_model.path",
            self.path,
            "kind=function takes no model path; drop reward_model.path",
        )
        _require(
            "{response}" in self.format,
            "reward_model.format",
            self.format,
            "must contain {response} (and usually {prompt})",
        )
        _require(
            self.max_len is None or self.max_len >= 2,
            "reward_model.max_len",
            self.max_len,
            "use >= 2, or null for no limit",
        )
        _require(self.scale > 0, "reward_model.scale", self.scale, "use a positive number")

    @property
    def has_reward(self) -> bool:
        """True when a model or a function gives the reward (else: the synthetic gold score)."""
        return self.path is not None or self.kind == RewardKind.function


def _is_import_spec(spec: str | None) -> bool:
    module, _, name = (spec or "").partition(":")
    return bool(module) and name.isidentifier()
