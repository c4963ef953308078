"""The rollout engine of a stage, chosen once from ``rollout.engine``: ``hf`` or ``vllm``.

Both answer the same two calls, so a trainer reads the same with either:

- ``engine.generate(ids, mask, sampling, greedy=...) -> Rollout``: one batch of sampled and greedy
  rows (``remax.rollout``'s contract);
- ``engine.weights_updated()``: after every optimizer step. ``hf`` decodes with the actor itself
  and has nothing to do; ``vllm`` pushes the new weights before its next decode.

``offpolicy_gap`` is the metric of the ``vllm`` engine: how far its sampling distribution is from
the actor that scores the samples.
"""

from __future__ import annotations

import contextlib

import torch

from remax.config.rollout import RolloutConfig, RolloutEngine
from remax.config.sampling import SamplingConfig
from remax.engines import decode
from remax.rollout import Rollout


class HFEngine:
    """The actor decodes its own rollouts (``remax.engines.decode``; ZeRO-3 gathers once)."""

    def __init__(self, actor, tokenizer) -> None:
        self.actor, self.tokenizer = actor, tokenizer

    def generate(
        self, ids: torch.Tensor, mask: torch.Tensor, sampling: SamplingConfig, *, greedy
    ) -> Rollout:
        return decode(self.actor, ids, mask, sampling, greedy=greedy, tokenizer=self.tokenizer)

    def weights_updated(self) -> None:
        pass  # the actor is the engine

    def close(self) -> None:
        pass


class _FrozenActor:
    """A frozen policy seen as an actor (``module``, ``generation()``), for evaluation."""

    def __init__(self, model) -> None:
        self.module = model

    def generation(self):
        return contextlib.nullcontext()

    def all_finished(self, done: bool) -> bool:
        return done


def as_actor(model) -> _FrozenActor:
    """A plain model with the actor interface ``build_rollout_engine`` takes."""
    return _FrozenActor(model)


def build_rollout_engine(cfg: RolloutConfig, actor, tokenizer, *, max_model_len: int, seed: int):
    """``HFEngine`` or ``remax.rollout_vllm.VLLMEngine`` for ``actor`` (anything with ``module``
    and ``generation()``, see ``remax.engines``)."""
    if cfg.engine == RolloutEngine.hf:
        return HFEngine(actor, tokenizer)
    from remax.rollout_vllm import VLLMEngine

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
