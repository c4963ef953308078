"""PPO baseline trainer: finite steps, ratio exactly 1 on-policy, critic from the RM, bit-exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from remax.config import (
    CheckpointConfig,
    ClusterConfig,
    ConfigError,
    DataConfig,
    LogConfig,
    OptimConfig,
    PPOAlgoConfig,
    PPOJobConfig,
    RewardSourceConfig,
    RunConfig,
    TrainConfig,
    WandbMode,
)
from tests.conftest import one_thread, run_job


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _cfg(tmp_path, **overrides) -> PPOJobConfig:
    kw = dict(
        seed=0,
        data=DataConfig(num_train=64, num_eval=64),
        # 8 prompts = 2 minibatches of 4 = 2 × 2 micro-batches of 2; 2 epochs → 4 updates/step.
        train=TrainConfig(batch_size=8, micro_batch_size=2, max_steps=4, log_every=1),
        algo=PPOAlgoConfig(kl_coef=0.05, ppo_epochs=2, mini_batches=2),
        optim=OptimConfig(lr=1e-3),
        critic_optim=OptimConfig(lr=1e-3),
        checkpoint=CheckpointConfig(every_steps=0),
        log=LogConfig(wandb_mode=WandbMode.disabled, progress=False),
        run=RunConfig(root=str(tmp_path)),
        cluster=ClusterConfig(device="cpu"),
        eval_prompts=64,
    )
    return PPOJobConfig(**(kw | overrides))


def test_steps_are_finite_and_first_ratio_is_exactly_one(tmp_path):
    from remax.trainers.ppo import PPOTrainer

    trainer = PPOTrainer(_cfg(tmp_path))
    for _ in range(2):
        metrics = trainer.train_step()
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        # Experience and update forwards see the same rows: π_θ = π_old bit for bit.
        assert metrics["ppo/ratio_mean_first"] == 1.0
        # ...and the check can fail: later minibatches follow an optimizer step.
        assert metrics["ppo/ratio_mean"] != 1.0
    # 2 train steps × 2 epochs × 2 minibatches optimizer steps, on the actor and on the critic.
    for opt in (trainer.optimizer, trainer.critic_optimizer):
        steps = {int(s["step"]) for s in opt.state.values()}
        assert steps == {8}


def test_critic_starts_as_a_trainable_copy_of_the_reward_model(tmp_path):
    from remax.config import ModelConfig
    from remax.models.reward import load_reward_model
    from remax.trainers.ppo import PPOTrainer

    rm, tok = load_reward_model(ModelConfig(), seed=3, device="cpu")
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    trainer = PPOTrainer(
        _cfg(
            tmp_path,
            reward_model=RewardSourceConfig(path=str(tmp_path / "rm")),
            algo=PPOAlgoConfig(),
        )
    )
    rm_state = trainer.setup.reward_model.state_dict()
    critic_state = trainer.critic.state_dict()
    assert rm_state.keys() == critic_state.keys()
    assert all(torch.equal(rm_state[k], critic_state[k]) for k in rm_state)
    assert all(p.requires_grad for p in trainer.critic.parameters())
    assert not any(p.requires_grad for p in trainer.setup.reward_model.parameters())
    before = {k: v.clone() for k, v in rm_state.items()}
    trainer.train_step()
    assert all(
        torch.equal(before[k], v) for k, v in trainer.setup.reward_model.state_dict().items()
    )
    assert not torch.equal(trainer.critic.score.weight, trainer.setup.reward_model.score.weight)


def test_resume_is_bit_identical_for_actor_and_critic(tmp_path):
    from remax.preemption import StopRequest
    from remax.trainers import loop
    from remax.trainers.ppo import PPOTrainer

    cfg = _cfg(tmp_path)
    straight = PPOTrainer(cfg)
    (tmp_path / "a").mkdir()
    assert loop.run(straight, cfg, tmp_path / "a", "ppo") is not None

    first = PPOTrainer(cfg)
    stop, train_step = StopRequest(), first.train_step

    def step_then_stop_after_two():
        metrics = train_step()
        if first.step + 1 == 2:  # the loop counts this step next, then sees the flag and saves
            stop.set()
        return metrics

    first.train_step = step_then_stop_after_two
    (tmp_path / "b").mkdir()
    assert loop.run(first, cfg, tmp_path / "b", "ppo", stop=stop) is None
    assert first.step == 2
    resumed = PPOTrainer(cfg)  # a fresh process would build exactly this, then resume
    calls, resumed_step = [], resumed.train_step
    resumed.train_step = lambda: calls.append(1) or resumed_step()
    assert loop.run(resumed, cfg, tmp_path / "b", "ppo") is not None
    assert resumed.step == straight.step == 4 and len(calls) == 2  # resumed at 2, not from 0
    fresh = PPOTrainer(cfg).critic.state_dict()
    assert not all(torch.equal(v, straight.critic.state_dict()[k]) for k, v in fresh.items())
    for a, b in ((straight.model, resumed.model), (straight.critic, resumed.critic)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ea = straight.critic_optimizer.state_dict()["state"]
    eb = resumed.critic_optimizer.state_dict()["state"]
    assert all(torch.equal(ea[i]["exp_avg_sq"], eb[i]["exp_avg_sq"]) for i in ea)


def test_presets_compose_and_mini_batches_must_divide_the_batch(tmp_path):
    from jobs._config import compose_stage

    matched = compose_stage("ppo", [])
    assert matched.algo.kl_coef == 0.05 and matched.algo.empty_response == "space_token"
    assert matched.train.batch_size == 32 and matched.critic_optim.lr == matched.optim.lr
    dschat = compose_stage("ppo", ["algo=ppo_dschat"])
    assert (dschat.algo.kl_coef, dschat.algo.lam, dschat.algo.clip_range_value) == (0.1, 0.95, 0.2)
    assert (dschat.critic_optim.lr, dschat.critic_optim.weight_decay) == (5e-6, 0.1)
    with pytest.raises(ConfigError, match="algo.mini_batches"):
        _cfg(tmp_path, algo=PPOAlgoConfig(mini_batches=3))


@pytest.mark.slow
def test_job_runs_and_writes_summary(tmp_path):
    run_job(
        "jobs.ppo",
        "experiment=smoke",
        f"run.root={tmp_path}",
        "cluster.num_threads=1",
        "log.progress=false",
    )
    (summary_file,) = tmp_path.glob("ppo/*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["stage"] == "ppo" and summary["step"] == 4
    for key in ("reward_before", "reward_after", "gold_before", "gold_after", "kl_after"):
        assert key in summary["eval"]
