"""Trainer-level properties: SFT mask, RM loss at log 2, ReMax zero advantage, empty answers,
baselines per prompt, deterministic eval, KL early stop, the off-policy flag, three models only."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from transformers import PreTrainedModel

from remax.config import (
    DataConfig,
    EmptyResponse,
    EvalDecoding,
    LogConfig,
    LogprobDist,
    ModelConfig,
    OptimConfig,
    RemaxAlgoConfig,
    RemaxJobConfig,
    RewardModelJobConfig,
    RewardSourceConfig,
    RolloutConfig,
    TrainConfig,
    WandbMode,
)
from remax.data.batching import collate_sft
from remax.trainers.remax import RemaxTrainer
from remax.trainers.reward_model import RewardModelTrainer

SMALL = dict(
    model=ModelConfig(hidden_size=32, intermediate_size=64),
    data=DataConfig(num_train=64, num_eval=64, max_response_len=8),
    train=TrainConfig(batch_size=8, micro_batch_size=8, max_steps=4),
    log=LogConfig(wandb_mode=WandbMode.disabled, progress=False),
)


def _remax(samples_per_prompt: int = 1, **algo) -> RemaxTrainer:
    rollout = RolloutConfig(samples_per_prompt=samples_per_prompt)
    return RemaxTrainer(
        RemaxJobConfig(**SMALL, algo=RemaxAlgoConfig(**algo), rollout=rollout, eval_prompts=64)
    )


def test_sft_loss_mask_covers_response_and_eos_only(tokenizer):
    batch = collate_sft(
        tokenizer,
        [{"prompt": "abc=", "response": "de"}, {"prompt": "p=", "response": "q"}],
        12,
        24,
        "cpu",
    )
    # Row 0: tokens <bos> a b c = d e <eos>; targets are tokens 1.. so the mask marks d, e, <eos>.
    targets = batch.input_ids[:, 1:]
    assert tokenizer.decode(targets[0][batch.loss_mask[0]]) == "de<eos>"
    assert tokenizer.decode(targets[1][batch.loss_mask[1]]) == "q<eos>"
    assert int(batch.loss_mask.sum()) == 5


def test_sft_loss_ignores_prompt_predictions(policy, tokenizer):
    from remax.algo.sft import sft_loss
    from remax.models.policy import token_logprobs

    batch = collate_sft(tokenizer, [{"prompt": "abcab=", "response": "ddd"}], 12, 24, "cpu")
    policy.train()
    logits_grad = {}

    def hook(module, inputs, output):
        output.logits.retain_grad()
        logits_grad["logits"] = output.logits

    handle = policy.register_forward_hook(hook)
    sft_loss(
        token_logprobs(policy, batch.input_ids, batch.attention_mask), batch.loss_mask
    ).backward()
    handle.remove()
    grad = logits_grad["logits"].grad[0]  # (L, V); row t predicts token t + 1
    assert batch.input_ids[0, 0] == tokenizer.bos_token_id  # <bos> a b c a b = d d d <eos>
    prompt_rows = grad[:6]  # predictions of a, b, c, a, b, = (all prompt tokens)
    assert torch.count_nonzero(prompt_rows) == 0
    assert all(torch.count_nonzero(grad[t]) > 0 for t in range(6, 10))  # d d d <eos>


def test_reward_model_loss_is_log_2_on_identical_pairs():
    cfg = RewardModelJobConfig(**SMALL)
    trainer = RewardModelTrainer(cfg)
    same = [{"prompt": "abcde=", "chosen": "fgh", "rejected": "fgh"}] * 4
    from remax.algo.preference import bradley_terry_loss

    chosen, rejected = trainer._scores(same)
    assert torch.equal(chosen, rejected)
    assert float(bradley_terry_loss(chosen, rejected).detach()) == pytest.approx(
        math.log(2), abs=1e-7
    )


def _grads(model) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


def test_sample_equal_to_greedy_gives_exactly_zero_gradient():
    """Spec test 1: top_k=1 samples the greedy answer, so r − r_greedy = 0 and, with β = 0, no step."""
    trainer = _remax(top_k=1, kl_coef=0.0)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.optimizer.step = lambda: None  # inspect the gradient, do not apply it
    trainer.optimizer.zero_grad = lambda set_to_none=True: None
    metrics = trainer.train_step()
    assert metrics["response/same_as_greedy"] == 1.0
    assert metrics["reward/advantage_abs_mean"] == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in _grads(trainer.model))
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_with_kl_only_the_kl_term_remains_when_sample_equals_greedy():
    trainer = _remax(top_k=1, kl_coef=0.1)
    with torch.no_grad():  # a reference that differs from the policy, so the KL term is non-zero
        for p in trainer.setup.reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer.optimizer.step = lambda: None
    trainer.optimizer.zero_grad = lambda set_to_none=True: None
    trainer.train_step()
    assert any(torch.count_nonzero(g) > 0 for g in _grads(trainer.model))


@pytest.mark.parametrize("mode", list(EmptyResponse))
def test_empty_answers_are_handled_without_nan(mode):
    trainer = _remax(empty_response=mode)
    # A large EOS bias on the LM head's output: every answer is empty (EOS first).
    eos_bias = torch.zeros(trainer.model.config.vocab_size)
    eos_bias[0] = 1e4
    handle = trainer.model.lm_head.register_forward_hook(lambda m, i, out: out + eos_bias)
    try:
        sampled, greedy = trainer.rollout(trainer.setup.prompts.train[:4])
        mask = trainer.setup.train_mask(sampled)
        if mode == EmptyResponse.space_token:
            assert (sampled.response[:, 0] == trainer.setup.ids.space).all()
            assert mask[:, :2].all() and sampled.lengths.eq(2).all()
        elif mode == EmptyResponse.mask:
            assert not mask.any()
        else:  # keep: the EOS of an empty answer is a trained action
            assert mask[:, 0].all() and not mask[:, 1:].any()
        metrics = trainer.train_step()
    finally:
        handle.remove()
    assert all(math.isfinite(v) for v in metrics.values())


def test_each_sample_gets_its_own_prompts_greedy_baseline():
    """Spec test 7: with n samples per prompt, sample i·n + j is scored against prompt i's greedy."""
    trainer = _remax(samples_per_prompt=3)
    prompts = trainer.setup.prompts.train[:4]
    sampled, greedy = trainer.rollout(prompts)
    assert sampled.prompt_ids.shape[0] == 12 and greedy.prompt_ids.shape[0] == 4
    assert torch.equal(sampled.prompt_ids, greedy.prompt_ids.repeat_interleave(3, 0))
    metrics = trainer.train_step()
    assert math.isfinite(metrics["loss/policy"])


@pytest.mark.parametrize(
    ("k", "algo"),
    [
        (2, dict(baseline="leave_one_out")),
        (4, dict(baseline="group_norm", clip_ratio=0.2, kl_loss_coef=0.04, kl_estimator="k3")),
    ],
    ids=["rloo", "grpo"],
)
def test_group_baselines_decode_no_greedy_row(k, algo):
    """RLOO and GRPO read no greedy reward, so the rollout decodes k sampled rows per prompt only."""
    trainer = _remax(samples_per_prompt=k, **algo)
    flags, generate = [], trainer.setup.rollout_engine.generate

    def spy(ids, mask, sampling, *, greedy):
        flags.append(greedy)
        return generate(ids, mask, sampling, greedy=greedy)

    trainer.setup.rollout_engine.generate = spy
    metrics = trainer.train_step()
    assert len(flags) == 1 and flags[0].shape == (8 * k,) and not flags[0].any()
    assert "response/same_as_greedy" not in metrics
    assert all(math.isfinite(v) for v in metrics.values())
    # the advantages of a group average to 0, so the logged baseline is the reward mean
    assert metrics["reward/baseline_mean"] == pytest.approx(metrics["reward/mean"], abs=1e-6)


def test_evaluation_is_deterministic_and_leaves_the_training_rng_alone():
    """Spec test 26."""
    trainer = _remax(eval_decoding=EvalDecoding.sampled)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    a = trainer.evaluate()
    assert torch.equal(torch.get_rng_state(), state)
    b = trainer.evaluate()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_greedy_evaluation_equals_the_greedy_rollout():
    trainer = _remax(eval_decoding=EvalDecoding.greedy)
    ev = trainer.evaluate()
    assert ev["reward"].shape == (64,)


def test_kl_early_stop_fires_at_the_configured_value(tmp_path):
    from remax.run_dir import prepare
    from remax.trainers import loop

    cfg = RemaxJobConfig(
        **{
            **SMALL,
            "train": TrainConfig(batch_size=8, micro_batch_size=8, max_steps=6, eval_every=1),
        },
        run=__import__("remax.config", fromlist=["RunConfig"]).RunConfig(root=str(tmp_path)),
        optim=OptimConfig(lr=5e-2),
        algo=RemaxAlgoConfig(early_stop_kl=1e-3),
        eval_prompts=64,
    )
    trainer = RemaxTrainer(cfg)
    summary = loop.run(trainer, cfg, prepare(cfg, "remax"), "remax")
    assert summary["step"] < 6, "a 5e-2 learning rate moves the policy past KL 1e-3 at once"
    assert trainer.last_eval_kl >= 1e-3


def test_sampling_other_than_the_scored_softmax_is_flagged(caplog):
    with caplog.at_level(logging.WARNING, logger="remax"):
        trainer = _remax(top_p=0.9)
    assert "off-policy" in caplog.text
    assert trainer.train_step()["rollout/offpolicy_sampling"] == 1.0
    adjusted = _remax(top_p=0.9, logprob_dist=LogprobDist.sampling_adjusted)
    assert adjusted.train_step()["rollout/offpolicy_sampling"] == 0.0
    plain = _remax()
    assert plain.train_step()["rollout/offpolicy_sampling"] == 0.0


def test_sampling_adjusted_scores_the_filtered_distribution():
    trainer = _remax(top_k=2, logprob_dist=LogprobDist.sampling_adjusted)
    raw = _remax(top_k=2)
    sampled, _ = trainer.rollout(trainer.setup.prompts.train[:4])
    adj, _, _ = trainer._logprobs(trainer.model, sampled)
    plain, _, _ = raw._logprobs(trainer.model, sampled)
    m = sampled.response_mask
    # Renormalising over the two kept tokens can only raise a sampled token's probability.
    assert bool((adj[m] >= plain[m] - 1e-6).all()) and bool((adj[m] > plain[m]).any())


def test_remax_holds_exactly_three_models_and_no_value_model(tmp_path, tokenizer, reward_model):
    """Spec test 22: actor, reference, reward model — nothing else with parameters."""
    reward_model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    cfg = RemaxJobConfig(
        **SMALL, reward_model=RewardSourceConfig(path=str(tmp_path / "rm")), eval_prompts=64
    )
    trainer = RemaxTrainer(cfg)
    setup = trainer.setup  # the frozen models are the RL setup's (rl_setup.RLSetup)
    held = [*vars(trainer).values(), *vars(setup).values(), setup.reward_model]
    models = {id(v) for v in held if isinstance(v, PreTrainedModel)}
    assert models == {id(trainer.model), id(setup.reference), id(setup.reward_model)}
    assert not any(p.requires_grad for p in trainer.setup.reference.parameters())
    assert not any(p.requires_grad for p in trainer.setup.reward_model.parameters())
