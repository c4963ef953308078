"""How a stage trains and checkpoints (``optim``, ``train``, ``checkpoint``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from remax.config.base import Scheduler, _require


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
        """Micro-batches of the whole step (all ranks together)."""
        return self.batch_size // self.micro_batch_size

    def per_rank(self, world_size: int) -> int:
        """Examples per rank and step: ``batch_size`` / number of ranks (processes, not GPUs)."""
        _require(
            self.batch_size % world_size == 0,
            "train.batch_size",
            self.batch_size,
            f"is not divisible by the world size {world_size}: use a multiple of {world_size} "
            "or change the number of ranks",
        )
        return self.batch_size // world_size

    def rank_grad_accum(self, world_size: int) -> int:
        """Micro-batches one rank runs per step (DeepSpeed's ``gradient_accumulation_steps``)."""
        per_rank = self.per_rank(world_size)
        micro = min(self.micro_batch_size, per_rank)
        _require(
            per_rank % micro == 0,
            "train.micro_batch_size",
            self.micro_batch_size,
            f"must divide the per-rank batch {per_rank} (train.batch_size / world size "
            f"{world_size})",
        )
        return per_rank // micro


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 50
    """Write ``checkpoints/step_<N>/`` every N optimizer steps (and at the end); 0 disables."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted after a newer one is complete."""

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, "checkpoint.every_steps", self.every_steps, "use >= 0")
        _require(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "use >= 1")
