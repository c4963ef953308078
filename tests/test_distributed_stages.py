"""Data parallelism of the SFT, reward-model and PPO stages (spec test 20): 2 ranks × B/2 make the
same update as 1 rank × B.

Ranks are real processes (``test_distributed.spawn``: gloo on CPU, one thread each, so both sides
run the same kernels in the same summation order). SFT and RM draw their batch from the sampler,
which is the same on every rank; PPO's rollout is decoded once here and each rank is handed its
block of every minibatch, because ranks sample with their own seeds (what is under test is
everything after decoding). Compared: every parameter, and Adam's first moment, which after one
step is 0.1 × the gradient (no clipping). Adam's eps is 1e-3 instead of 1e-8: the first step moves a
weight by lr · g / (|g| + eps), which with eps = 1e-8 is ≈ lr · sign(g), blind to the gradient's
scale and, where |g| ≈ eps, amplifying a 1e-10 rounding difference of g into a 1e-6 change of the
weight (measured). With eps = 1e-3 the step changes by at most lr / eps · |Δg| = |Δg|.

PPO takes 4 actor and 4 critic steps, so there the moments mix four gradients; still compared.

Negative control: the same ranks with the normaliser's all-reduce skipped (each rank counts only
its own tokens or pairs). Where a micro-batch (SFT, RM with micro_batch_size = B) or a minibatch
(PPO) is split over the ranks it must give another gradient, so the checks can fail; where each
rank holds whole micro-batches its own count is the global one and it must not.
"""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
from conftest import one_thread
from test_distributed import shorten, spawn

from remax import distributed
from remax.config import (
    CheckpointConfig,
    DataConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    PPOAlgoConfig,
    PPOJobConfig,
    RewardModelJobConfig,
    RunConfig,
    SFTJobConfig,
    TrainConfig,
    WandbMode,
)

B = 8


def config(stage: str, micro: int, root: str = "runs"):
    common = dict(
        model=ModelConfig(hidden_size=32, intermediate_size=64),
        data=DataConfig(num_train=64, num_eval=64, max_response_len=8),
        train=TrainConfig(batch_size=B, micro_batch_size=micro, max_steps=2, log_every=1),
        # No clipping, so Adam's first moment is exactly 0.1 × the gradient and can be compared.
        optim=OptimConfig(lr=1e-3, eps=1e-3, grad_clip=0.0),
        checkpoint=CheckpointConfig(every_steps=0),
        log=LogConfig(wandb_mode=WandbMode.disabled, progress=False),
        run=RunConfig(root=root),
    )
    if stage == "sft":
        return SFTJobConfig(**common)
    if stage == "reward_model":
        return RewardModelJobConfig(**common)
    return PPOJobConfig(
        **common,
        # 2 minibatches × 2 epochs: 4 actor and 4 critic steps, the later ones off-policy, so the
        # ranks must stay in lockstep through several steps.
        algo=PPOAlgoConfig(kl_coef=0.05, ppo_epochs=2, mini_batches=2),
        critic_optim=OptimConfig(lr=1e-3, eps=1e-3, grad_clip=0.0),
        eval_prompts=64,
    )


def trainer_for(cfg):
    from jobs._stage import _trainer

    return _trainer(cfg.stage, cfg)


def snapshot(trainer, metrics: dict) -> dict:
    """Weights and Adam first moments of the actor (and the critic), plus the step's metrics."""
    pairs = [("", trainer.model, trainer.optimizer)]
    if hasattr(trainer, "critic"):
        pairs.append(("critic.", trainer.critic, trainer.critic_optimizer))
    params, moments = {}, {}
    for prefix, model, opt in pairs:
        for name, p in model.named_parameters():
            params[prefix + name] = p.detach().clone()
            if p in opt.state:
                moments[prefix + name] = opt.state[p]["exp_avg"].clone()
    return {"params": params, "moments": moments, "metrics": metrics}


def one_step(cfg, rollout=None) -> dict:
    """One training step of this rank; PPO updates on this rank's rows of ``rollout``."""
    trainer = trainer_for(cfg)
    if rollout is None:
        metrics = trainer.train_step()
    else:
        rows = torch.tensor(trainer.shard(list(range(rollout.response.shape[0]))))
        metrics = trainer.update(rollout.select(rows))
    return snapshot(trainer, metrics)


def _two_rank_step(rank, world, cfg, rollout, out_dir) -> None:
    torch.save(one_step(cfg, rollout), f"{out_dir}/rank{rank}_global.pt")
    # The bug the global normalisers prevent: each rank divides by its own token or pair count.
    with mock.patch.object(distributed, "all_reduce_sum", lambda t: t):
        torch.save(one_step(cfg, rollout), f"{out_dir}/rank{rank}_per_rank.pt")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def ppo_probe(cfg):
    """A PPO trainer of ``cfg`` and its fixed rollout of the first batch (seed 123), built at one
    thread (the ranks' setting)."""
    from remax.trainers.ppo import PPOTrainer

    with one_thread():
        probe = PPOTrainer(cfg)
        prompts = [probe.setup.prompts.train[i] for i in probe.sampler.next_indices()]
        with torch.random.fork_rng():
            torch.manual_seed(123)
            return probe, probe.rollout(prompts)


def single_and_two_ranks(cfg, tmp_path, rollout=None):
    with one_thread():  # the ranks' setting: same kernels, same summation order
        single = one_step(cfg, rollout)
    spawn(_two_rank_step, 2, cfg, rollout, str(tmp_path))
    load = lambda r, v: torch.load(tmp_path / f"rank{r}_{v}.pt", weights_only=True)  # noqa: E731
    ranks = [load(r, "global") for r in (0, 1)]
    # All ranks keep identical weights (bit for bit: they stepped on the same all-reduced gradient).
    assert _max_diff(ranks[0]["params"], ranks[1]["params"]) == 0.0
    return single, ranks[0], load(0, "per_rank")


def report(name: str, single: dict, ranks: dict, per_rank: dict) -> tuple[float, float, float]:
    d_moment = _max_diff(ranks["moments"], single["moments"])
    d_param = _max_diff(ranks["params"], single["params"])
    d_wrong = _max_diff(per_rank["moments"], single["moments"])
    print(
        f"{name}: max |Δmoment| {d_moment:.3g}, max |Δparam| {d_param:.3g}, per-rank {d_wrong:.3g}"
    )
    return d_moment, d_param, d_wrong


# Tolerance, on moments and weights alike. With micro_batch_size = B/2 (and PPO's micro-batches
# of 2) each rank computes exactly micro-batches the single process computes (same rows, same
# padding, one thread), and the all-reduce adds the same fp32 gradients the single process
# accumulates (a + b is commutative): we measure exactly 0, and 1e-6 (weights O(0.1), one Adam step
# moves them by ≤ lr = 1e-3) leaves room only for a summation-order change inside gloo. With
# micro_batch_size = B the single process runs one forward of B rows where each rank runs B/2 rows
# padded to its own longest row: other matmul shapes, other fp32 rounding (measured 4e-9 (SFT) and
# 1e-8 (RM) on moments, 2e-8 on weights); 1e-6 is still four orders below what the per-rank bug
# changes (1.7e-2 and 3e-2).
TOL = 1e-6


@pytest.mark.parametrize("stage", ["sft", "reward_model"])
@pytest.mark.parametrize("micro", [B // 2, B])
def test_sft_and_reward_model_two_ranks_match_one_rank(tmp_path, stage, micro):
    cfg = config(stage, micro)
    single, ranks, per_rank = single_and_two_ranks(cfg, tmp_path)
    d_moment, d_param, d_wrong = report(f"{stage} micro={micro}", single, ranks, per_rank)
    assert d_moment <= TOL and d_param <= TOL
    for key in single["metrics"]:
        assert ranks["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-6), key
    scale = max(float(m.abs().max()) for m in single["moments"].values())
    assert scale > 1e-4, "a zero gradient would make the check vacuous"
    if micro == B // 2:
        # Each rank holds whole micro-batches: its own count is the global count, so skipping the
        # count's all-reduce changes nothing (the normaliser that matters here is the number of
        # micro-batches, grad_accum, which is global by construction).
        assert d_wrong <= TOL
    elif stage == "sft":  # micro-batch 0 is split over the ranks: its token count must be global
        assert d_wrong > 1e-2 * scale
    else:  # each rank weighs its 4 pairs as the whole micro-batch of 8: exactly twice the gradient
        for k, m in single["moments"].items():
            torch.testing.assert_close(per_rank["moments"][k], 2 * m, rtol=1e-5, atol=TOL)


def test_ppo_two_ranks_match_one_rank(tmp_path):

    cfg = config("ppo", micro=2)
    probe, rollout = ppo_probe(cfg)
    # Unequal lengths inside each rank's block of each minibatch, so per-rank and global token
    # counts disagree (minibatch 0 = rows 0–3: rank 0 gets rows 0, 1 and rank 1 rows 2, 3).
    rollout = shorten(rollout, probe.tokenizer, {0: 2, 1: 3, 4: 5})
    mask = probe.setup.train_mask(rollout)
    assert mask[[0, 1, 4, 5]].sum() != mask[[2, 3, 6, 7]].sum()

    single, ranks, per_rank = single_and_two_ranks(cfg, tmp_path, rollout)
    d_moment, d_param, d_wrong = report("ppo", single, ranks, per_rank)
    assert any(k.startswith("critic.") for k in single["moments"])  # the critic is compared too
    assert d_moment <= TOL and d_param <= TOL
    for key in single["metrics"]:
        assert ranks["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-6), key
    # π = π_old on the first minibatch on every rank, and the global mean of the shares says so.
    assert ranks["metrics"]["ppo/ratio_mean_first"] == pytest.approx(1.0, abs=1e-12)
    scale = max(float(m.abs().max()) for m in single["moments"].values())
    assert d_wrong > 1e-2 * scale


def test_ranks_take_their_block_of_every_micro_batch_and_minibatch(monkeypatch):
    from remax.trainers.ppo import PPOTrainer

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    # 12 rows in micro-batches of 4 on 2 ranks: micro-batch 1 (rows 4–7) is split between them.
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    assert distributed.micro_batch_parts(12, 4) == [(0, slice(0, 4)), (1, slice(4, 6))]
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert distributed.micro_batch_parts(12, 4) == [(1, slice(6, 8)), (2, slice(8, 12))]
    # PPO: minibatches {0..3} and {4..7}; rank 1 takes the second half of each.
    trainer = PPOTrainer(config("ppo", micro=2))
    assert trainer.shard(list(range(10, 18))) == [12, 13, 16, 17]


@pytest.mark.parametrize("stage", ["sft", "reward_model", "ppo"])
def test_world_size_must_divide_the_batch(monkeypatch, stage):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    # PPO's blocks are per minibatch: 8 rows in 2 minibatches need a multiple of 2 × 3.
    what = "algo.mini_batches × world size = 2×3" if stage == "ppo" else "the world size 3"
    with pytest.raises(ValueError, match=rf"train.batch_size=8:? is not divisible by {what}"):
        trainer_for(config(stage, micro=2))


def _run_stage(rank, world, stage, cfg) -> None:
    from jobs._stage import run_stage

    run_stage(stage, cfg)


@pytest.mark.parametrize("stage", ["sft", "reward_model", "ppo"])
def test_stage_runs_on_two_ranks(tmp_path, stage):
    """The whole job at world size 2: no refusal, one metrics writer, an export and a summary."""
    from remax.run_dir import run_dir_for

    cfg = config(stage, micro=2, root=str(tmp_path))
    spawn(_run_stage, 2, stage, cfg)
    run_dir = run_dir_for(cfg, stage)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 2
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # rank 0 alone writes
    assert (run_dir / "export" / "model.safetensors").is_file()
