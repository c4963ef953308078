"""ReMax returns, the policy-gradient loss and the batch stats (remax/algo/remax.py).

Numbers refer to remax-spec §9. Hand-computed cases carry their arithmetic in comments; float64
throughout, so "exact" comparisons use tolerances of a few ulps.
"""

from __future__ import annotations

import math

import pytest
import torch

from remax.algo.remax import RemaxStats, policy_gradient_loss, remax_advantages, remax_stats
from remax.algo.types import Aggregation, ClipTarget, DiscountConvention, KLMode

f64 = torch.float64


def _t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=f64)


def _prefix_mask(lengths: list[int], T: int) -> torch.Tensor:
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)


# --- test 1: sample == greedy -------------------------------------------------------------------


def test_sample_equal_to_greedy_gives_zero_advantage_and_zero_gradient():
    rewards = _t([1.3, -0.7])
    mask = _prefix_mask([3, 2], 4)
    adv = remax_advantages(rewards, rewards.clone(), mask, gamma=0.99, reward_clip=5.0)
    assert (adv == 0).all()
    logprobs = torch.randn(2, 4, dtype=f64, requires_grad=True)
    policy_gradient_loss(logprobs, adv, mask).backward()
    assert (logprobs.grad == 0).all()


def test_sample_equal_to_greedy_with_kl_leaves_only_the_kl_term():
    rewards = _t([1.3, -0.7])
    mask = _prefix_mask([3, 2], 4)
    kl = torch.randn(2, 4, dtype=f64)
    adv = remax_advantages(rewards, rewards.clone(), mask, kl=kl, kl_coef=0.1, gamma=0.99)
    torch.testing.assert_close(adv, torch.where(mask, -0.1 * kl, 0.0), rtol=0, atol=0)


# --- test 5: the baseline is a constant ---------------------------------------------------------


def test_no_gradient_flows_through_the_baseline_or_the_rewards():
    mask = _prefix_mask([2, 3], 3)
    rewards = _t([1.0, 2.0]).requires_grad_(True)
    baseline = _t([0.5, 2.5]).requires_grad_(True)
    kl = torch.randn(2, 3, dtype=f64, requires_grad=True)
    adv = remax_advantages(rewards, baseline, mask, kl=kl, kl_coef=0.1)
    assert not adv.requires_grad  # no graph path from the returns to the greedy path
    logprobs = torch.randn(2, 3, dtype=f64, requires_grad=True)
    # advantages that do carry a graph are detached inside the loss
    loss = policy_gradient_loss(logprobs, adv + 0 * baseline.sum(), mask)
    loss.backward()
    assert baseline.grad is None and rewards.grad is None and kl.grad is None
    assert logprobs.grad is not None


# --- test 9: KL zero at init ------------------------------------------------------------------


def test_kl_zero_at_init_returns_are_clipped_discounted_difference():
    mask = _prefix_mask([3, 1], 3)
    logprobs = torch.randn(2, 3, dtype=f64)
    kl = logprobs - logprobs.clone()  # policy == reference: log-ratio exactly 0
    adv = remax_advantages(
        _t([9.0, -1.0]), _t([1.0, 0.0]), mask, kl=kl, kl_coef=0.05, gamma=0.5, reward_clip=5.0
    )
    # row 0: d = clip(8) = 5, n = 3 -> 5·[γ³, γ², γ¹] = [0.625, 1.25, 2.5]
    # row 1: d = −1, n = 1 -> [−γ, 0, 0] = [−0.5, 0, 0]
    torch.testing.assert_close(adv, _t([[0.625, 1.25, 2.5], [-0.5, 0.0, 0.0]]), rtol=0, atol=0)


# --- test 10: KL sign and placement ---------------------------------------------------------


KL3 = _t([[0.5, -0.2, 0.1, 9.0]])  # 3 valid tokens; the 9.0 sits on padding and must be ignored
MASK3 = _prefix_mask([3], 4)


def test_hand_computed_own_token():
    # β = 0.1, γ = 0.5, d = 2 − 0 = 2, n = 3, official exponents n − i = 3, 2, 1
    # R_0 = −0.1·0.5  + 0.5³·2 = −0.05 + 0.25 = 0.2
    # R_1 = −0.1·−0.2 + 0.5²·2 =  0.02 + 0.5  = 0.52
    # R_2 = −0.1·0.1  + 0.5¹·2 = −0.01 + 1.0  = 0.99
    adv = remax_advantages(
        _t([2.0]), _t([0.0]), MASK3, kl=KL3, kl_coef=0.1, gamma=0.5, kl_mode="own_token"
    )
    torch.testing.assert_close(adv, _t([[0.2, 0.52, 0.99, 0.0]]), rtol=0, atol=1e-15)


def test_hand_computed_reward_to_go():
    # KL-to-go G_i = Σ_{j≥i} γ^(j−i)·kl_j with γ = 0.5:
    # G_2 = 0.1; G_1 = −0.2 + 0.5·0.1 = −0.15; G_0 = 0.5 + 0.5·(−0.15) = 0.425
    # R_0 = −0.1·0.425  + 0.25 = 0.2075
    # R_1 = −0.1·(−0.15) + 0.5  = 0.515
    # R_2 = −0.1·0.1    + 1.0  = 0.99
    adv = remax_advantages(
        _t([2.0]), _t([0.0]), MASK3, kl=KL3, kl_coef=0.1, gamma=0.5, kl_mode="reward_to_go"
    )
    torch.testing.assert_close(adv, _t([[0.2075, 0.515, 0.99, 0.0]]), rtol=0, atol=1e-15)


def test_kl_sign_token_preferred_by_policy_is_penalised():
    # log π > log π_ref (the policy prefers the token more than the reference): k1 > 0, and with
    # no reward difference the token's return is negative, so the update pushes its log-prob down.
    logp, ref = _t([[-0.5]]), _t([[-1.5]])
    adv = remax_advantages(_t([1.0]), _t([1.0]), _prefix_mask([1], 1), kl=logp - ref, kl_coef=0.2)
    assert adv.item() == pytest.approx(-0.2, rel=1e-15)  # −β·(logp − ref) = −0.2·1
    logprob = logp.clone().requires_grad_(True)
    policy_gradient_loss(logprob, adv, _prefix_mask([1], 1)).backward()
    assert logprob.grad.item() > 0  # gradient descent lowers log π of that token


# --- test 11: clip order --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("r", "r_greedy", "after_subtract", "before_subtract"),
    [
        (4.9, -4.9, 5.0, 9.8),  # 9.8 is clipped to 5; each reward is inside ±5: 4.9 + 4.9
        (-4.9, 4.9, -5.0, -9.8),
        (5.1, 5.1, 0.0, 0.0),  # equal rewards: 0 either way
        (5.1, 4.9, 0.2, 0.1),  # d = 0.2 inside the bound; clip(5.1) − 4.9 = 0.1
        (-5.1, 0.0, -5.0, -5.0),
        (100.0, -100.0, 5.0, 10.0),  # 200 -> 5; clip(100) − clip(−100) = 5 + 5
        (100.0, 95.1, 4.9, 0.0),  # d = 4.9 unclipped; both rewards clip to 5 -> 0
        (-100.0, -100.0, 0.0, 0.0),
    ],
)
def test_clip_order(r, r_greedy, after_subtract, before_subtract):
    mask = _prefix_mask([1], 1)  # one token, γ = 1: the return is d itself
    kwargs = dict(gamma=1.0, reward_clip=5.0)
    adv = remax_advantages(_t([r]), _t([r_greedy]), mask, clip_target="advantage", **kwargs)
    assert adv.item() == pytest.approx(after_subtract, abs=1e-12)
    adv = remax_advantages(_t([r]), _t([r_greedy]), mask, clip_target=ClipTarget.reward, **kwargs)
    assert adv.item() == pytest.approx(before_subtract, abs=1e-12)


def test_no_clip_by_default():
    adv = remax_advantages(_t([100.0]), _t([-100.0]), _prefix_mask([1], 1))
    assert adv.item() == 200.0


# --- test 12: discount exponent -------------------------------------------------------------


def test_discount_exponent_both_conventions():
    g, d = 0.9, 2.0
    mask = _prefix_mask([4, 2, 0], 6)
    rewards, baseline = _t([d, d, d]), _t([0.0, 0.0, 0.0])
    official = remax_advantages(rewards, baseline, mask, gamma=g)
    textbook = remax_advantages(rewards, baseline, mask, gamma=g, discount_convention="textbook")
    # weight of valid token i of n: γ^(n−i) official (last token γ¹), γ^(n−1−i) textbook (γ⁰)
    expected_official = _t(
        [
            [g**4, g**3, g**2, g, 0, 0],
            [g**2, g, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
        ]
    )
    torch.testing.assert_close(official, d * expected_official, rtol=1e-15, atol=0)
    torch.testing.assert_close(textbook, d * expected_official / g * mask, rtol=1e-15, atol=0)
    # γ = 1: every valid token gets d in both conventions (Algorithm 1)
    for convention in DiscountConvention:
        flat = remax_advantages(rewards, baseline, mask, discount_convention=convention)
        assert torch.equal(flat, torch.where(mask, d, 0.0).to(f64))


# --- masking (test 13 at the loss level) and empty responses (test 16) ------------------------


def _batch(seed: int, lengths: list[int], T: int):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = _prefix_mask(lengths, T)
    rewards = torch.randn(B, generator=g, dtype=f64) * 3
    baseline = torch.randn(B, generator=g, dtype=f64) * 3
    kl = torch.randn(B, T, generator=g, dtype=f64) * 0.1
    logprobs = -torch.rand(B, T, generator=g, dtype=f64) * 4
    return rewards, baseline, kl, logprobs, mask


OFFICIAL = dict(kl_coef=0.05, gamma=0.99, reward_clip=5.0)


@pytest.mark.parametrize("aggregation", list(Aggregation))
@pytest.mark.parametrize("kl_mode", list(KLMode))
def test_extra_right_padding_and_garbage_do_not_change_loss_or_gradient(aggregation, kl_mode):
    rewards, baseline, kl, logprobs, mask = _batch(0, [5, 2, 0, 7], 7)
    adv = remax_advantages(rewards, baseline, mask, kl=kl, kl_mode=kl_mode, **OFFICIAL)
    lp = logprobs.clone().requires_grad_(True)
    loss = policy_gradient_loss(lp, adv, mask, aggregation=aggregation)
    loss.backward()

    # append 3 padding columns holding garbage, and poison the existing padded positions too
    pad = 3
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=f64)
    kl_p = torch.cat([kl, garbage.expand(4, pad)], dim=1)
    lp_p = torch.cat([logprobs, garbage.expand(4, pad)], dim=1)
    mask_p = torch.cat([mask, torch.zeros(4, pad, dtype=torch.bool)], dim=1)
    kl_p[~mask_p] = float("nan")
    lp_p[~mask_p] = -float("inf")
    lp_p.requires_grad_(True)
    adv_p = remax_advantages(rewards, baseline, mask_p, kl=kl_p, kl_mode=kl_mode, **OFFICIAL)
    assert torch.equal(adv_p[:, :7], adv) and (adv_p[:, 7:] == 0).all()
    adv_p[~mask_p] = float("nan")  # the loss must not read advantages at padded positions either
    loss_p = policy_gradient_loss(lp_p, adv_p, mask_p, aggregation=aggregation)
    loss_p.backward()
    # the same finite terms summed over a wider tensor: equal up to summation order
    assert loss_p.item() == pytest.approx(loss.item(), rel=1e-14)
    assert torch.equal(lp_p.grad[:, :7], lp.grad)
    assert (lp_p.grad[~mask_p] == 0).all()


def test_empty_responses_give_zeros_not_nan():
    rewards, baseline, kl, logprobs, mask = _batch(1, [0, 3, 0], 4)
    for kl_mode in KLMode:
        adv = remax_advantages(rewards, baseline, mask, kl=kl, kl_mode=kl_mode, **OFFICIAL)
        assert torch.isfinite(adv).all() and (adv[[0, 2]] == 0).all() and (adv[1, :3] != 0).all()
    # a batch with no valid token at all: loss 0, gradient defined and 0
    empty = torch.zeros_like(mask)
    adv = remax_advantages(rewards, baseline, empty, kl=kl, **OFFICIAL)
    assert (adv == 0).all()
    for aggregation in Aggregation:
        lp = logprobs.clone().requires_grad_(True)
        loss = policy_gradient_loss(lp, adv, empty, aggregation=aggregation)
        loss.backward()
        assert loss.item() == 0.0 and (lp.grad == 0).all()
    # zero-length responses (T = 0) are fine too
    none = remax_advantages(rewards, baseline, torch.zeros(3, 0, dtype=torch.bool))
    assert none.shape == (3, 0)


# --- test 17: aggregation -------------------------------------------------------------------


def test_token_mean_is_seq_sum_over_a_known_constant_only_for_equal_lengths():
    # β = 0, γ = 1: every valid token's return is d. token_mean = Σ/N and seq_sum = Σ/B over the
    # same per-token sum Σ, with N valid tokens and B rows.
    L = 4
    rewards, baseline, _, logprobs, mask = _batch(2, [L, L, L], 6)
    adv = remax_advantages(rewards, baseline, mask)
    tm = policy_gradient_loss(logprobs, adv, mask, aggregation="token_mean")
    ss = policy_gradient_loss(logprobs, adv, mask, aggregation="seq_sum")
    # equal lengths: N = B·L, so token_mean = seq_sum / L, a constant known before sampling
    assert tm.item() == pytest.approx(ss.item() / L, rel=1e-14)

    # unequal lengths: the factor B/N depends on the sample. With one row per batch (the Llama-2
    # script) a length-1 response keeps its full weight and a length-6 one gets 1/6 of it.
    rewards, baseline, _, logprobs, mask = _batch(2, [1, 6], 6)
    adv = remax_advantages(rewards, baseline, mask)
    for row, n in ((0, 1), (1, 6)):
        one = slice(row, row + 1)
        tm = policy_gradient_loss(logprobs[one], adv[one], mask[one], aggregation="token_mean")
        ss = policy_gradient_loss(logprobs[one], adv[one], mask[one], aggregation="seq_sum")
        assert tm.item() == pytest.approx(ss.item() / n, rel=1e-14)
    # the chosen convention, by hand over the whole batch: 1 + 6 = 7 tokens, B = 2 rows
    per_token_sum = -(adv * logprobs)[mask].sum().item()
    tm = policy_gradient_loss(logprobs, adv, mask, aggregation="token_mean")
    ss = policy_gradient_loss(logprobs, adv, mask, aggregation="seq_sum")
    assert tm.item() == pytest.approx(per_token_sum / 7, rel=1e-14)
    assert ss.item() == pytest.approx(per_token_sum / 2, rel=1e-14)


@pytest.mark.parametrize("aggregation", list(Aggregation))
def test_global_denominator_makes_shards_sum_to_the_full_batch_loss(aggregation):
    # Two data-parallel ranks with B/2 rows each: with the global count as the denominator, the
    # shards' losses (and gradients) add up to the single-rank loss (remax-spec §9 test 20).
    rewards, baseline, kl, logprobs, mask = _batch(3, [2, 6, 0, 5], 6)
    adv = remax_advantages(rewards, baseline, mask, kl=kl, **OFFICIAL)
    lp = logprobs.clone().requires_grad_(True)
    policy_gradient_loss(lp, adv, mask, aggregation=aggregation).backward()
    # rank_token_mean is the token-mean function too; only the trainer's denominator differs
    # (per rank, the release's convention), so given the global count it must add up as well.
    token_kinds = (Aggregation.token_mean, Aggregation.rank_token_mean)
    den = mask.sum() if aggregation in token_kinds else mask.shape[0]
    lp_shard = logprobs.clone().requires_grad_(True)
    total = sum(
        policy_gradient_loss(lp_shard[s], adv[s], mask[s], aggregation=aggregation, denominator=den)
        for s in (slice(0, 2), slice(2, 4))
    )
    total.backward()
    torch.testing.assert_close(lp_shard.grad, lp.grad, rtol=1e-14, atol=0)


def test_loss_hand_value_and_gradient():
    # two rows, lengths 2 and 1; A = [[1, 2], [−3, ·]], log π = [[−1, −2], [−0.5, ·]]
    logprobs = _t([[-1.0, -2.0], [-0.5, -9.0]]).requires_grad_(True)
    adv = _t([[1.0, 2.0], [-3.0, 7.0]])
    mask = _prefix_mask([2, 1], 2)
    # Σ −A·logp·m = −(1·−1 + 2·−2 + −3·−0.5) = −(−1 − 4 + 1.5) = 3.5
    loss = policy_gradient_loss(logprobs, adv, mask)  # token mean: 3.5 / 3
    assert loss.item() == pytest.approx(3.5 / 3, rel=1e-15)
    loss.backward()
    torch.testing.assert_close(
        logprobs.grad, _t([[-1.0, -2.0], [3.0, 0.0]]) / 3, rtol=1e-15, atol=0
    )
    seq = policy_gradient_loss(logprobs, adv, mask, aggregation="seq_sum")  # 3.5 / B
    assert seq.item() == pytest.approx(3.5 / 2, rel=1e-15)


# --- dtype, modes, validation ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_kept(dtype):
    rewards, baseline, kl, logprobs, mask = _batch(4, [3, 1], 4)
    for kl_mode in KLMode:
        adv = remax_advantages(
            rewards.to(dtype),
            baseline.to(dtype),
            mask,
            kl=kl.to(dtype),
            kl_mode=kl_mode,
            **OFFICIAL,
        )
        assert adv.dtype == dtype
    loss = policy_gradient_loss(logprobs.to(dtype), adv, mask, aggregation="seq_sum")
    assert loss.dtype == dtype


def test_float64_is_not_computed_in_float32():
    # 1 + 1e-12 is not representable in float32; a float32 detour would return exactly 1e-12 → 0
    adv = remax_advantages(_t([1.0 + 1e-12]), _t([1.0]), _prefix_mask([1], 1))
    assert adv.item() == pytest.approx(1e-12, rel=1e-3)


def test_string_and_enum_modes_agree():
    rewards, baseline, kl, _, mask = _batch(5, [4, 2], 4)
    common = dict(kl=kl, kl_coef=0.1, gamma=0.9, reward_clip=1.0)
    modes = dict(kl_mode="reward_to_go", discount_convention="textbook", clip_target="reward")
    as_str = remax_advantages(rewards, baseline, mask, **common, **modes)
    members = dict(
        kl_mode=KLMode.reward_to_go,
        discount_convention=DiscountConvention.textbook,
        clip_target=ClipTarget.reward,
    )
    as_enum = remax_advantages(rewards, baseline, mask, **common, **members)
    assert torch.equal(as_str, as_enum)
    # and the string modes really select something: the defaults give other values
    assert not torch.equal(as_str, remax_advantages(rewards, baseline, mask, **common))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kl_mode="cumulative"), "kl_mode 'cumulative'; valid values: 'own_token', 'reward_"),
        (dict(discount_convention="paper"), "valid values: 'official', 'textbook'"),
        (dict(clip_target="score"), "valid values: 'advantage', 'reward'"),
        (dict(kl_coef=-0.1), "kl_coef must be >= 0, got -0.1"),
        (dict(gamma=0.0), r"gamma must be in \(0, 1\], got 0.0"),
        (dict(gamma=1.5), r"gamma must be in \(0, 1\], got 1.5"),
        (dict(reward_clip=0.0), "reward_clip must be > 0 or None, got 0.0"),
        (dict(reward_clip=-5.0), "reward_clip must be > 0 or None, got -5.0"),
        (dict(kl_coef=0.05), "kl_coef = 0.05 > 0 needs"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        remax_advantages(_t([1.0]), _t([0.0]), _prefix_mask([1], 2), **kwargs)


def test_invalid_aggregation_and_shapes_raise():
    mask = _prefix_mask([1], 2)
    with pytest.raises(ValueError, match="valid values: 'seq_sum', 'token_mean'"):
        policy_gradient_loss(torch.zeros(1, 2), torch.zeros(1, 2), mask, aggregation="mean")
    with pytest.raises(ValueError, match="same"):
        policy_gradient_loss(torch.zeros(1, 3), torch.zeros(1, 2), mask)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        remax_advantages(_t([1.0, 2.0]), _t([0.0]), mask)
    with pytest.raises(ValueError, match="kl"):
        remax_advantages(_t([1.0]), _t([0.0]), mask, kl=torch.zeros(1, 3), kl_coef=0.1)


def test_non_prefix_mask_is_refused():
    left_padded = torch.tensor([[True, True, False], [False, True, True]])
    with pytest.raises(ValueError, match="row 1 is not a prefix"):
        remax_advantages(_t([1.0, 1.0]), _t([0.0, 0.0]), left_padded)


# --- stats ------------------------------------------------------------------------------------


def test_remax_stats_hand_values():
    rewards = _t([3.0, 1.0, -2.0, 0.5])
    baseline = _t([1.0, 1.0, 8.0, 0.0])
    # d = [2, 0, −10, 0.5]; with clip 5: [2, 0, −5, 0.5]
    mask = _prefix_mask([2, 1, 3, 0], 3)
    kl = _t([[0.1, 0.3, 9.0], [0.2, 9.0, 9.0], [-0.1, 0.0, 0.4], [9.0, 9.0, 9.0]])
    adv = remax_advantages(rewards, baseline, mask, kl=kl, kl_coef=0.1, reward_clip=5.0)
    stats = remax_stats(rewards, baseline, mask, adv, kl=kl, reward_clip=5.0)
    assert isinstance(stats, RemaxStats)
    assert all(v.dim() == 0 and not v.requires_grad and v.dtype == f64 for v in stats)
    expected = dict(
        reward_mean=2.5 / 4,
        baseline_mean=10.0 / 4,
        advantage_mean=-7.5 / 4,  # (2 + 0 − 10 + 0.5) / 4, before clipping
        advantage_std=math.sqrt(sum((x + 7.5 / 4) ** 2 for x in (2, 0, -10, 0.5)) / 4),
        clip_frac=0.25,  # only −10 is clipped
        win_frac=0.5,  # 2 and 0.5
        tie_frac=0.25,
        kl_mean=(0.1 + 0.3 + 0.2 - 0.1 + 0.0 + 0.4) / 6,  # six valid tokens
        kl_seq_mean=(0.4 + 0.2 + 0.3 + 0.0) / 4,  # per-row sums, empty row counts 0
        return_mean=adv[mask].mean().item(),
        return_max=adv[mask].max().item(),
        response_length_mean=6 / 4,
        empty_frac=0.25,
    )
    for name, value in expected.items():
        assert getattr(stats, name).item() == pytest.approx(value, rel=1e-13, abs=1e-15), name
    # row 0 is (d = 2) + own-token KL: returns 2 − 0.01 and 2 − 0.03; the max is 1.99
    assert stats.return_max.item() == pytest.approx(1.99, rel=1e-14)


def test_remax_stats_empty_batch_has_no_nan():
    empty = torch.zeros(0, dtype=f64)
    mask = torch.zeros(0, 5, dtype=torch.bool)
    adv = remax_advantages(empty, empty, mask)
    stats = remax_stats(empty, empty, mask, adv, kl=torch.zeros(0, 5, dtype=f64))
    assert all(torch.isfinite(v) and v.item() == 0 for v in stats)


# --- layer boundary ---------------------------------------------------------------------------


def test_algo_layer_imports_only_torch_and_the_standard_library():
    # style.md §2: L0 may import torch only; importing it must not pull in transformers.
    import ast
    import pathlib
    import subprocess
    import sys

    allowed = {
        "torch",
        "remax",
        "__future__",
        "collections",
        "enum",
        "typing",
        "math",
        "dataclasses",
        "importlib",  # __init__'s lazy names (PEP 562): login-node commands skip torch
    }
    algo = pathlib.Path(__file__).resolve().parents[2] / "remax" / "algo"
    for path in sorted(algo.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert roots <= allowed, (path.name, roots - allowed)
    code = "import sys, remax.algo; assert 'transformers' not in sys.modules, 'transformers'"
    subprocess.run([sys.executable, "-c", code], check=True)
