"""What a rollout engine provides (:class:`RolloutEngine`), and the one chosen from ``rollout.engine``.

``hf`` (``remax.rollout.hf``) decodes with the actor itself; ``vllm`` (``remax.rollout.vllm``)
with a colocated vLLM engine it pushes the actor's weights to. Both provide the same three calls,
so a trainer reads the same with either.

``offpolicy_gap`` is the metric of the ``vllm`` engine: how far its sampling distribution is from
the actor that scores the samples.
"""

from __future__ import annotations

from typing import Protocol

import torch

from remax.config.rollout import RolloutConfig
from remax.config.rollout import RolloutEngine as EngineName
from remax.config.sampling import SamplingConfig
from remax.rollout.hf import HFEngine
from remax.rollout.sampler import Rollout


class RolloutEngine(Protocol):
    """A decoder of rollouts for a stage's actor (the trainers' ``rollout_engine``).

    Notation: B batch, P prompt length (left-padded), T generated length (right-padded).
    """

    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        sampling: SamplingConfig,
        *,
        greedy: bool | torch.Tensor,
    ) -> Rollout:
        """One batch of rows: ``prompt_ids``/``prompt_mask`` (B, P); ``greedy`` True/False, or a
        (B,) bool choosing the greedy rows (temperature 0) among the ``sampling`` ones. The
        contract of ``remax.rollout.generate``: same stop rule, the first EOS kept in
        ``response_mask``; ``Rollout.logprobs`` (B, T) when the engine is not the actor, else
        None."""

    def weights_updated(self) -> None:
        """The actor stepped: decode with its new weights from the next call on."""

    def close(self) -> None:
        """Release what the engine holds (an engine process, its memory)."""


def build_rollout_engine(
    cfg: RolloutConfig, actor, tokenizer, *, max_model_len: int, seed: int
) -> RolloutEngine:
    """``HFEngine`` or ``remax.rollout.vllm.VLLMEngine`` for ``actor`` (anything with ``module``
    and ``generation()``, see ``remax.engines``)."""
    if cfg.engine == EngineName.hf:
        return HFEngine(actor, tokenizer)
    from remax.rollout.vllm import VLLMEngine  # vLLM itself: only when chosen

    return VLLMEngine(actor, tokenizer, cfg, max_model_len=max_model_len, seed=seed)


def offpolicy_gap(rollout: Rollout, actor_logprobs: torch.Tensor) -> float | None:
    """max |log p_engine − log p_actor| over the generated tokens of ``rollout``, or None when the
    actor decoded (``hf``: no gap by construction).

    ``actor_logprobs``: (B, T) the actor's raw-softmax log-probs of ``rollout.response``. Tokens
    whose engine log-prob is NaN (rewritten after decoding, e.g. empty answers) are left out.
    """
    if rollout.logprobs is None:
        return None
    keep = rollout.response_mask & rollout.logprobs.isfinite()
    if not bool(keep.any()):
        return 0.0
    diff = (rollout.logprobs - actor_logprobs.detach().to(rollout.logprobs.dtype)).abs()
    return float(diff[keep].max())


def mark_unsampled(logprobs: torch.Tensor | None, rows: torch.Tensor, width: int):
    """The engine's (B, T) log-probs with ``rows``' first ``width`` tokens set to NaN, widened to
    ``width`` if needed: tokens rewritten after decoding (empty answers) were not sampled."""
    if logprobs is None:
        return None
    out = torch.nn.functional.pad(logprobs, (0, max(0, width - logprobs.shape[1])))
    out[rows, :width] = float("nan")
    return out
