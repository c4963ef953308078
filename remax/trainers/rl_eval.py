"""Held-out evaluation of an RL policy (ReMax and PPO alike): reward, gold, KL to the reference,
length, per prompt; and ``eval_before.json`` written once per run.

Two KLs along each eval answer a, both in nats:
- ``kl`` / ``kl_token``: the exact full-vocabulary KL, Σ_t Σ_v π(v|a_<t)(log π − log π_ref)(v|a_<t),
  of the models' raw softmax (temperature 1, no top-p/top-k), summed over the answer / averaged
  over its tokens. The release's eval KL, and what ``early_stop_kl`` reads (remax-spec §4.1).
- ``kl_sampled`` / ``kl_sampled_token``: the sampled estimate Σ_t log π(a_t) − log π_ref(a_t)
  (k1) under the distribution trained on. Under top-p sampling it reads high (the answer is drawn
  from the nucleus, not from π), so it is a diagnostic, not the stopping rule.

Deterministic and side-effect free: a fixed seed inside a forked RNG, so evaluating never changes
the training run's random stream (resume stays bit-identical). Collective at world size N: each rank
answers its block of the prompts (padded to equal blocks, so ZeRO-3's per-layer gathers line up),
and every rank returns all of them in prompt order.

The trainer provides ``cfg``, ``rank``, ``device``, ``tokenizer``, ``model``, ``reference``,
``eval_prompts``, ``decode(ids, mask, greedy) -> Rollout`` (post-processed),
``eval_raw_prompts`` (the same prompts before the chat template),
``score(model, rollout) -> ((B, T) logprobs, (B, T, V) raw logits)`` (one forward),
``rewards(rollout, raw_prompts)`` and ``gold(rollout)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from remax import distributed, preemption, watchdog
from remax.algo.kl import full_vocab_kl
from remax.algo.masked import masked_sum
from remax.config import EvalDecoding
from remax.data.batching import PromptBatch, collate_prompts
from remax.fileio import write_json
from remax.preemption import StopRequest
from remax.stats import mean_stderr


def prompt_batch(cfg, tokenizer, prompts: list[str], device) -> PromptBatch:
    """The (B, P) prompt batch of an RL stage: its rollouts (ReMax and PPO) and its evaluation, one
    collate under ``data.special_tokens``, the rule SFT and the RM were trained with."""
    d = cfg.data
    return collate_prompts(
        tokenizer, prompts, d.max_prompt_len, device, special_tokens=d.special_tokens
    )


@torch.no_grad()
def evaluate_policy(
    trainer,
    prompts: list[str] | None = None,
    raw: list[str] | None = None,
    stop: StopRequest | None = None,
) -> dict[str, torch.Tensor]:
    """(n,) tensors per held-out prompt: ``reward``, ``gold`` (synthetic task), ``kl`` (the exact
    KL's Σ_t over the answer), ``kl_token`` (its per-token mean: the release's early-stop quantity
    and units), ``kl_sampled`` and ``kl_sampled_token`` (the same for the sampled estimate),
    ``length``.

    ``prompts`` (templated) and ``raw`` (the same rows before the chat template, which reward
    models and functions read) default to the trainer's held-out ``eval_prompts``."""
    cfg = trainer.cfg
    trainer.model.eval()
    greedy = cfg.algo.eval_decoding == EvalDecoding.greedy
    devices = [trainer.device] if trainer.device.type == "cuda" else []
    out: dict[str, list[torch.Tensor]] = {
        k: []
        for k in ("reward", "gold", "kl", "kl_token", "kl_sampled", "kl_sampled_token", "length")
    }
    bs = cfg.train.batch_size
    if prompts is None:
        prompts, raw = trainer.eval_prompts, trainer.eval_raw_prompts
    n = len(prompts)
    prompts = distributed.block(prompts, pad=True)
    raw = distributed.block(raw, pad=True)  # same rows, before the template
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed + 7919 + trainer.rank)
        for i in range(0, len(prompts), bs):
            # Padded shards: every rank runs the same batches, so they agree on a stop here.
            if distributed.any_rank(stop is not None and stop.requested):
                raise preemption.Stopped("stop requested during evaluation")
            watchdog.beat("eval")
            batch = prompt_batch(cfg, trainer.tokenizer, prompts[i : i + bs], trainer.device)
            ro = trainer.decode(batch.input_ids, batch.attention_mask, greedy)
            out["reward"].append(trainer.rewards(ro, raw[i : i + bs]))
            if cfg.data.source == "synthetic":
                out["gold"].append(trainer.gold(ro))
            exact, sampled = _answer_kls(trainer, ro)  # (b,) each
            tokens = ro.lengths.clamp(min=1)
            out["kl"].append(exact)
            out["kl_token"].append(exact / tokens)
            out["kl_sampled"].append(sampled)
            out["kl_sampled_token"].append(sampled / tokens)
            out["length"].append(ro.lengths.float())
    trainer.model.train()
    return {k: distributed.all_gather_cat(torch.cat(v))[:n] for k, v in out.items() if v}


def _answer_kls(trainer, ro) -> tuple[torch.Tensor, torch.Tensor]:
    """(b,) exact and sampled KL Σ_t over each answer of ``ro``, scored a micro-batch of rows at a
    time, so at most two micro-batches of (T, V) logits are held (as in a training step)."""
    exact, sampled = [], []
    micro = trainer.cfg.train.micro_batch_size
    for start in range(0, ro.response.shape[0], micro):
        part = ro.select(slice(start, start + micro))
        mask = part.response_mask
        logp, logits = trainer.score(trainer.model, part)
        ref, ref_logits = trainer.score(trainer.reference, part)
        exact.append(full_vocab_kl(logits, ref_logits, mask).sum(-1))
        # where, not (logp − ref) · mask: a −inf at a padded position times 0 is NaN.
        sampled.append(masked_sum(logp - ref, mask, dim=-1))
    return torch.cat(exact), torch.cat(sampled)


def eval_summary(
    trainer,
    prompts: list[str] | None = None,
    raw: list[str] | None = None,
    stop: StopRequest | None = None,
) -> dict:
    """``{metric: {"mean", "stderr", "n"}}`` of :func:`evaluate_policy` (collective); ``prompts``
    and ``raw`` default to the trainer's held-out ``eval_prompts``."""
    return {k: mean_stderr(v) for k, v in evaluate_policy(trainer, prompts, raw, stop).items()}


def write_eval_before(trainer, run_dir: Path) -> None:
    """``eval_before.json``, once per run: every rank evaluates its share, rank 0 writes."""
    path = Path(run_dir) / "eval_before.json"
    if distributed.any_rank(not path.exists()):
        summary = eval_summary(trainer)
        if distributed.is_main():
            write_json(path, summary)
