"""DeepSpeed placement (``deepspeed``) and the JSON DeepSpeed receives, generated from it."""

from __future__ import annotations

from dataclasses import dataclass

from remax.config.base import DType, _require
from remax.config.train import OptimConfig, TrainConfig


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
    per_rank = train.per_rank(world_size)
    accumulation = train.rank_grad_accum(world_size)
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
        "train_micro_batch_size_per_gpu": per_rank // accumulation * rows_per_prompt,
        "gradient_accumulation_steps": accumulation,
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
