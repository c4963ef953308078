"""Rollouts: the one sampler, what it returns, and the engines that run it.

- ``sampler``: :func:`generate`, the only sampler (sampled and greedy rows in one decode), and
  :class:`Rollout`, the batch every engine returns;
- ``engine``: the :class:`RolloutEngine` protocol (``generate``, ``weights_updated``, ``close``),
  ``build_rollout_engine`` (``rollout.engine``) and the off-policy metrics;
- ``hf``: the actor decodes its own rollouts (default);
- ``vllm``: a vLLM engine colocated in each rank's process (imported only when chosen).

Training engines (plain PyTorch, DeepSpeed) are ``remax.engines``.
"""

from remax.config.sampling import SamplingConfig
from remax.rollout.engine import (
    RolloutEngine,
    build_rollout_engine,
    mark_unsampled,
    offpolicy_gap,
)
from remax.rollout.hf import HFEngine, as_actor
from remax.rollout.sampler import Rollout, generate

__all__ = [
    "HFEngine",
    "Rollout",
    "RolloutEngine",
    "SamplingConfig",
    "as_actor",
    "build_rollout_engine",
    "generate",
    "mark_unsampled",
    "offpolicy_gap",
]
