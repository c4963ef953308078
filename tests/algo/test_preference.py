"""Bradley-Terry reward-model loss and pairwise accuracy (remax-spec §9 test 24)."""

from __future__ import annotations

import math

import pytest
import torch

from remax.algo.preference import bradley_terry_loss, pairwise_accuracy


def test_identical_pairs_cost_log_2():
    # σ(0) = ½, so −log σ(0) = log 2 whatever the shared score
    scores = torch.tensor([-3.0, 0.0, 7.5], dtype=torch.float64)
    assert bradley_terry_loss(scores, scores.clone()).item() == pytest.approx(
        math.log(2), rel=1e-15
    )


def test_hand_value():
    chosen = torch.tensor([2.0, 0.0], dtype=torch.float64)
    rejected = torch.tensor([0.5, 1.0], dtype=torch.float64)
    # margins 1.5 and −1.0: −log σ(m) = log(1 + e^(−m))
    expected = (math.log1p(math.exp(-1.5)) + math.log1p(math.exp(1.0))) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-14)


def test_gradient_hand_value():
    chosen = torch.tensor([2.0, 0.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([0.5, 1.0], dtype=torch.float64, requires_grad=True)
    bradley_terry_loss(chosen, rejected).backward()
    # d/dc [−log σ(c − r)] = −σ(r − c), averaged over B = 2
    sig = torch.sigmoid(rejected.detach() - chosen.detach())
    torch.testing.assert_close(chosen.grad, -sig / 2, rtol=1e-14, atol=0)
    torch.testing.assert_close(rejected.grad, sig / 2, rtol=1e-14, atol=0)


def test_large_margins_stay_finite():
    chosen = torch.tensor([0.0, 1000.0])
    rejected = torch.tensor([1000.0, 0.0])
    # −log σ(−1000) = 1000 (a naive log(sigmoid) would give inf); −log σ(1000) = 0
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(500.0, rel=1e-6)


def test_accuracy_counts_ties_as_half():
    chosen = torch.tensor([1.0, 2.0, 3.0, 3.0])
    rejected = torch.tensor([0.0, 3.0, 3.0, 1.0])
    # right, wrong, tie, right -> (1 + 0 + 0.5 + 1) / 4
    assert pairwise_accuracy(chosen, rejected).item() == 0.625


def test_empty_batch_and_dtype():
    empty = torch.zeros(0, dtype=torch.float64)
    assert bradley_terry_loss(empty, empty).item() == 0.0
    assert pairwise_accuracy(empty, empty).item() == 0.0
    x = torch.randn(3, dtype=torch.float64)
    assert bradley_terry_loss(x, x * 2).dtype == torch.float64
    assert pairwise_accuracy(x, x * 2).dtype == torch.float64


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"\(B,\)"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))
