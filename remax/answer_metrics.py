"""What an evaluation measures of each answer: one code for the RL stages' held-out evaluation
(``remax.trainers.rl_eval``: ``eval_before.json``, ``eval_after.json``, the periodic evals) and
the evaluate stage (``remax.evaluation``: ``jobs.evaluate``), so the two cannot drift (issue #21).

Per answer a of prompt x, in nats where a KL:
- ``reward``: the frozen reward (``remax.rewards.RewardScorer``), or the synthetic gold score;
- ``gold``: the synthetic task's programmatic score of the answer text against the raw prompt;
- ``kl`` / ``kl_token``: the exact full-vocabulary KL Σ_t Σ_v π(v|a_<t)(log π − log π_ref)(v|a_<t)
  of the models' raw softmax, summed over the answer / averaged over its tokens (the release's
  eval KL, and what ``early_stop_kl`` reads: remax-spec §4.1);
- ``kl_sampled`` / ``kl_sampled_token``: the sampled estimate Σ_t log π(a_t) − log π_ref(a_t)
  (k1) under the distribution ``score`` gives (the RL stage's: the one it trains on);
- ``length``: generated tokens, EOS included.

Notation: B answers, T response length, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from remax.algo.kl import full_vocab_kl
from remax.algo.logprobs import logprobs_from_logits
from remax.algo.masked import masked_sum
from remax.data import synthetic
from remax.models.policy import response_logits
from remax.rollout import Rollout

# (model, rollout) -> ((B, T) log-probs of the realised tokens, (B, T, V) raw logits)
Score = Callable[[torch.nn.Module, Rollout], tuple[torch.Tensor, torch.Tensor]]
# (rollout, raw prompts) -> (B,) scores
Reward = Callable[[Rollout, list[str] | None], torch.Tensor]


def raw_score(model, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward: (B, T) log-probs of the raw softmax (temperature 1, no filter) and the (B, T,
    V) logits they come from."""
    logits = response_logits(model, rollout.sequences, rollout.attention_mask, rollout.prompt_len)
    return logprobs_from_logits(logits, rollout.response), logits


def decode_answers(tokenizer, rollout: Rollout) -> list[str]:
    """Each row's generated tokens up to its first EOS, as text without special tokens."""
    lengths = rollout.lengths.tolist()
    return [
        tokenizer.decode(row[:n].tolist(), skip_special_tokens=True)
        for row, n in zip(rollout.response, lengths)
    ]


def gold_scores(tokenizer, rollout: Rollout, raw: list[str] | None = None) -> torch.Tensor:
    """(B,) the synthetic task's gold score of each answer against its raw prompt (``raw``: each
    row's prompt before the chat template; None: the prompt tokens decoded)."""
    if raw is None:
        raw = tokenizer.batch_decode(rollout.prompt_ids, skip_special_tokens=True)
    answers = decode_answers(tokenizer, rollout)
    scores = [synthetic.gold_score(p, a) for p, a in zip(raw, answers)]
    return torch.tensor(scores, device=rollout.response.device)


@torch.no_grad()
def answer_kls(
    policy, reference, rollout: Rollout, *, score: Score = raw_score, micro: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) exact and sampled KL Σ_t over each answer, scored ``micro`` rows at a time, so at most
    two micro-batches of (T, V) logits are held (as in a training step)."""
    exact, sampled = [], []
    for start in range(0, rollout.response.shape[0], micro):
        part = rollout.select(slice(start, start + micro))
        mask = part.response_mask
        logp, logits = score(policy, part)
        ref, ref_logits = score(reference, part)
        exact.append(full_vocab_kl(logits, ref_logits, mask).sum(-1))
        # where, not (logp − ref) · mask: a −inf at a padded position times 0 is NaN.
        sampled.append(masked_sum(logp - ref, mask, dim=-1))
    return torch.cat(exact), torch.cat(sampled)


@torch.no_grad()
def measure(
    rollout: Rollout,
    raw: list[str] | None,
    *,
    reward: Reward,
    gold: Reward | None = None,
    policy=None,
    reference=None,
    score: Score = raw_score,
    micro: int = 8,
) -> dict[str, torch.Tensor]:
    """(B,) per answer: ``reward``, ``gold`` (when ``gold`` is given), the four KLs (when a
    ``reference`` is given; ``policy`` is the model that answered) and ``length``."""
    out = {"reward": reward(rollout, raw)}
    if gold is not None:
        out["gold"] = gold(rollout, raw)
    if reference is not None:
        exact, sampled = answer_kls(policy, reference, rollout, score=score, micro=micro)
        tokens = rollout.lengths.clamp(min=1)
        out["kl"], out["kl_token"] = exact, exact / tokens
        out["kl_sampled"], out["kl_sampled_token"] = sampled, sampled / tokens
    out["length"] = rollout.lengths.float()
    return out
