"""The ``rollout`` group: which engine decodes the sampled and greedy responses.

``hf`` decodes with the trained actor itself (``remax.rollout.generate``). ``vllm`` hands the same
requests to a vLLM engine colocated in each rank's process (``remax.rollout.vllm``): the actor's
weights are pushed to it after every optimizer step, and the actor still computes every log-prob
the loss uses.
"""

from __future__ import annotations

import enum
import importlib.util
from dataclasses import dataclass

from remax.config.base import _require


class RolloutEngine(str, enum.Enum):
    hf = "hf"  # the actor's own batched decode with a KV cache (default; no extra install)
    vllm = "vllm"  # vLLM (``pip install '.[vllm]'`` or ``make vllm``)


class PushRoute(str, enum.Enum):
    """How the ``vllm`` engine receives the actor's weights after each optimizer step."""

    auto = "auto"  # ``remax.rollout.vllm.push_route``: direct, but file on several CPU ranks
    direct = "direct"  # the engine in the rank's own process, parameters loaded in place
    file = "file"  # the engine in its own process, reloaded from a /dev/shm safetensors file


@dataclass(kw_only=True)
class RolloutConfig:
    engine: RolloutEngine = RolloutEngine.hf
    """``hf`` or ``vllm``: who decodes rollouts and evaluation answers."""
    kv_cache_gib: float = 1.0
    """vLLM's KV-cache budget per rank, GiB (rounded up to whole GiB on the CPU build, whose
    ``VLLM_CPU_KVCACHE_SPACE`` is an integer). Counted by the memory planner."""
    sleep: bool = True
    """GPUs only: release vLLM's weights and KV cache (its sleep mode) while the actor trains."""
    samples_per_prompt: int = 1
    """k sampled responses per prompt: the group RLOO and GRPO compare (``algo.baseline``), or k
    samples sharing one greedy baseline (ReMax). The PPO and evaluate stages decode one."""
    push: PushRoute = PushRoute.auto
    """vllm only: ``auto`` (direct; file on the CPU build with several ranks), ``direct``, ``file``."""
    push_chunk_mib: int = 512
    """vllm, direct route: parameters are gathered (ZeRO-3) and loaded in chunks of this size."""

    def require_one_sample(self, stage: str) -> None:
        """Refuses k > 1 in a stage that decodes one answer per prompt (PPO, evaluation)."""
        _require(
            self.samples_per_prompt == 1,
            "rollout.samples_per_prompt",
            self.samples_per_prompt,
            f"the {stage} stage decodes one answer per prompt: use 1 (k > 1: jobs.remax)",
        )

    def __post_init__(self) -> None:
        _require(
            self.samples_per_prompt >= 1,
            "rollout.samples_per_prompt",
            self.samples_per_prompt,
            "use >= 1",
        )
        _require(self.kv_cache_gib > 0, "rollout.kv_cache_gib", self.kv_cache_gib, "use > 0")
        _require(self.push_chunk_mib > 0, "rollout.push_chunk_mib", self.push_chunk_mib, "use > 0")
        if self.engine == RolloutEngine.vllm:
            _require(
                importlib.util.find_spec("vllm") is not None,
                "rollout.engine",
                self.engine.value,
                "vLLM is not installed: `make vllm` (or pip install '.[vllm]'), "
                "or use rollout.engine=hf",
            )
