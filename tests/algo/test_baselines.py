"""The baseline table (ReMax, RLOO, GRPO, Dr. GRPO, none) and GRPO's loss switches.

Values on hand-computed groups first; then exact expectations on the toy LM of
tests/algo/test_exact_gradient.py (X = 2 prompts, V = 3 tokens, EOS = 0, at most 2 response
tokens: 7 responses per prompt), enumerating every group of k samples (7^k per prompt). The
per-group gradient comes from the library (``sequence_advantages`` → ``token_returns`` →
``policy_gradient_loss`` with ``seq_sum`` → autograd), all groups in one batch: the loss is linear
in the advantages, so scaling group c's advantages by C·P(c) (C groups, P(c) = Π_j π(a_j|x))
makes −∇loss the exact expectation Σ_c P(c)·g(c).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from remax.algo.baselines import GROUP_STD_EPS
from remax.algo.kl import kl_penalty
from remax.algo.logprobs import logprobs_from_logits
from remax.algo.registry import BASELINES, lookup
from remax.algo.remax import (
    policy_gradient_loss,
    remax_advantages,
    sequence_advantages,
    token_returns,
)
from remax.algo.types import Baseline

f64 = torch.float64
# Two float64 evaluations of one finite sum in different orders: a few ulps of the largest term.
EXACT = dict(rtol=1e-10, atol=1e-12)


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=f64)


# --- values --------------------------------------------------------------------------------


def test_each_baseline_on_a_hand_computed_group():
    r = _t([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # B = 2 prompts, k = 3
    greedy = _t([2.0, 1.0])
    call = lambda b, **kw: lookup(BASELINES, b)(rewards=r, k=3, greedy_rewards=greedy, **kw)  # noqa: E731
    torch.testing.assert_close(call("greedy"), _t([-1.0, 0.0, 4.0, -1.0, -1.0, 2.0]))
    # leave-one-out: 1 − (2+6)/2 = −3, 2 − (1+6)/2 = −1.5, 6 − (1+2)/2 = 4.5; 0 − 1.5, 0 − 1.5, 3 − 0
    torch.testing.assert_close(call("leave_one_out"), _t([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    # Dr. GRPO: r − mean (means 3 and 1)
    torch.testing.assert_close(call("group_norm", std_norm=False), _t([-2, -1, 3, -1, -1, 2.0]))
    # GRPO: unbiased std of (1, 2, 6) = √((4 + 1 + 9)/2) = √7; of (0, 0, 3) = √((1 + 1 + 4)/2) = √3
    want = torch.cat(
        [_t([-2, -1, 3]) / (7**0.5 + GROUP_STD_EPS), _t([-1, -1, 2]) / (3**0.5 + 1e-6)]
    )
    torch.testing.assert_close(call("group_norm"), want, rtol=1e-15, atol=0)
    torch.testing.assert_close(call("none"), r)


def test_group_of_equal_rewards_gets_zero_advantage_not_nan():
    r = _t([0.5, 0.5, 0.5, 0.5])
    assert torch.equal(lookup(BASELINES, "group_norm")(rewards=r, k=4, std_norm=True), 0 * r)


@pytest.mark.parametrize("baseline", ["leave_one_out", "group_norm"])
def test_group_baselines_refuse_a_group_of_one(baseline):
    with pytest.raises(ValueError, match="k >= 2"):
        lookup(BASELINES, baseline)(rewards=_t([1.0, 2.0]), k=1, greedy_rewards=None)
    assert Baseline(baseline).min_samples == 2 and not Baseline(baseline).needs_greedy


def test_greedy_needs_the_greedy_rewards():
    with pytest.raises(ValueError, match="greedy_rewards"):
        lookup(BASELINES, "greedy")(rewards=_t([1.0, 2.0]), k=2, greedy_rewards=None)
    assert Baseline.greedy.needs_greedy


@pytest.mark.parametrize("clip_target", ["advantage", "reward"])
def test_greedy_sequence_advantages_equal_the_remax_path(clip_target):
    # The table path and remax_advantages (the release's clip conventions) agree token for token.
    g = torch.Generator().manual_seed(0)
    r, greedy = (
        4 * torch.randn(6, generator=g, dtype=f64),
        4 * torch.randn(3, generator=g, dtype=f64),
    )
    mask = torch.tensor([[1, 1, 0]] * 6, dtype=torch.bool)
    kw = dict(reward_clip=2.0, clip_target=clip_target)
    seq = sequence_advantages(r, greedy, k=2, baseline="greedy", **kw)
    old = remax_advantages(r, greedy.repeat_interleave(2), mask, gamma=0.9, **kw)
    torch.testing.assert_close(token_returns(seq.advantages, mask, gamma=0.9), old, **EXACT)
    assert (seq.raw != seq.advantages).any()  # the clip acted: the comparison has teeth


# --- exact expectations on the toy LM ------------------------------------------------------

X, V, EOS = 2, 3, 0
RESPONSES = [(EOS,)] + [(a1, a2) for a1 in range(1, V) for a2 in range(V)]  # 7 per prompt
N_THETA = X * V + X * V * V
TOKENS = torch.tensor([list(r) + [EOS] * (2 - len(r)) for r in RESPONSES])  # (7, 2) right-padded
MASK = torch.tensor([[i < len(r) for i in range(2)] for r in RESPONSES])  # (7, 2)


def toy_logits(theta: torch.Tensor, x: int, tokens: torch.Tensor) -> torch.Tensor:
    """(N, 2, V): position 0 scores a₁ for prompt x, position 1 scores a₂ given a₁."""
    first = theta[: X * V].reshape(X, V)[x].expand(tokens.shape[0], V)
    second = theta[X * V :].reshape(X, V, V)[x, tokens[:, 0]]
    return torch.stack([first, second], dim=1)


def response_probs(theta: torch.Tensor, x: int) -> torch.Tensor:
    """(7,) π(a|x) of every response, in plain torch."""
    lp = torch.log_softmax(toy_logits(theta, x, TOKENS), -1).gather(-1, TOKENS[..., None])[..., 0]
    return torch.where(MASK, lp, 0.0).sum(1).exp()


def expected_reward(theta, rewards, ref_probs=None):
    """mean_x E_{a~π(·|x)}[r(x, a)]; with ``ref_probs`` (X, 7): E_{a~π, b~π_ref}[w(a, b)] where
    ``rewards`` is the (X, 7, 7) table w."""
    total = theta.new_zeros(())
    for x in range(X):
        p = response_probs(theta, x)
        total = total + (p @ rewards[x] if ref_probs is None else p @ rewards[x] @ ref_probs[x])
    return total / X


def expected_group_gradient(theta, rewards, k, baseline, greedy=None, std_norm=True):
    """mean_x Σ over all 7^k groups of P(group)·g(group), g from the library (module docstring)."""
    total = torch.zeros_like(theta)
    for x in range(X):
        groups = torch.tensor(list(itertools.product(range(len(RESPONSES)), repeat=k)))  # (C, k)
        rows = groups.reshape(-1)  # group-major, as repeat_interleave(k)
        probs = response_probs(theta, x).detach()
        weight = probs[groups].prod(1) * groups.shape[0]  # (C,) C·P(group)
        seq = sequence_advantages(
            rewards[x, rows],
            None if greedy is None else greedy[x].expand(groups.shape[0]),
            k=k,
            baseline=baseline,
            std_norm=std_norm,
        )
        t = theta.detach().requires_grad_(True)
        logprobs = logprobs_from_logits(toy_logits(t, x, TOKENS[rows]), TOKENS[rows])
        returns = token_returns(seq.advantages * weight.repeat_interleave(k), MASK[rows])
        loss = policy_gradient_loss(logprobs, returns, MASK[rows], aggregation="seq_sum")
        (grad,) = torch.autograd.grad(loss, t)
        total -= grad
    return total / X


def _toy(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N_THETA, generator=g, dtype=f64), torch.randn(X, 7, generator=g, dtype=f64)


def _grad(fn, theta):
    t = theta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(t), t)
    return grad


def _greedy_rewards(theta, rewards) -> torch.Tensor:
    """(X,) r(x, ā) of each prompt's greedy response."""
    out = []
    for x in range(X):
        a1 = int(theta[: X * V].reshape(X, V)[x].argmax())
        resp = (EOS,) if a1 == EOS else (a1, int(theta[X * V :].reshape(X, V, V)[x, a1].argmax()))
        out.append(rewards[x, RESPONSES.index(resp)])
    return torch.stack(out)


@pytest.mark.parametrize("k", [2, 3])
def test_rloo_and_remax_are_unbiased_and_dr_grpo_is_unbiased_up_to_k_minus_1_over_k(k):
    theta, rewards = _toy(0)
    exact = _grad(lambda t: expected_reward(t, rewards), theta)  # ∇ mean_x E[r]
    assert exact.abs().max() > 1e-2  # a non-trivial gradient, so the equalities mean something
    rloo = expected_group_gradient(theta, rewards, k, "leave_one_out")
    torch.testing.assert_close(rloo, exact, **EXACT)
    remax = expected_group_gradient(theta, rewards, k, "greedy", _greedy_rewards(theta, rewards))
    torch.testing.assert_close(remax, exact, **EXACT)
    # Dr. GRPO's r − mean = (k − 1)/k · (r − leave-one-out mean): (k − 1)/k of ∇E[r], exactly.
    dr = expected_group_gradient(theta, rewards, k, "group_norm", std_norm=False)
    torch.testing.assert_close(dr, (k - 1) / k * exact, **EXACT)
    assert (dr - exact).abs().max() > 0.1 * exact.abs().max()  # the factor is not 1


def test_grpo_std_normalisation_is_biased_beyond_any_per_prompt_step_size():
    # θ's first-token and second-token logits of prompt x move prompt x's answers only, so a
    # per-prompt positive scale of ∇E[r] is a multiple of it on each prompt's block. GRPO's expected
    # gradient is none: the std depends on the sample it divides. Residual of the best multiple c:
    # ‖g − c·∇‖/‖g‖ (c by least squares). Measured at seed 0, k = 3: 0.14 and 0.31 on the two
    # prompts; Dr. GRPO (no std), a multiple by (k − 1)/k, leaves ~1e-16.
    theta, rewards = _toy(0)
    exact = _grad(lambda t: expected_reward(t, rewards), theta)
    grpo = expected_group_gradient(theta, rewards, 3, "group_norm")
    dr = expected_group_gradient(theta, rewards, 3, "group_norm", std_norm=False)
    for x in range(X):
        block = torch.cat(
            [torch.arange(x * V, (x + 1) * V), X * V + torch.arange(x * 9, x * 9 + 9)]
        )
        e = exact[block]
        for g, biased in ((grpo[block], True), (dr[block], False)):
            c = (g @ e) / (e @ e)
            residual = float((g - c * e).norm() / g.norm())
            assert c > 0  # still an ascent direction on average
            assert (residual > 0.1) if biased else (residual < 1e-12), (x, biased, residual)


def test_grpo_with_two_samples_ascends_the_win_rate_against_its_current_self():
    # k = 2, derived: mean = (r₁ + r₂)/2, unbiased std = |r₁ − r₂|/√2, so sample 1's advantage is
    # w(a₁, a₂) = ((r₁ − r₂)/2)/(|r₁ − r₂|/√2 + ε) ≈ sign(r₁ − r₂)/√2. By symmetry of the two
    # samples, E[g] = E_{a,b~π}[w(a, b)·∇log π(a)] = ∇_θ E_{a~π_θ, b~π_θ0}[w(a, b)] at θ = θ0: the
    # gradient of the (ε-softened) win margin against a frozen copy of the current policy, not of
    # E[r] — the known bias: only the reward ranking inside the group matters.
    theta, rewards = _toy(1)
    diff = rewards[:, :, None] - rewards[:, None, :]  # (X, 7, 7) r_a − r_b
    win = (diff / 2) / (diff.abs() / math.sqrt(2) + GROUP_STD_EPS)
    frozen = torch.stack([response_probs(theta, x) for x in range(X)]).detach()
    target = _grad(lambda t: expected_reward(t, win, frozen), theta)
    grpo = expected_group_gradient(theta, rewards, 2, "group_norm")
    torch.testing.assert_close(grpo, target, **EXACT)
    exact = _grad(lambda t: expected_reward(t, rewards), theta)
    assert (grpo - exact).abs().max() > 0.1 * exact.abs().max()


# --- GRPO's loss switches ------------------------------------------------------------------


def _one_token_loss(theta, old, advantage, clip_ratio):
    t = theta.detach().requires_grad_(True)
    tokens, mask = torch.tensor([[2]]), torch.ones(1, 1, dtype=torch.bool)
    logprobs = logprobs_from_logits(t.reshape(1, 1, -1), tokens)
    adv = torch.full((1, 1), advantage, dtype=f64)
    old_lp = logprobs.detach() + old
    loss = policy_gradient_loss(
        logprobs, adv, mask, aggregation="seq_sum", old_logprobs=old_lp, clip_ratio=clip_ratio
    )
    (grad,) = torch.autograd.grad(loss, t)
    return grad


def test_clipped_ratio_is_reinforce_on_policy_and_clips_off_policy():
    theta = _t([0.3, -0.2, 0.5])
    plain = _one_token_loss(theta, 0.0, 1.5, None)
    assert plain.abs().max() > 0.1
    # π_old = π (one on-policy update): ρ = 1, the same gradient as −A·log π
    torch.testing.assert_close(_one_token_loss(theta, 0.0, 1.5, 0.2), plain, **EXACT)
    # ρ = e^0.5 ≈ 1.65 > 1.2 with A > 0: clipped, no gradient; with A < 0 the unclipped ρ·A wins
    assert torch.equal(_one_token_loss(theta, -0.5, 1.5, 0.2), torch.zeros(3, dtype=f64))
    ratio = math.exp(0.5)
    torch.testing.assert_close(
        _one_token_loss(theta, -0.5, -1.5, 0.2), -ratio * plain, **EXACT
    )  # ∇(−A·ρ) = −A·ρ·∇log π, and plain is −1.5·∇log π


def test_k3_in_the_loss_has_the_gradient_of_the_reverse_kl():
    # One token a ~ π: ∇k3 = (1 − π_ref/π)·∇log π, so E_π[∇k3] = −Σ_a π_ref(a)∇log π(a)
    # = ∇KL(π_ref ‖ π) — the KL with the arguments swapped, which k3 in the reward (a score-function
    # term) would not give. β scales it.
    theta, ref = _t([0.3, -0.2, 0.5, 1.0]), _t([-0.4, 0.1, 0.0, 0.2])
    beta, K = 0.04, 4
    t = theta.clone().requires_grad_(True)
    tokens = torch.arange(K)[:, None]  # every token once, (K, 1)
    logprobs = logprobs_from_logits(t.expand(K, 1, K), tokens)
    ref_lp = logprobs_from_logits(ref.expand(K, 1, K), tokens)
    kl = kl_penalty(logprobs, ref_lp, "k3")  # (K, 1) with grad
    probs = torch.softmax(theta, 0).reshape(K, 1)
    mask = torch.ones(K, 1, dtype=torch.bool)
    zero = torch.zeros(K, 1, dtype=f64)
    # seq_sum divides by K rows: weights K·π(a) make the loss the exact expectation over a
    loss = policy_gradient_loss(
        logprobs, zero, mask, aggregation="seq_sum", kl_loss=kl * probs * K, kl_loss_coef=beta
    )
    (grad,) = torch.autograd.grad(loss, t)
    ref_p = torch.softmax(ref, 0)
    reverse = _grad(lambda th: (ref_p * (ref_p.log() - torch.log_softmax(th, 0))).sum(), theta)
    torch.testing.assert_close(grad, beta * reverse, **EXACT)
    forward = _grad(
        lambda th: (torch.softmax(th, 0) * (torch.log_softmax(th, 0) - ref_p.log())).sum(), theta
    )
    assert (grad - beta * forward).abs().max() > 1e-3
