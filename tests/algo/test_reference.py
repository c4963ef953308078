"""Pins the official release's semantics: a naive transcription of its returns and loss.

The two functions below transcribe liziniu/ReMax @ 536ba49,
``step3_rlhf_finetuning/remax_trainer.py`` (``compute_loss``, ``compute_returns``,
``actor_loss_fn``; remax-spec §3) on the release's own array layout: full sequences of prompt length
P plus T response tokens, log-probs shifted by one (position s scores token s + 1), and
``action_mask = attention_mask[:, 1:]``. The vectorised functions get the response slice only.
Float64 throughout, so the only difference is γ^k by ``pow`` versus k repeated multiplications:
a few ulps, hence rtol = atol = 1e-12.
"""

from __future__ import annotations

import pytest
import torch

from remax.algo.remax import policy_gradient_loss, remax_advantages

CLIP_REWARD_VALUE = 5.0  # hard-coded in the release's trainer __init__


def release_returns(prompts, log_probs, ref_log_probs, reward_score, baseline_reward_score,
                    action_mask, kl_ctl, gamma):  # fmt: skip
    """``compute_loss``'s no-grad block followed by ``compute_returns``, loop for loop."""
    start = prompts.shape[1] - 1
    kl_divergence = -(log_probs - ref_log_probs)
    kl_divergence = kl_ctl * kl_divergence
    reward_score = reward_score - baseline_reward_score  # subtract first ...

    returns = torch.zeros_like(kl_divergence)
    ends = start + action_mask[:, start:].sum(1)
    reward_clip = torch.clamp(reward_score, -CLIP_REWARD_VALUE, CLIP_REWARD_VALUE)  # ... then clip
    batch_size = kl_divergence.shape[0]
    for j in range(batch_size):
        cumulative_reward = reward_clip[
            j
        ].clone()  # the release mutates a view in place; same value
        cumulative_kl = 0
        for i in reversed(range(start, int(ends[j]))):
            cumulative_kl = kl_divergence[j, i]  # overwritten, not accumulated
            cumulative_reward *= gamma  # before the add: the last valid token gets γ¹
            returns[j, i] += cumulative_kl + cumulative_reward
    return returns[:, start:]


def release_actor_loss(logprobs, returns, mask):
    """``actor_loss_fn``: a token mean over the micro-batch."""
    return torch.sum(-returns * logprobs * mask) / mask.sum()


def _release_batch(seed: int):
    """A random batch in the release's layout, with response lengths including 0 and full."""
    g = torch.Generator().manual_seed(seed)
    B = int(torch.randint(2, 7, (1,), generator=g))
    P = int(torch.randint(2, 6, (1,), generator=g))
    T = int(torch.randint(1, 10, (1,), generator=g))
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0], lengths[-1] = 0, T  # always one empty and one full-length response
    # attention mask over prompt + response: prompts left-padded, responses right-padded
    attention_mask = torch.zeros(B, P + T, dtype=torch.long)
    for b in range(B):
        first_prompt_token = int(torch.randint(0, P, (1,), generator=g))
        attention_mask[b, first_prompt_token:P] = 1
        attention_mask[b, P : P + int(lengths[b])] = 1
    action_mask = attention_mask[:, 1:]  # (B, P + T − 1), aligned with the shifted log-probs
    log_probs = -torch.rand(B, P + T - 1, generator=g, dtype=torch.float64) * 5
    ref_log_probs = -torch.rand(B, P + T - 1, generator=g, dtype=torch.float64) * 5
    # RM scores spread wide enough that |r − r_greedy| > 5 happens often, so clipping is exercised
    rewards = torch.randn(B, generator=g, dtype=torch.float64) * 6
    baseline = torch.randn(B, generator=g, dtype=torch.float64) * 6
    kl_ctl = float(torch.rand((), generator=g)) * 0.2
    gamma = 0.5 + 0.5 * float(torch.rand((), generator=g))
    prompts = torch.zeros(B, P, dtype=torch.long)
    return prompts, log_probs, ref_log_probs, rewards, baseline, action_mask, kl_ctl, gamma


@pytest.mark.parametrize("seed", range(20))
def test_vectorised_returns_match_the_release_double_loop(seed):
    prompts, log_probs, ref_log_probs, rewards, baseline, action_mask, kl_ctl, gamma = (
        _release_batch(seed)
    )
    expected = release_returns(
        prompts, log_probs, ref_log_probs, rewards, baseline, action_mask, kl_ctl, gamma
    )
    start = prompts.shape[1] - 1
    response_mask = action_mask[:, start:].bool()  # (B, T)
    got = remax_advantages(
        rewards,
        baseline,
        response_mask,
        kl=log_probs[:, start:] - ref_log_probs[:, start:],  # k1 log-ratio; −β is applied inside
        kl_coef=kl_ctl,
        gamma=gamma,
        reward_clip=CLIP_REWARD_VALUE,
        kl_mode="own_token",
        discount_convention="official",
        clip_target="advantage",
    )
    assert response_mask[0].sum() == 0 and response_mask[-1].all()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)

    new_log_probs = log_probs[:, start:] - 0.1  # the fresh actor forward, with grad
    expected_loss = release_actor_loss(new_log_probs, expected, action_mask[:, start:])
    got_loss = policy_gradient_loss(new_log_probs, got, response_mask, aggregation="token_mean")
    torch.testing.assert_close(got_loss, expected_loss, rtol=1e-12, atol=1e-12)


def test_transcription_is_sensitive_to_each_departure():
    # Guards the guard: each of the release's conventions changes the result on this batch, so the
    # comparison above would catch a vectorised function that silently used another convention.
    prompts, log_probs, ref_log_probs, rewards, baseline, action_mask, kl_ctl, gamma = (
        _release_batch(3)
    )
    start = prompts.shape[1] - 1
    expected = release_returns(
        prompts, log_probs, ref_log_probs, rewards, baseline, action_mask, kl_ctl, gamma
    )
    mask = action_mask[:, start:].bool()
    common = dict(
        kl=log_probs[:, start:] - ref_log_probs[:, start:],
        kl_coef=kl_ctl,
        gamma=gamma,
        reward_clip=CLIP_REWARD_VALUE,
    )
    for departure in (
        dict(kl_mode="reward_to_go"),
        dict(discount_convention="textbook"),
        dict(clip_target="reward"),
    ):
        other = remax_advantages(rewards, baseline, mask, **common, **departure)
        assert (other - expected).abs().max() > 1e-6, departure
