"""The policy or reward model a stage loads (``model``, ``reward_model``)."""

from __future__ import annotations

from dataclasses import dataclass

from remax.config.base import DType, _require


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
