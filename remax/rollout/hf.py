"""The ``hf`` rollout engine: the actor decodes its own rollouts with ``remax.rollout.generate``.

No second copy of the weights and nothing to push: the actor is the engine. Under ZeRO-3 its
parameters are gathered once for the whole decode (``actor.generation()``), and when forwards are
collective every rank decodes until all are done (``actor.all_finished``).
"""

from __future__ import annotations

import contextlib

import torch

from remax.config.sampling import SamplingConfig
from remax.rollout.sampler import Rollout, generate


class HFEngine:
    """The actor (anything with ``module``, ``generation()`` and ``all_finished``: a training
    ``remax.engines.Engine``, or :func:`as_actor` of a frozen model) decodes its own rollouts."""

    def __init__(self, actor, tokenizer) -> None:
        self.actor, self.tokenizer = actor, tokenizer

    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        sampling: SamplingConfig,
        *,
        greedy: bool | torch.Tensor,
    ) -> Rollout:
        with self.actor.generation():
            return generate(
                self.actor.module,
                prompt_ids,
                prompt_mask,
                sampling,
                greedy=greedy,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                all_finished=self.actor.all_finished,
            )

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
