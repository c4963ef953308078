"""Tests for `remax.algo.ppo` (the DeepSpeed-Chat PPO baseline, remax-spec §7).

Tolerances: float64 unless a test is about dtype. Hand cases use dyadic rationals (k / 2^m), for
which every operation here is exact, so they compare with rtol=0, atol=0. Where exp/log enter,
one float64 rounding is ~1.1e-16 relative, so atol=1e-14 on O(1) numbers leaves ~100 ulp of room
and still catches any real error. Loop-vs-vectorised comparisons sum the same terms in a
different association; with |terms| ≲ 10 and T ≤ 12 the drift is ≲ 1e-14, hence atol=1e-12.
"""

from __future__ import annotations

import math

import pytest
import torch

from remax.algo.ppo import gae_advantages, ppo_policy_loss, ppo_rewards, ppo_value_loss

F64 = torch.float64
EXACT = {"rtol": 0.0, "atol": 0.0}
ULPS = {"rtol": 0.0, "atol": 1e-14}
LOOP = {"rtol": 0.0, "atol": 1e-12}


def _mask(lengths: list[int], T: int) -> torch.Tensor:
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T) bool


def _random_case(seed: int, B: int = 6, T: int = 9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g).tolist()
    lengths[0], lengths[1] = 0, T  # always cover the empty row and the full-length row
    mask = _mask(lengths, T)
    rewards = torch.randn(B, T, generator=g, dtype=F64)
    values = torch.randn(B, T, generator=g, dtype=F64)
    # Garbage at padded positions: the functions must ignore it.
    rewards = torch.where(mask, rewards, torch.full_like(rewards, 1e3))
    values = torch.where(mask, values, torch.full_like(values, -1e3))
    return lengths, mask, rewards, values


def _slow_gae(rewards, values, lengths, gamma, lam):
    """Per-row Python loop over floats, the textbook recursion with V = 0 past the end."""
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n, last = lengths[b], 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b][t] = last
            ret[b][t] = last + values[b, t].item()
    return torch.tensor(adv, dtype=F64), torch.tensor(ret, dtype=F64)


# ---------------------------------------------------------------- GAE


@pytest.mark.parametrize("seed", range(20))
def test_gae_matches_slow_loop(seed):
    lengths, mask, rewards, values = _random_case(seed)
    gamma, lam = [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (0.5, 0.0)][seed % 4]
    adv, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    want_adv, want_ret = _slow_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, want_adv, **LOOP)
    torch.testing.assert_close(ret, want_ret, **LOOP)
    # Padded positions are exactly zero (not just small), the empty row entirely.
    assert torch.equal(adv[~mask], torch.zeros_like(adv[~mask]))
    assert torch.equal(ret[~mask], torch.zeros_like(ret[~mask]))


def test_gae_hand_three_tokens():
    # Row: 3 valid tokens + 1 pad with garbage. gamma = 1, lam = 0.5 (all dyadic -> exact).
    rewards = torch.tensor([[1.0, 0.0, 2.0, 99.0]], dtype=F64)
    values = torch.tensor([[0.5, 1.0, 1.5, -99.0]], dtype=F64)
    mask = _mask([3], 4)
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    # t=2: delta = 2 + 1*0 (V=0 after the end) - 1.5 = 0.5;          A2 = 0.5
    # t=1: delta = 0 + 1.5 - 1.0 = 0.5;  A1 = 0.5 + 0.5*0.5  = 0.75
    # t=0: delta = 1 + 1.0 - 0.5 = 1.5;  A0 = 1.5 + 0.5*0.75 = 1.875
    # returns = A + V = [2.375, 1.75, 2.0]
    torch.testing.assert_close(adv, torch.tensor([[1.875, 0.75, 0.5, 0.0]], dtype=F64), **EXACT)
    torch.testing.assert_close(ret, torch.tensor([[2.375, 1.75, 2.0, 0.0]], dtype=F64), **EXACT)


def test_gae_lambda_limits():
    rewards = torch.tensor([[1.0, 0.0, 2.0]], dtype=F64)
    values = torch.tensor([[0.5, 1.0, 1.5]], dtype=F64)
    mask = _mask([3], 3)
    # lam = 1, gamma = 1: returns are the Monte-Carlo reward-to-go [3, 2, 2], independent of V.
    _, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[3.0, 2.0, 2.0]], dtype=F64), **EXACT)
    # lam = 0: A_t = delta_t = [1 + 1 - 0.5, 0 + 1.5 - 1, 2 + 0 - 1.5] = [1.5, 0.5, 0.5].
    adv, _ = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.0)
    torch.testing.assert_close(adv, torch.tensor([[1.5, 0.5, 0.5]], dtype=F64), **EXACT)


def test_gae_is_detached():
    rewards = torch.randn(2, 3, dtype=F64, requires_grad=True)
    values = torch.randn(2, 3, dtype=F64, requires_grad=True)
    adv, ret = gae_advantages(rewards, values, _mask([3, 1], 3))
    assert not adv.requires_grad and not ret.requires_grad


# ---------------------------------------------------------------- rewards


def test_ppo_rewards_kl_placement_and_score_on_last_token():
    # lengths 4, 2, 0; logp - ref is dyadic and kl_coef = 0.25, so everything is exact.
    mask = _mask([4, 2, 0], 4)
    ref = torch.zeros(3, 4, dtype=F64)
    logprobs = torch.tensor(
        [[-1.0, -2.0, 0.5, -0.5], [2.0, -4.0, 7.0, 7.0], [3.0, 3.0, 3.0, 3.0]], dtype=F64
    )
    scores = torch.tensor([7.0, -100.0, 3.0], dtype=F64)
    r = ppo_rewards(scores, logprobs, ref, mask, kl_coef=0.25, reward_clip=5.0)
    # KL reward = -0.25 * (logp - ref); score clipped to [-5, 5] lands on index length - 1:
    # row 0: [0.25, 0.5, -0.125, 0.125 + clip(7) = 5.125]
    # row 1: [-0.5, 1.0 + clip(-100) = -4.0, pad 0, pad 0]
    # row 2: empty -> all zeros, score 3 dropped.
    want = torch.tensor(
        [[0.25, 0.5, -0.125, 5.125], [-0.5, -4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=F64
    )
    torch.testing.assert_close(r, want, **EXACT)


def test_ppo_rewards_kl_sign_and_no_clip():
    # The policy prefers the token over the reference (logp > ref) -> negative KL reward.
    mask = _mask([2], 2)
    logprobs = torch.tensor([[-0.5, -1.0]], dtype=F64)
    ref = torch.tensor([[-1.0, -1.0]], dtype=F64)
    r = ppo_rewards(torch.tensor([100.0], dtype=F64), logprobs, ref, mask, kl_coef=0.5)
    # [-0.5 * 0.5, 0 + 100 (unclipped)] = [-0.25, 100]
    torch.testing.assert_close(r, torch.tensor([[-0.25, 100.0]], dtype=F64), **EXACT)


def test_ppo_rewards_rejects_non_contiguous_mask():
    mask = torch.tensor([[True, False, True]])
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="contiguous"):
        ppo_rewards(torch.zeros(1), x, x, mask, kl_coef=0.1)


# ---------------------------------------------------------------- policy loss


def _policy_hand_case():
    # Four valid tokens in rows of lengths 3 and 1, so a per-sequence mean would differ.
    # clip_range 0.2; old_logprobs = 0 so ratio = exp(logprobs).
    #  token  A    ratio  ratio*A  clip(ratio)*A  -min(.)  clipped branch active?
    #  a     +1    0.5     0.5       0.8           -0.5     no
    #  b     +1    1.5     1.5       1.2           -1.2     yes
    #  c     -1    1.5    -1.5      -1.2           +1.5     no
    #  d     -1    0.5    -0.5      -0.8           +0.8     yes
    log_half, log_3half = math.log(0.5), math.log(1.5)
    logprobs = torch.tensor([[log_half, log_3half, log_3half], [log_half, 0.0, 0.0]], dtype=F64)
    logprobs.requires_grad_(True)
    old = torch.zeros(2, 3, dtype=F64)
    adv = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 0.0, 0.0]], dtype=F64)
    return logprobs, old, adv, _mask([3, 1], 3)


def test_policy_loss_clip_hand_values():
    logprobs, old, adv, mask = _policy_hand_case()
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, clip_range=0.2)
    # token mean over 4 tokens: (-0.5 - 1.2 + 1.5 + 0.8) / 4 = 0.6 / 4 = 0.15
    torch.testing.assert_close(loss, torch.tensor(0.15, dtype=F64), **ULPS)
    torch.testing.assert_close(stats.clip_fraction, torch.tensor(0.5, dtype=F64), **EXACT)
    # ratio mean (0.5 + 1.5 + 1.5 + 0.5) / 4 = 1
    torch.testing.assert_close(stats.ratio_mean, torch.tensor(1.0, dtype=F64), **ULPS)
    # k3 per token (r - 1) - log r: 2 * [(-0.5 - log 0.5) + (0.5 - log 1.5)] / 4
    k3 = 0.5 * ((-0.5 - math.log(0.5)) + (0.5 - math.log(1.5)))
    torch.testing.assert_close(stats.approx_kl, torch.tensor(k3, dtype=F64), **ULPS)
    loss.backward()
    # d/dlogp of -A*ratio is -A*ratio / 4 where unclipped (a: -0.125, c: +0.375); clipped
    # tokens (b, d) and padding get exactly zero gradient.
    want = torch.tensor([[-0.125, 0.0, 0.375], [0.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(logprobs.grad, want, **ULPS)


def test_policy_loss_inside_trust_region_is_unclipped():
    # ratio 1.1 (inside [0.8, 1.2]) for both signs of A: no clipping, loss = -mean(ratio * A).
    logprobs = torch.full((1, 2), math.log(1.1), dtype=F64)
    adv = torch.tensor([[2.0, -1.0]], dtype=F64)
    loss, stats = ppo_policy_loss(logprobs, torch.zeros_like(logprobs), adv, _mask([2], 2))
    # -(1.1 * 2 + 1.1 * -1) / 2 = -0.55
    torch.testing.assert_close(loss, torch.tensor(-0.55, dtype=F64), **ULPS)
    assert stats.clip_fraction.item() == 0.0


def test_policy_loss_on_policy_equals_vanilla_policy_gradient():
    # First epoch, first minibatch: logprobs == old_logprobs, so ratio == 1 exactly and the
    # gradient must be the REINFORCE-with-advantage gradient of -sum(A * logp * m) / sum(m).
    g = torch.Generator().manual_seed(0)
    mask = _mask([5, 2, 0, 3], 5)
    logprobs = (-torch.rand(4, 5, generator=g, dtype=F64)).requires_grad_(True)
    adv = torch.randn(4, 5, generator=g, dtype=F64)
    loss, stats = ppo_policy_loss(logprobs, logprobs.detach().clone(), adv, mask)
    assert stats.ratio_mean.item() == 1.0  # exp(0) = 1 exactly
    assert stats.approx_kl.item() == 0.0
    assert stats.clip_fraction.item() == 0.0
    (grad,) = torch.autograd.grad(loss, logprobs)

    lp = logprobs.detach().clone().requires_grad_(True)
    vanilla = -(adv * lp * mask).sum() / mask.sum()
    (want,) = torch.autograd.grad(vanilla, lp)
    torch.testing.assert_close(grad, want, **ULPS)
    torch.testing.assert_close(loss, -(adv * mask).sum() / mask.sum(), **ULPS)


# ---------------------------------------------------------------- value loss


def test_value_loss_clip_hand_values():
    # c = 0.25, old = 0, so v_clipped = clamp(v, -0.25, 0.25). All dyadic -> exact.
    #  v       R    (v-R)^2   (v_clip-R)^2        0.5*max   clipped active?
    #  0.5     1    0.25      (0.25-1)^2=0.5625   0.28125   yes
    #  0.125   1    0.765625  same (in range)     0.3828125 no
    #  0.5     0    0.25      0.0625              0.125     no
    # -0.5    -1    0.25      (-0.25+1)^2=0.5625  0.28125   yes
    values = torch.tensor([[0.5, 0.125, 0.5], [-0.5, 9.0, 9.0]], dtype=F64, requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, 0.0], [-1.0, 9.0, 9.0]], dtype=F64)
    old = torch.zeros(2, 3, dtype=F64)
    mask = _mask([3, 1], 3)
    loss, stats = ppo_value_loss(values, old, returns, mask, clip_range_value=0.25)
    # (0.28125 + 0.3828125 + 0.125 + 0.28125) / 4 = 1.0703125 / 4 = 0.267578125
    torch.testing.assert_close(loss, torch.tensor(0.267578125, dtype=F64), **EXACT)
    torch.testing.assert_close(stats.clip_fraction, torch.tensor(0.5, dtype=F64), **EXACT)
    # mse = (0.25 + 0.765625 + 0.25 + 0.25) / 4 = 0.37890625
    torch.testing.assert_close(stats.mse, torch.tensor(0.37890625, dtype=F64), **EXACT)
    loss.backward()
    # Clipped tokens: v outside old +- c, gradient cut to 0. Unclipped: (v - R) / 4:
    # (0.125 - 1) / 4 = -0.21875 and (0.5 - 0) / 4 = 0.125.
    want = torch.tensor([[0.0, -0.21875, 0.125], [0.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(values.grad, want, **EXACT)


# ---------------------------------------------------------------- reference transcription


def _dschat_reference(scores, logp, ref, new_logp, values, old_values, mask, lengths):
    """DS-Chat `ppo_trainer.py` transcribed with start = 0 (tensors are response-only).

    `ends` is the number of valid tokens: our mask already contains the token that DS-Chat's
    "+1" points at (spec §7), so the score lands on the same token.
    """
    kl_ctl, clip_reward_value, cliprange, cliprange_value, gamma, lam = 0.1, 5, 0.2, 0.2, 1.0, 0.95
    rewards = -kl_ctl * (logp - ref)
    reward_clip = torch.clamp(scores, -clip_reward_value, clip_reward_value)
    for j in range(logp.shape[0]):
        rewards[j, 0 : lengths[j]][-1] += reward_clip[j]
    old_values = old_values.clone()
    for i in range(rewards.shape[0]):
        rewards[i, lengths[i] :] = 0
        old_values[i, lengths[i] :] = 0
    lastgaelam, advantages_reversed, length = 0, [], rewards.size()[-1]
    for t in reversed(range(length)):
        nextvalues = old_values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - old_values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + old_values
    m = mask.to(logp.dtype)
    ratio = torch.exp((new_logp - logp) * m)  # logp: experience time; new_logp: training time
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = torch.sum(torch.max(pg1, pg2) * m) / m.sum()
    v_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf = 0.5 * torch.sum(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2) * m)
    return rewards, advantages, returns, pg_loss, vf / m.sum()


@pytest.mark.parametrize("seed", range(5))
def test_matches_dschat_transcription(seed):
    g = torch.Generator().manual_seed(100 + seed)
    B, T = 5, 8
    lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()  # DS-Chat cannot take n = 0
    mask = _mask(lengths, T)

    def randn():
        return torch.randn(B, T, generator=g, dtype=F64)

    scores = 4 * torch.randn(B, generator=g, dtype=F64)  # some beyond the +-5 clip
    logp, ref, values, old_values = -randn().abs(), -randn().abs(), randn(), randn()
    new_logp = logp + 0.3 * randn()  # some ratios outside [0.8, 1.2]
    want = _dschat_reference(scores, logp, ref, new_logp, values, old_values, mask, lengths)

    rewards = ppo_rewards(scores, logp, ref, mask, kl_coef=0.1, reward_clip=5.0)
    adv, ret = gae_advantages(rewards, old_values, mask, gamma=1.0, lam=0.95)
    pg, _ = ppo_policy_loss(new_logp, logp, adv, mask, clip_range=0.2)
    vf, _ = ppo_value_loss(values, old_values, ret, mask, clip_range_value=0.2)
    for got, ref_value in zip((rewards, adv, ret, pg, vf), want, strict=True):
        torch.testing.assert_close(got, ref_value, **LOOP)


# ---------------------------------------------------------------- masking, empty rows, dtype


def _all_outputs(logp, old_logp, ref, adv, values, old_values, returns, scores, mask):
    logp = logp.detach().clone().requires_grad_(True)
    values = values.detach().clone().requires_grad_(True)
    pg, pg_stats = ppo_policy_loss(logp, old_logp, adv, mask)
    vf, vf_stats = ppo_value_loss(values, old_values, returns, mask)
    (pg + vf).backward()
    rewards = ppo_rewards(scores, logp.detach(), ref, mask, kl_coef=0.1, reward_clip=5.0)
    gae = gae_advantages(rewards, old_values, mask)
    return (pg, *pg_stats, vf, *vf_stats, logp.grad, values.grad, rewards, *gae)


@pytest.mark.parametrize("garbage", [1e6, -1e6, math.inf, -math.inf, math.nan])
def test_masked_positions_do_not_affect_anything(garbage):
    g = torch.Generator().manual_seed(7)
    B, T = 4, 6
    mask = _mask([6, 3, 1, 0], T)
    inputs = [torch.randn(B, T, generator=g, dtype=F64) for _ in range(7)]
    scores = torch.randn(B, generator=g, dtype=F64)
    clean = _all_outputs(*inputs, scores, mask)
    dirty = [torch.where(mask, x, torch.full_like(x, garbage)) for x in inputs]
    noisy = _all_outputs(*dirty, scores, mask)
    for a, b in zip(clean, noisy, strict=True):
        assert torch.equal(a, b)  # bit-identical: masked entries never enter the arithmetic
    # Extra right padding changes nothing either, up to the reduction order of a wider sum.
    padded = [torch.cat([x, torch.full((B, 2), garbage, dtype=F64)], dim=1) for x in inputs]
    wide = _all_outputs(*padded, scores, torch.cat([mask, torch.zeros(B, 2, dtype=torch.bool)], 1))
    for a, b in zip(clean[:8], wide[:8], strict=True):  # the scalar losses and stats
        torch.testing.assert_close(a, b, **ULPS)


def test_empty_rows_and_empty_batch_give_zeros_not_nan():
    B, T = 3, 4
    mask = torch.zeros(B, T, dtype=torch.bool)
    x = torch.randn(B, T, dtype=F64)
    outs = _all_outputs(x, x + 1, x, x, x, x, x, torch.ones(B, dtype=F64), mask)
    for out in outs:
        assert torch.equal(out, torch.zeros_like(out)), out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
def test_dtype_is_kept(dtype):
    B, T = 2, 3
    mask = _mask([3, 2], T)
    x = torch.randn(B, T).to(dtype)
    rewards = ppo_rewards(torch.randn(B).to(dtype), x, x, mask, kl_coef=0.1)
    adv, ret = gae_advantages(rewards, x, mask)
    pg, pg_stats = ppo_policy_loss(x, x, adv, mask)
    vf, vf_stats = ppo_value_loss(x, x, ret, mask)
    for out in (rewards, adv, ret, pg, vf, *pg_stats, *vf_stats):
        assert out.dtype == dtype


def test_bad_arguments_name_the_problem():
    m = _mask([2], 2)
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="clip_range must be > 0"):
        ppo_policy_loss(x, x, x, m, clip_range=0.0)
    with pytest.raises(ValueError, match="clip_range_value must be > 0"):
        ppo_value_loss(x, x, x, m, clip_range_value=-1.0)
    with pytest.raises(ValueError, match="one shape"):
        ppo_policy_loss(x, torch.zeros(1, 3), x, m)
    with pytest.raises(ValueError, match="gamma"):
        gae_advantages(x, x, m, gamma=0.0)
    with pytest.raises(ValueError, match="reward_clip"):
        ppo_rewards(torch.zeros(1), x, x, m, kl_coef=0.1, reward_clip=0.0)
