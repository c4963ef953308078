"""The RL trainers' shared conventions (``remax.trainers.conventions``): empty answers and the train
mask, checked on an exactly enumerable bandit where a gradient is concerned (remax-spec §4 row 14).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from remax.algo.logprobs import logprobs_from_logits
from remax.algo.remax import policy_gradient_loss, remax_advantages
from remax.config import EmptyResponse
from remax.rollout import Rollout
from remax.trainers.conventions import rewrite_empty, train_mask

REPO = Path(__file__).resolve().parents[1]
f64 = torch.float64
EOS, PAD, SPACE = 0, 0, 3


def _rollout(rows: list[list[int]], lengths: list[int]) -> Rollout:
    """Responses (right-padded with PAD) with ``lengths`` generated tokens each; one prompt token."""
    T = max(len(r) for r in rows)
    response = torch.tensor([r + [PAD] * (T - len(r)) for r in rows])
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    B = len(rows)
    return Rollout(
        torch.ones(B, 1, dtype=torch.long), torch.ones(B, 1, dtype=torch.bool), response, mask
    )


def _expected_gradient(theta, rewards, mode: EmptyResponse) -> torch.Tensor:
    """E_a[g(a)] over the K arms of a one-token bandit (arm 0 = EOS, an empty answer), each g(a)
    through the trainers' train mask and the library loss, with ReMax's greedy baseline."""
    pi = torch.softmax(theta, 0)
    baseline = rewards[int(theta.argmax())]
    total = torch.zeros_like(theta)
    for a in range(theta.numel()):
        ro = _rollout([[a]], [1])
        mask = train_mask(ro, eos_id=EOS, empty_response=mode, train_on_eos=True)
        t = theta.clone().requires_grad_(True)
        logprobs = logprobs_from_logits(t.reshape(1, 1, -1), ro.response)
        adv = remax_advantages(rewards[a : a + 1], baseline.reshape(1), mask)
        loss = policy_gradient_loss(logprobs, adv, mask, aggregation="seq_sum")
        (grad,) = torch.autograd.grad(loss, t)
        total -= pi[a] * grad
    return total


def test_paper_preset_keeps_empty_answers_and_its_gradient_is_exact():
    # EOS is the best arm, the greedy arm (1) the worst: the exact gradient raises the EOS logit.
    theta = torch.tensor([0.0, 1.0, 0.5], dtype=f64)
    rewards = torch.tensor([1.0, 0.0, 0.5], dtype=f64)
    t = theta.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad((torch.softmax(t, 0) * rewards).sum(), t)
    assert exact[EOS] > 0.05

    paper = yaml.safe_load((REPO / "hydra_conf/algo/remax_paper.yaml").read_text())
    got = _expected_gradient(theta, rewards, EmptyResponse(paper["empty_response"]))
    torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-12)  # one finite sum, float64

    # The masked ablation is biased, with the wrong sign on the EOS logit: the failure it documents.
    # Closed form: only arms a != EOS carry (r(a) − b)·∂log π(a)/∂θ_EOS = −(r(a) − b)·π_EOS.
    masked = _expected_gradient(theta, rewards, EmptyResponse.mask)
    pi, b = torch.softmax(theta, 0), rewards[1]
    torch.testing.assert_close(masked[EOS], -pi[EOS] * (pi[1:] * (rewards[1:] - b)).sum())
    assert masked[EOS] < -0.02


@pytest.mark.parametrize(
    ("max_tokens", "rewritten"),
    [(0, [True, False, False, False]), (1, [True, True, False, True])],
)
def test_space_token_rewrites_answers_as_short_as_the_release_does(max_tokens, rewritten):
    # EOS-first; one token + EOS; two tokens + EOS; one token truncated at T (no EOS)
    ro = _rollout([[EOS, PAD, PAD], [5, EOS, PAD], [5, 6, EOS], [7, PAD, PAD]], [1, 2, 3, 1])
    out = rewrite_empty(
        ro,
        mode=EmptyResponse.space_token,
        max_tokens=max_tokens,
        eos_id=EOS,
        pad_id=PAD,
        space_id=SPACE,
    )
    assert (out.response[:, 0] == SPACE).tolist() == rewritten
    expected_len = [2 if rewritten[0] else 1, 2, 3, 1]
    assert out.lengths.tolist() == expected_len
    if max_tokens == 1:  # " " + EOS where the answer had an EOS; a truncated answer stays unended
        assert out.response[1].tolist() == [SPACE, EOS, PAD]
        assert out.response[3].tolist() == [SPACE, PAD, PAD] and out.response_mask[3].tolist() == [
            True,
            False,
            False,
        ]
    assert out.response[2].tolist() == [5, 6, EOS]


def test_keep_and_mask_leave_the_rollout_untouched():
    ro = _rollout([[EOS, PAD], [5, EOS]], [1, 2])
    for mode in (EmptyResponse.keep, EmptyResponse.mask):
        out = rewrite_empty(ro, mode=mode, max_tokens=1, eos_id=EOS, pad_id=PAD, space_id=SPACE)
        assert out is ro
