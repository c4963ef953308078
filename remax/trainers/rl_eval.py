"""Held-out evaluation of an RL policy (ReMax, PPO and the RL variants alike): reward, gold, KL to
the reference and length per prompt (``remax.answer_metrics``, the evaluate stage's code too), and
``eval_before.json`` written once per run.

Two KLs along each eval answer (``answer_metrics``): the exact full-vocabulary KL of the models' raw
softmax (``kl``, ``kl_token``: the release's eval KL, and what ``early_stop_kl`` reads), and the
sampled estimate under the distribution trained on (``kl_sampled``, ``kl_sampled_token``: under
top-p it reads high, a diagnostic, not the stopping rule).

Deterministic and side-effect free: a fixed seed inside a forked RNG, so evaluating never changes
the training run's random stream (resume stays bit-identical). Collective at world size N: each rank
answers its block of the prompts (padded to equal blocks, so ZeRO-3's per-layer gathers line up),
and every rank returns all of them in prompt order.

Everything but the evaluated model comes from the stage's ``RLSetup`` (``rl_setup``): its decode,
reward, gold, reference, scoring and held-out prompts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from remax import answer_metrics, distributed, preemption, watchdog
from remax.config import EvalDecoding
from remax.fileio import write_json
from remax.preemption import StopRequest
from remax.stats import mean_stderr


@torch.no_grad()
def evaluate_policy(
    setup,
    model,
    prompts: list[str] | None = None,
    raw: list[str] | None = None,
    stop: StopRequest | None = None,
) -> dict[str, torch.Tensor]:
    """(n,) tensors per held-out prompt of ``model``'s answers (``setup``: an ``RLSetup``):
    ``reward``, ``gold`` (synthetic task), ``kl``, ``kl_token``, ``kl_sampled``,
    ``kl_sampled_token`` and ``length`` (``remax.answer_metrics``).

    ``prompts`` (templated) and ``raw`` (the same rows before the chat template, which reward
    models and functions read) default to the setup's held-out ``eval`` prompts."""
    cfg = setup.cfg
    model.eval()
    greedy = cfg.algo.eval_decoding == EvalDecoding.greedy
    devices = [setup.device] if setup.device.type == "cuda" else []
    out: dict[str, list[torch.Tensor]] = {}
    bs = cfg.train.batch_size
    if prompts is None:
        prompts, raw = setup.prompts.eval, setup.prompts.eval_raw
    n = len(prompts)
    prompts = distributed.block(prompts, pad=True)
    raw = distributed.block(raw, pad=True)  # same rows, before the template
    synthetic = cfg.data.source == "synthetic"
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed + 7919 + setup.rank)
        for i in range(0, len(prompts), bs):
            # Padded shards: every rank runs the same batches, so they agree on a stop here.
            if distributed.any_rank(stop is not None and stop.requested):
                raise preemption.Stopped("stop requested during evaluation")
            watchdog.beat("eval")
            batch = setup.prompt_batch(prompts[i : i + bs])
            ro = setup.decode(batch.input_ids, batch.attention_mask, greedy)
            scores = answer_metrics.measure(
                ro,
                raw[i : i + bs],
                reward=setup.rewards,
                gold=setup.gold if synthetic else None,
                policy=model,
                reference=setup.reference,
                score=setup.score,
                micro=cfg.train.micro_batch_size,
            )
            for key, values in scores.items():
                out.setdefault(key, []).append(values)
    model.train()
    return {k: distributed.all_gather_cat(torch.cat(v))[:n] for k, v in out.items()}


def eval_summary(
    setup,
    model,
    prompts: list[str] | None = None,
    raw: list[str] | None = None,
    stop: StopRequest | None = None,
) -> dict:
    """``{metric: {"mean", "stderr", "n"}}`` of :func:`evaluate_policy` (collective); ``prompts``
    and ``raw`` default to the setup's held-out ``eval`` prompts."""
    return {k: mean_stderr(v) for k, v in evaluate_policy(setup, model, prompts, raw, stop).items()}


def write_eval_before(setup, model, run_dir: Path) -> None:
    """``eval_before.json``, once per run: every rank evaluates its share, rank 0 writes."""
    path = Path(run_dir) / "eval_before.json"
    if distributed.any_rank(not path.exists()):
        summary = eval_summary(setup, model)
        if distributed.is_main():
            write_json(path, summary)
