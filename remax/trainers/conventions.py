"""The conventions every RL trainer shares, as functions: the empty-answer rewrite, the train mask,
the per-rank seeds, the release's per-rank token normaliser and the final evaluation's summary
(remax-spec §3, §4 rows 13-14). ``rl_setup.RLSetup`` binds them to a stage's tokenizer and config.

One copy, so the baseline (PPO) and the method (ReMax) cannot drift apart on a convention that
changes what is measured. Orchestration (rollout, update) stays in each trainer (style rule 7).

Notation: B batch, P prompt length, T response length.
"""

from __future__ import annotations

import json

import torch

from remax import distributed
from remax.config import EmptyResponse
from remax.fileio import write_json
from remax.rollout import Rollout, mark_unsampled
from remax.trainers import rl_eval


def seed_ranks(seed: int, world_size: int) -> None:
    """Same weights, different samples: each rank its own (reproducible) stream. Not done at
    world size 1, which keeps single-process runs bit-identical to earlier releases."""
    if world_size > 1:
        torch.manual_seed(distributed.rank_seed(seed))


def rewrite_empty(
    rollout: Rollout,
    *,
    mode: EmptyResponse,
    max_tokens: int,
    eos_id: int,
    pad_id: int,
    space_id: int,
) -> Rollout:
    """``space_token``: answers with at most ``max_tokens`` tokens before EOS become " " (+ EOS).

    The release (``remax_trainer.py`` ``generate_experience``) overwrites the first response token
    of every answer with <= 1 non-pad token by " "; pad == eos, so an EOS-first answer and a
    one-token answer both become " " + EOS (``max_tokens=1``). ``max_tokens=0`` rewrites EOS-first
    answers only. Other modes leave the rollout as it is.
    """
    if mode != EmptyResponse.space_token:
        return rollout
    response, mask = rollout.response, rollout.response_mask
    is_eos = (response == eos_id) & mask
    empty = ((mask & ~is_eos).sum(-1) <= max_tokens) & mask.any(-1)  # (B,)
    if not bool(empty.any()):
        return rollout
    if response.shape[1] < 2:  # every row stopped at once: make room for " " + EOS
        response = torch.cat([response, torch.full_like(response, pad_id)], 1)
        mask = torch.cat([mask, torch.zeros_like(mask)], 1)
    has_eos = is_eos.any(-1)
    response, mask = response.clone(), mask.clone()
    response[empty] = pad_id
    mask[empty] = False
    response[empty, 0], mask[empty, 0] = space_id, True
    ends = empty & has_eos  # a truncated one-token answer stays truncated: " " without EOS
    response[ends, 1], mask[ends, 1] = eos_id, True
    # The rollout engine's log-probs of the rewritten tokens describe tokens never sampled.
    logprobs = mark_unsampled(rollout.logprobs, empty, 2)
    return rollout._replace(response=response, response_mask=mask, logprobs=logprobs)


def train_mask(
    rollout: Rollout, *, eos_id: int, empty_response: EmptyResponse, train_on_eos: bool
) -> torch.Tensor:
    """(B, T) bool: the tokens that get a gradient.

    Every generated token up to and including the first EOS, except: EOS when ``train_on_eos`` is
    off, and the whole row of an EOS-first answer under ``empty_response=mask`` (an ablation that
    biases the gradient: the EOS action of those rows is never reinforced or penalised, remax-spec
    §4 row 14). ``keep`` (Algorithm 1) trains an EOS-first answer like any other.
    """
    mask = rollout.response_mask.clone()
    is_eos = (rollout.response == eos_id) & mask
    if empty_response == EmptyResponse.mask:
        mask[is_eos[:, 0]] = False
    if not train_on_eos:
        mask &= ~is_eos
    return mask


def rank_token_denominator(mask: torch.Tensor, n_micro: int, world_size: int) -> torch.Tensor:
    """Normaliser of one micro-batch under ``aggregation=rank_token_mean`` (the release).

    The release's loss is a token mean over the micro-batch, scaled by 1/#micro-batches for
    accumulation, and DeepSpeed averages gradients over ranks; our ranks sum gradients, hence the
    world size. A rank's tokens thus share 1/N of the step whatever their count: with 4 ranks × 1
    prompt a 256-token answer weighs 1/4, where the global ``token_mean`` gives it 256/Σ tokens.
    """
    return mask.sum().clamp(min=1) * n_micro * world_size


def final_summary(setup, model, run_dir, stop=None) -> dict:
    """``evaluate_final`` of an RL trainer: ``model``'s before/after reward, KL and length
    (collective; ``setup``: the stage's ``RLSetup``).

    ``kl_after`` / ``kl_token_after``: the exact full-vocabulary KL per answer / per token (the
    release's ``eval/kl``); ``kl_sampled_after`` / ``kl_sampled_token_after``: the sampled
    log π − log π_ref estimate (``rl_eval``). Rank 0 writes ``eval_after.json``; every rank returns the same summary.
    """
    before = json.loads((run_dir / "eval_before.json").read_text())
    after = rl_eval.eval_summary(setup, model, stop=stop)
    if distributed.is_main():
        write_json(run_dir / "eval_after.json", after)
    ev = {
        "reward_before": before["reward"],
        "reward_after": after["reward"],
        "kl_after": after["kl"]["mean"],
        "kl_after_stderr": after["kl"]["stderr"],
        "length_before": before["length"]["mean"],
        "length_after": after["length"]["mean"],
    }
    for key in ("kl_token", "kl_sampled", "kl_sampled_token"):
        if key in after:
            ev[f"{key}_after"] = after[key]["mean"]
    if "gold" in after:
        ev["gold_before"], ev["gold_after"] = before["gold"], after["gold"]
    reward_source = "gold" if setup.scorer is None else setup.scorer.source
    return {"eval": ev, "reward_source": reward_source}
