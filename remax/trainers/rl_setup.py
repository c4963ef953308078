"""What an RL trainer works with besides the models it trains (issue #21): the tokenizer, the frozen
reference and reward, the rollout engine, the prompt sets, the sampling and the special token ids,
in one explicit object (:class:`RLSetup`) that :func:`build` assembles once.

The RL evaluation (``rl_eval``), the final summary (``conventions.final_summary``) and a trainer's
own steps read it, and nothing reads a trainer's attributes: a new RL algorithm is a trainer that
holds an ``RLSetup`` and its own actor (``tests/test_rl_setup.py`` builds one from this alone).
Its methods are the conventions every RL algorithm of this project shares (remax-spec §3, §4 rows
13-14): a decode post-processed for empty answers, the frozen reward, the gold score, the train
mask, and scoring under the distribution trained on.

Notation: B batch, P prompt length, T response length, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from remax import answer_metrics, distributed
from remax.algo.logprobs import logprobs_from_logits
from remax.algo.sampling import nucleus_with_token
from remax.config import LogprobDist
from remax.config.sampling import SamplingConfig
from remax.data.batching import PromptBatch, collate_prompts
from remax.data.stage_data import format_prompts, stage_records
from remax.engines import frozen
from remax.models import lora
from remax.rewards import RewardScorer
from remax.rollout import Rollout, RolloutEngine, build_rollout_engine
from remax.trainers import conventions


class PromptSets(NamedTuple):
    """An RL stage's prompts, each list also raw (before the policy's chat template: reward-model
    templates and reward functions read those). ``held``: every held-out prompt, of which the
    first ``eval_prompts`` are the reported ``eval`` set."""

    train: list[str]
    train_raw: list[str]
    eval: list[str]
    eval_raw: list[str]
    held: list[str]
    held_raw: list[str]


class TokenIds(NamedTuple):
    """The policy tokenizer's ids the conventions write: EOS, pad, and " " (empty answers)."""

    eos: int
    pad: int
    space: int


def prompt_sets(cfg, tokenizer) -> PromptSets:
    """The train and held-out prompts of ``cfg.data``, templated for ``tokenizer`` and raw."""
    train, held_out = stage_records("prompts", cfg.data)
    held = [r["prompt"] for r in format_prompts(held_out, cfg.data, tokenizer)]
    held_raw = [r["prompt"] for r in held_out]
    return PromptSets(
        train=[r["prompt"] for r in format_prompts(train, cfg.data, tokenizer)],
        train_raw=[r["prompt"] for r in train],
        eval=held[: cfg.eval_prompts],
        eval_raw=held_raw[: cfg.eval_prompts],
        held=held,
        held_raw=held_raw,
    )


class Loaded(NamedTuple):
    """What an RL stage loads before its actor is built (``load``): ``build``'s inputs."""

    tokenizer: Any
    reference: Any  # the frozen copy of the initial policy (LoRA: the policy, adapters off)
    scorer: RewardScorer | None
    prompts: PromptSets


def load(cfg, model, tokenizer, device) -> Loaded:
    """The reference of the loaded (and adapted) ``model``, the frozen reward (``load_scorer``)
    and the prompt sets: what the trainer needs before its actor (the sampler's length, PPO's
    critic) and ``build`` after it."""
    return Loaded(
        tokenizer=tokenizer,
        reference=lora.reference(model),
        scorer=load_scorer(cfg, tokenizer, device),
        prompts=prompt_sets(cfg, tokenizer),
    )


def load_scorer(cfg, tokenizer, device) -> RewardScorer | None:
    """The frozen reward of an RL stage (``remax.rewards``): a reward model of any tokenizer and
    head, or a function; None when the synthetic task's gold score is the reward."""
    return RewardScorer.load(
        cfg.reward_model,
        cfg.model,
        tokenizer,
        max_prompt_len=cfg.data.max_prompt_len,
        special_tokens=cfg.data.special_tokens,
        seed=cfg.seed,
        device=device,
    )


@dataclass
class RLSetup:
    """Everything an RL step and its evaluation read, besides the trained models."""

    cfg: Any  # RemaxJobConfig or PPOJobConfig: data, algo, rollout, seed, eval_prompts
    device: torch.device
    rank: int
    tokenizer: Any
    reference: Any  # frozen (a ZeRO-3 inference engine's module, or LoRA's adapters-off view)
    scorer: RewardScorer | None  # None: the synthetic gold score is the reward
    rollout_engine: RolloutEngine
    prompts: PromptSets
    sampling: SamplingConfig
    ids: TokenIds
    logprob_dist: LogprobDist  # what ``scored`` scores: the raw softmax, or the sampled one

    @property
    def reward_model(self):
        """The frozen reward model (placed), or None for a function or the gold score."""
        return self.scorer.model if self.scorer is not None else None

    def prompt_batch(self, prompts: list[str]) -> PromptBatch:
        """The (B, P) batch of templated ``prompts``: rollouts and evaluation alike, one collate
        under ``data.special_tokens``, the rule SFT and the RM were trained with."""
        d = self.cfg.data
        return collate_prompts(
            self.tokenizer, prompts, d.max_prompt_len, self.device, special_tokens=d.special_tokens
        )

    def decode(self, ids: torch.Tensor, mask: torch.Tensor, greedy) -> Rollout:
        """One decode by the rollout engine, empty answers per ``algo.empty_response``."""
        rollout = self.rollout_engine.generate(ids, mask, self.sampling, greedy=greedy)
        algo = self.cfg.algo
        return conventions.rewrite_empty(
            rollout,
            mode=algo.empty_response,
            max_tokens=algo.empty_max_tokens,
            eos_id=self.ids.eos,
            pad_id=self.ids.pad,
            space_id=self.ids.space,
        )

    @torch.no_grad()
    def rewards(self, rollout: Rollout, raw: list[str] | None = None) -> torch.Tensor:
        """(B,) frozen reward of each row (``raw``: its prompt before the chat template, as reward
        models and functions read it), or the synthetic gold score when there is no scorer."""
        if self.scorer is None:
            return self.gold(rollout, raw)
        return self.scorer(rollout, raw)

    def gold(self, rollout: Rollout, raw: list[str] | None = None) -> torch.Tensor:
        """(B,) the synthetic task's programmatic score of each answer."""
        return answer_metrics.gold_scores(self.tokenizer, rollout, raw)

    def train_mask(self, rollout: Rollout) -> torch.Tensor:
        """(B, T) bool: the tokens that get a gradient (``conventions.train_mask``)."""
        algo = self.cfg.algo
        return conventions.train_mask(
            rollout,
            eos_id=self.ids.eos,
            empty_response=algo.empty_response,
            train_on_eos=algo.train_on_eos,
        )

    def scored(self, logits: torch.Tensor, rollout: Rollout):
        """(B, T) log-probs under the distribution trained on, its (B, T, V) logits and the (B,
        T) flags of realised tokens outside the recomputed nucleus, from raw (B, T, V) ``logits``."""
        algo = self.cfg.algo
        outside = torch.zeros_like(rollout.response, dtype=torch.bool)
        if self.logprob_dist == LogprobDist.sampling_adjusted:
            # A sampled token at the nucleus edge (bf16, vLLM) stays scorable: nucleus_with_token.
            logits, outside = nucleus_with_token(
                logits,
                rollout.response,
                temperature=algo.temperature,
                top_p=algo.top_p,
                top_k=algo.top_k,
            )
        return logprobs_from_logits(logits, rollout.response), logits, outside

    def score(self, model, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward: (B, T) log-probs under the distribution trained on and the raw (B, T, V)
        logits (``answer_metrics.Score``: the evaluation's KLs)."""
        logprobs, logits = answer_metrics.raw_score(model, rollout)
        if self.logprob_dist == LogprobDist.sampling_adjusted:
            logprobs = self.scored(logits, rollout)[0]
        return logprobs, logits


def build(
    cfg,
    actor,
    loaded: Loaded,
    *,
    device: torch.device,
    train_cfg,
    logprob_dist: LogprobDist = LogprobDist.raw_softmax,
) -> RLSetup:
    """The setup of an RL stage whose ``actor`` (``remax.engines``) is built, from what ``load``
    gave: the reference and the reward model placed for inference (as they are, or ZeRO-3
    inference engines, in the policy's dtype; ``train_cfg``: the batch their engines are sized
    for), the rollout engine (hf, or vllm with the weights pushed after each optimizer step), the
    sampling and the token ids."""
    tokenizer, reference, scorer, prompts = loaded
    placement = dict(train=train_cfg, dtype=cfg.model.dtype)
    reference = frozen(reference, cfg.deepspeed, **placement)
    if scorer is not None and scorer.model is not None:
        scorer.model = frozen(scorer.model, cfg.deepspeed, **placement)
    engine = build_rollout_engine(
        cfg.rollout,
        actor,
        tokenizer,
        max_model_len=cfg.data.max_prompt_len + cfg.data.max_response_len + 1,
        seed=cfg.seed,
    )
    # The token of " ", which ``space_token`` writes into empty answers (as the release).
    space = tokenizer(" ", add_special_tokens=False)["input_ids"][-1]
    return RLSetup(
        cfg=cfg,
        device=device,
        rank=distributed.rank(),
        tokenizer=tokenizer,
        reference=reference,
        scorer=scorer,
        rollout_engine=engine,
        prompts=prompts,
        sampling=cfg.algo.sampling(cfg.data.max_response_len),
        ids=TokenIds(tokenizer.eos_token_id, tokenizer.pad_token_id, space),
        logprob_dist=logprob_dist,
    )
