"""Held-out evaluation of an RL policy (ReMax and PPO alike): reward, gold, KL to the reference,
length, per prompt; and ``eval_before.json`` written once per run.

Deterministic and side-effect free: a fixed seed inside a forked RNG, so evaluating never changes
the training run's random stream (resume stays bit-identical). Collective at world size N: each rank
answers its block of the prompts (padded to equal blocks, so ZeRO-3's per-layer gathers line up),
and every rank returns all of them in prompt order.

The trainer provides ``cfg``, ``rank``, ``device``, ``tokenizer``, ``model``, ``reference``,
``eval_prompts``, ``decode(ids, mask, greedy) -> Rollout`` (post-processed),
``logprobs(model, rollout) -> (B, T)``, ``rewards(rollout)`` and ``gold(rollout)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from remax import distributed
from remax.config import EvalDecoding
from remax.data.batching import collate_prompts
from remax.fileio import write_json
from remax.stats import mean_stderr


@torch.no_grad()
def evaluate_policy(trainer) -> dict[str, torch.Tensor]:
    """(n,) tensors per held-out prompt: ``reward``, ``gold`` (synthetic task), ``kl``, ``length``."""
    cfg = trainer.cfg
    trainer.model.eval()
    greedy = cfg.algo.eval_decoding == EvalDecoding.greedy
    devices = [trainer.device] if trainer.device.type == "cuda" else []
    out: dict[str, list[torch.Tensor]] = {"reward": [], "gold": [], "kl": [], "length": []}
    bs = cfg.train.batch_size
    prompts = distributed.block(trainer.eval_prompts, pad=True)
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed + 7919 + trainer.rank)
        for i in range(0, len(prompts), bs):
            batch = collate_prompts(
                trainer.tokenizer, prompts[i : i + bs], cfg.data.max_prompt_len, trainer.device
            )
            ro = trainer.decode(batch.input_ids, batch.attention_mask, greedy)
            logp = trainer.logprobs(trainer.model, ro)
            ref = trainer.logprobs(trainer.reference, ro)
            out["reward"].append(trainer.rewards(ro))
            if cfg.data.source == "synthetic":
                out["gold"].append(trainer.gold(ro))
            out["kl"].append(((logp - ref) * ro.response_mask).sum(-1))
            out["length"].append(ro.lengths.float())
    trainer.model.train()
    n = len(trainer.eval_prompts)
    return {k: distributed.all_gather_cat(torch.cat(v))[:n] for k, v in out.items() if v}


def eval_summary(trainer) -> dict:
    """``{metric: {"mean", "stderr", "n"}}`` of :func:`evaluate_policy` (collective)."""
    return {k: mean_stderr(v) for k, v in evaluate_policy(trainer).items()}


def write_eval_before(trainer, run_dir: Path) -> None:
    """``eval_before.json``, once per run: every rank evaluates its share, rank 0 writes."""
    path = Path(run_dir) / "eval_before.json"
    if distributed.any_rank(not path.exists()):
        summary = eval_summary(trainer)
        if distributed.is_main():
            write_json(path, summary)
