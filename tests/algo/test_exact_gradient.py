"""Exact-gradient tests of the ReMax estimator (remax-spec §9 tests 1-5 and 8; preset remax_paper).

Two models small enough to enumerate every response, in plain torch and float64:

- a softmax bandit: one token from K arms, π = softmax(θ);
- a toy LM over V = 3 tokens with EOS = 0 and at most 2 response tokens, for X = 2 prompts:
  θ holds the first-token logits (X, V) and the second-token logits (X, V, V) given the first.
  A response is (EOS), or (a₁, a₂) with a₁ ≠ EOS (a₂ may be EOS; 2 tokens is the truncation
  point), so 7 responses per prompt with lengths 1 and 2 and right padding.

The per-sample gradient g(a) always comes from the library (``logprobs_from_logits`` →
``remax_advantages`` → ``policy_gradient_loss`` → autograd); expectations are finite sums over the
enumerated responses, so "unbiased" is checked as an equality, not statistically.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from remax.algo.kl import kl_penalty
from remax.algo.logprobs import logprobs_from_logits
from remax.algo.remax import policy_gradient_loss, remax_advantages

f64 = torch.float64

# Central differences with h = 1e-5 in float64: truncation error h²·|J'''|/6 ~ 1e-11 and rounding
# eps·|J|/h ~ 1e-11, against gradient entries of order 0.01-0.1. rtol 1e-6 (tighter than the
# spec's 1e-4) with atol 1e-9 still leaves a 100× margin.
FD_STEP, FD_RTOL, FD_ATOL = 1e-5, 1e-6, 1e-9
# Two float64 evaluations of one finite sum in different orders: a few ulps of the largest term.
EXACT = dict(rtol=1e-10, atol=1e-12)


def central_difference(fn, theta: torch.Tensor) -> torch.Tensor:
    grad = torch.empty_like(theta)
    for i in range(theta.numel()):
        step = torch.zeros_like(theta)
        step[i] = FD_STEP
        grad[i] = (fn(theta + step) - fn(theta - step)) / (2 * FD_STEP)
    return grad


def library_gradient(
    theta: torch.Tensor,
    logits_fn,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    reward: float,
    baseline_reward: float | torch.Tensor,
    *,
    ref_theta: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_mode: str = "own_token",
    aggregation: str = "seq_sum",
) -> torch.Tensor:
    """g = −∇_θ loss for one sampled response (B = 1), entirely through the library."""
    theta = theta.detach().requires_grad_(True)
    logprobs = logprobs_from_logits(logits_fn(theta), tokens)  # (1, T), with grad
    kl = None
    if kl_coef:
        ref_logprobs = logprobs_from_logits(logits_fn(ref_theta), tokens)
        kl = kl_penalty(logprobs, ref_logprobs, "k1")  # still attached: must be detached inside
    if not isinstance(baseline_reward, torch.Tensor):
        baseline_reward = torch.tensor([baseline_reward], dtype=f64)
    advantages = remax_advantages(
        torch.tensor([reward], dtype=f64),
        baseline_reward,
        mask,
        kl=kl,
        kl_coef=kl_coef,
        gamma=1.0,
        kl_mode=kl_mode,
    )
    loss = policy_gradient_loss(logprobs, advantages, mask, aggregation=aggregation)
    (grad,) = torch.autograd.grad(loss, theta)
    return -grad


# --- softmax bandit -------------------------------------------------------------------------


def bandit_logits(theta: torch.Tensor) -> torch.Tensor:
    return theta.reshape(1, 1, -1)  # (B=1, T=1, V=K)


def bandit_arm_gradients(theta: torch.Tensor, rewards: torch.Tensor, baseline: float):
    """(K, K): row a is the library's g(a) = (r(a) − b)·∇log π(a)."""
    K = theta.numel()
    one = torch.ones(1, 1, dtype=torch.bool)
    return torch.stack(
        [
            library_gradient(
                theta, bandit_logits, torch.tensor([[a]]), one, rewards[a].item(), baseline
            )
            for a in range(K)
        ]
    )


def bandit_objective(theta: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    return (torch.softmax(theta, 0) * rewards).sum()  # E_a[r(a)]


def _bandit(seed: int, K: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(K, generator=g, dtype=f64), torch.randn(K, generator=g, dtype=f64)


def test_bandit_unbiased_equals_autograd_and_finite_difference():
    theta, rewards = _bandit(0)
    pi = torch.softmax(theta, 0)
    greedy = int(theta.argmax())
    expected_g = pi @ bandit_arm_gradients(theta, rewards, rewards[greedy].item())  # E_a[g(a)]

    t = theta.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(bandit_objective(t, rewards), t)
    fd = central_difference(lambda th: bandit_objective(th, rewards), theta)
    torch.testing.assert_close(expected_g, exact, **EXACT)
    torch.testing.assert_close(expected_g, fd, rtol=FD_RTOL, atol=FD_ATOL)
    assert exact.abs().max() > 1e-2  # a non-trivial gradient, so the comparisons mean something

    # any constant baseline leaves the expectation unchanged: E[b·∇log π] = b·∇Σπ = 0
    for constant in (0.0, 3.7, -100.0, rewards.min().item()):
        torch.testing.assert_close(
            pi @ bandit_arm_gradients(theta, rewards, constant), exact, rtol=1e-10, atol=1e-11
        )
    # ... but a baseline that depends on the sampled arm does not (the test can fail)
    K = theta.numel()
    one = torch.ones(1, 1, dtype=torch.bool)
    biased = sum(
        pi[a]
        * library_gradient(
            theta, bandit_logits, torch.tensor([[a]]), one, rewards[a].item(), rewards[a].item() / 2
        )
        for a in range(K)
    )
    assert not torch.allclose(biased, exact, rtol=1e-3, atol=1e-6)


def test_bandit_monte_carlo_converges_at_one_over_sqrt_n():
    # Test 3: the mean of N sampled gradients approaches the exact gradient within z·σ/√N, σ the
    # empirical per-coordinate standard deviation. z = 4: a two-sided 4σ band (p ≈ 6e-5 per
    # coordinate) for a CLT-sized mean; the seeds are fixed, so the test is deterministic.
    theta, rewards = _bandit(1)
    K = theta.numel()
    pi = torch.softmax(theta, 0)
    greedy = int(theta.argmax())
    arm_grads = bandit_arm_gradients(theta, rewards, rewards[greedy].item())  # (K, K)
    exact = pi @ arm_grads

    for n, seed in ((1_000, 10), (10_000, 11), (100_000, 12)):
        arms = torch.multinomial(
            pi, n, replacement=True, generator=torch.Generator().manual_seed(seed)
        )
        samples = arm_grads[arms]  # (n, K) per-sample gradients
        mean, std = samples.mean(0), samples.std(0)
        assert ((mean - exact).abs() <= 4 * std / n**0.5).all(), n

        # the batched library path over the n samples (seq_sum: mean over sequences) agrees
        t = theta.clone().requires_grad_(True)
        logits = t.expand(n, 1, K)  # (n, 1, K)
        logprobs = logprobs_from_logits(logits, arms[:, None])
        mask = torch.ones(n, 1, dtype=torch.bool)
        adv = remax_advantages(rewards[arms], rewards[greedy].expand(n), mask)
        (grad,) = torch.autograd.grad(
            policy_gradient_loss(logprobs, adv, mask, aggregation="seq_sum"), t
        )
        torch.testing.assert_close(-grad, mean, **EXACT)

    # the band has teeth: a sample-dependent baseline b = r(a)/2 halves the expected gradient,
    # which is far outside the band at n = 100 000
    biased_mean = (arm_grads[arms] / 2).mean(0)  # (r − r/2)∇log π = ½ of the unbiased g
    assert ((biased_mean - exact).abs() > 4 * std / n**0.5).any()


def _variance(theta: torch.Tensor, rewards: torch.Tensor, baseline: float) -> float:
    """Exact total variance E‖g‖² − ‖E g‖² of the single-sample estimator."""
    pi = torch.softmax(theta, 0)
    grads = bandit_arm_gradients(theta, rewards, baseline)
    mean = pi @ grads
    return float(pi @ grads.square().sum(1) - mean.square().sum())


@pytest.mark.parametrize(
    ("theta0", "remax_lower"),
    [
        # optimal arm not dominant (π* ≈ 0.36, 0.45, 0.58): the greedy baseline helps
        (0.1, True),
        (0.5, True),
        (1.0, True),
        # documented counter-case: once π* ≳ 0.65 the variance is larger than vanilla REINFORCE
        # (π* ≈ 0.79, 0.91, 0.99). Then the greedy reward is the best reward, every non-optimal
        # sample gets a large negative advantage, and vanilla's implicit baseline 0 is closer to
        # the ∇log π-weighted mean reward. The paper's argument: RLHF should not saturate the RM.
        (2.0, False),
        (3.0, False),
        (5.0, False),
    ],
)
def test_bandit_variance_regime(theta0, remax_lower):
    # Test 4: with baseline b, Var(b) − Var(0) = b² E‖s‖² − 2b E[r‖s‖²] (s = ∇log π), so the greedy
    # baseline b = r* helps iff r* < 2·E[r‖s‖²]/E‖s‖². Rewards chosen so that this flips with π*.
    rewards = torch.tensor([1.0, 0.4, 0.3], dtype=f64)
    theta = torch.tensor([theta0, 0.0, 0.0], dtype=f64)  # greedy arm = optimal arm 0
    remax = _variance(theta, rewards, rewards[0].item())
    vanilla = _variance(theta, rewards, 0.0)  # Baseline.none: baseline_rewards = 0
    assert (remax < vanilla) is remax_lower, (remax, vanilla)


# --- toy LM ---------------------------------------------------------------------------------

X, V, EOS = 2, 3, 0
RESPONSES = [(EOS,)] + [(a1, a2) for a1 in range(1, V) for a2 in range(V)]  # 7 per prompt
N_THETA = X * V + X * V * V


def toy_logits(theta: torch.Tensor, x: int, tokens: torch.Tensor) -> torch.Tensor:
    """(1, 2, V) logits for prompt x: position 0 scores a₁, position 1 scores a₂ given a₁."""
    first = theta[: X * V].reshape(X, V)
    second = theta[X * V :].reshape(X, V, V)
    return torch.stack([first[x], second[x, tokens[0, 0]]])[None]


def encode(response: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens (pad = EOS, as in the release) and the (1, 2) response mask."""
    tokens = torch.tensor([list(response) + [EOS] * (2 - len(response))])
    mask = torch.tensor([[i < len(response) for i in range(2)]])
    return tokens, mask


def sequence_logprob(theta: torch.Tensor, x: int, response: tuple[int, ...]) -> torch.Tensor:
    """log π(a|x) in plain torch, independent of the library."""
    first = torch.log_softmax(theta[: X * V].reshape(X, V)[x], 0)
    lp = first[response[0]]
    if len(response) == 2:
        lp = lp + torch.log_softmax(theta[X * V :].reshape(X, V, V)[x, response[0]], 0)[response[1]]
    return lp


def greedy_response(theta: torch.Tensor, x: int) -> tuple[int, ...]:
    a1 = int(theta[: X * V].reshape(X, V)[x].argmax())
    if a1 == EOS:
        return (EOS,)
    return (a1, int(theta[X * V :].reshape(X, V, V)[x, a1].argmax()))


def lm_objective(theta, rewards, ref_theta=None, kl_coef=0.0):
    """Exact mean_x E_{a~π(·|x)}[r(x, a)] − β·KL(π(·|x) ‖ π_ref(·|x)) over whole responses."""
    total = theta.new_zeros(())
    for x, (k, resp) in itertools.product(range(X), enumerate(RESPONSES)):
        lp = sequence_logprob(theta, x, resp)
        value = rewards[x, k]
        if kl_coef:
            value = value - kl_coef * (lp - sequence_logprob(ref_theta, x, resp))
        total = total + lp.exp() * value
    return total / X


def expected_library_gradient(theta, rewards, baseline_fn, **kwargs):
    """mean_x Σ_a π(a|x)·g(x, a) with g from the library; baseline_fn(x) gives r(x, ā)."""
    total = torch.zeros_like(theta)
    for x, (k, resp) in itertools.product(range(X), enumerate(RESPONSES)):
        tokens, mask = encode(resp)
        g = library_gradient(
            theta,
            lambda th, x=x, tokens=tokens: toy_logits(th, x, tokens),
            tokens,
            mask,
            rewards[x, k].item(),
            baseline_fn(x),
            **kwargs,
        )
        total += sequence_logprob(theta, x, resp).exp().detach() * g
    return total / X


def _toy(seed: int):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(N_THETA, generator=g, dtype=f64)
    rewards = torch.randn(X, len(RESPONSES), generator=g, dtype=f64)
    ref_theta = theta + 0.5 * torch.randn(N_THETA, generator=g, dtype=f64)
    return theta, rewards, ref_theta


def _greedy_baseline(theta, rewards):
    return lambda x: rewards[x, RESPONSES.index(greedy_response(theta, x))].item()


def _autograd(fn, theta):
    t = theta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(t), t)
    return grad


def test_toy_lm_unbiased_equals_autograd_and_finite_difference():
    theta, rewards, _ = _toy(0)
    # one prompt's greedy response is EOS alone, the other's has two tokens: both shapes occur
    assert sorted(len(greedy_response(theta, x)) for x in range(X)) == [1, 2]
    expected_g = expected_library_gradient(theta, rewards, _greedy_baseline(theta, rewards))
    exact = _autograd(lambda t: lm_objective(t, rewards), theta)
    fd = central_difference(lambda t: lm_objective(t, rewards), theta)
    torch.testing.assert_close(expected_g, exact, **EXACT)
    torch.testing.assert_close(expected_g, fd, rtol=FD_RTOL, atol=FD_ATOL)
    assert exact.abs().max() > 1e-2
    # any constant (per-prompt) baseline gives the same expectation
    for constants in ((0.0, 0.0), (2.5, -7.0)):
        other = expected_library_gradient(theta, rewards, lambda x, c=constants: c[x])
        torch.testing.assert_close(other, exact, **EXACT)


def test_toy_lm_sample_equal_to_greedy_has_exactly_zero_gradient():
    # Test 1 on a real model: the greedy response as the sample gives d = 0 and g = 0 exactly.
    theta, rewards, _ = _toy(0)
    for x in range(X):
        resp = greedy_response(theta, x)
        tokens, mask = encode(resp)
        r = rewards[x, RESPONSES.index(resp)].item()
        logits_fn = lambda th, x=x, tokens=tokens: toy_logits(th, x, tokens)  # noqa: E731
        g = library_gradient(theta, logits_fn, tokens, mask, r, r)
        assert (g == 0).all()


def test_toy_lm_baseline_path_carries_no_gradient():
    # Test 5: the greedy reward computed *with* a graph back to θ, through log π(ā) (value
    # unchanged: r(ā)·exp(lp − lp.detach()) = r(ā)). The parameter gradient must equal the one with
    # a plain float baseline; without the detach it would gain a r(ā)·∇log π(ā)-sized term.
    theta, rewards, _ = _toy(0)
    x = 1
    resp = RESPONSES[4]
    tokens, mask = encode(resp)
    greedy = greedy_response(theta, x)
    r_greedy = rewards[x, RESPONSES.index(greedy)].item()
    plain = library_gradient(
        theta, lambda th: toy_logits(th, x, tokens), tokens, mask, rewards[x, 4].item(), r_greedy
    )

    t = theta.clone().requires_grad_(True)
    lp_greedy = sequence_logprob(t, x, greedy)
    attached = (r_greedy * torch.exp(lp_greedy - lp_greedy.detach())).reshape(1)  # (1,), has grad
    logprobs = logprobs_from_logits(toy_logits(t, x, tokens), tokens)
    adv = remax_advantages(rewards[x, 4].reshape(1), attached, mask)
    (grad,) = torch.autograd.grad(
        policy_gradient_loss(logprobs, adv, mask, aggregation="seq_sum"), t
    )
    assert torch.equal(-grad, plain)
    # the attached baseline really has a path to θ, so the detach is what the test checks
    (leak,) = torch.autograd.grad(attached.sum(), t)
    assert leak.abs().max() > 1e-3


def test_toy_lm_one_small_step_improves_expected_reward():
    # Test 8: θ' = θ + lr·E[g] (a gradient-descent step on the expected loss) raises exact E[r].
    theta, rewards, _ = _toy(2)
    grad = expected_library_gradient(theta, rewards, _greedy_baseline(theta, rewards))
    before = lm_objective(theta, rewards).item()
    lr = 0.1
    after = lm_objective(theta + lr * grad, rewards).item()
    # first order: the gain is lr·‖∇J‖² (1 + O(lr)); the second-order term is far smaller here
    assert after - before > 0.5 * lr * grad.square().sum().item() > 0
    assert lm_objective(theta - lr * grad, rewards).item() < before  # and the sign is meaningful


def test_toy_lm_kl_reward_to_go_is_the_exact_gradient_of_the_regularised_objective():
    # Test 8 with β > 0. With γ = 1 and reward-to-go KL, E[g] is exactly ∇(E[r] − β·KL): the KL
    # terms of earlier tokens have zero expected score, and E[∇ of the detached estimate] = 0.
    theta, rewards, ref_theta = _toy(3)
    beta = 0.3
    kwargs = dict(ref_theta=ref_theta, kl_coef=beta)
    baseline = _greedy_baseline(theta, rewards)
    to_go = expected_library_gradient(theta, rewards, baseline, kl_mode="reward_to_go", **kwargs)

    def regularised(t):
        return lm_objective(t, rewards, ref_theta, beta)

    exact = _autograd(regularised, theta)
    torch.testing.assert_close(to_go, exact, **EXACT)
    torch.testing.assert_close(
        to_go, central_difference(regularised, theta), rtol=FD_RTOL, atol=FD_ATOL
    )
    before = regularised(theta).item()
    assert regularised(theta + 0.1 * to_go).item() > before

    # the release's own-token KL drops the later tokens' KL from each return: it is a different
    # (biased) update for this objective; documented departure 1 of remax/algo/remax.py
    own = expected_library_gradient(theta, rewards, baseline, kl_mode="own_token", **kwargs)
    assert (own - exact).abs().max() > 1e-4


def test_toy_lm_token_mean_is_not_unbiased_with_unequal_lengths():
    # Departure 4 of remax/algo/remax.py: at one sequence per micro-batch, token_mean divides each
    # sample's gradient by its own length (1 or 2 here), so the expected update is not ∇E[r].
    theta, rewards, _ = _toy(0)
    baseline = _greedy_baseline(theta, rewards)
    exact = _autograd(lambda t: lm_objective(t, rewards), theta)
    token_mean = expected_library_gradient(theta, rewards, baseline, aggregation="token_mean")
    assert (token_mean - exact).abs().max() > 1e-3
