"""Per-token KL estimators and the exact full-vocabulary KL (remax/algo/kl.py).

The unbiasedness checks are exact: with the vocabulary enumerated, E_{a~π}[k(a)] is a finite sum,
so k1 and k3 must reproduce full_vocab_kl to float64 rounding and k2 must not.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from remax.algo import KL_ESTIMATORS, lookup
from remax.algo.kl import full_vocab_kl, kl_penalty
from remax.algo.logprobs import logprobs_from_logits
from remax.algo.types import KLEstimator


def test_hand_values():
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    ref = torch.tensor([[-2.0, -1.0]], dtype=torch.float64)
    # ℓ = logp − ref = [1, −1]
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([[1.0, -1.0]]).double())
    # k2 = ½ℓ² = [0.5, 0.5]
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([[0.5, 0.5]]).double())
    # k3 = exp(−ℓ) − (−ℓ) − 1: ℓ = 1 -> e⁻¹ + 1 − 1 = e⁻¹; ℓ = −1 -> e − 1 − 1 = e − 2
    expected = torch.tensor([[math.exp(-1.0), math.e - 2.0]], dtype=torch.float64)
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_zero_when_policy_equals_reference(estimator):
    # Test 9: at initialisation the policy and the reference are two copies of one model; their
    # log-probs are computed separately but are bit-identical, so every penalty is exactly 0.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 9, generator=g)
    tokens = torch.randint(9, (3, 5), generator=g)
    logp = logprobs_from_logits(logits, tokens)
    ref = logprobs_from_logits(logits.clone(), tokens)
    assert (kl_penalty(logp, ref, estimator) == 0).all()


def test_full_vocab_zero_for_identical_logits_and_nonnegative():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 13, generator=g)
    assert (full_vocab_kl(logits, logits.clone()) == 0).all()
    other = torch.randn(2, 4, 13, generator=g)
    assert (full_vocab_kl(logits, other) > 0).all()


def test_full_vocab_matches_definition_and_torch_kl_div():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    ref_logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    q = torch.softmax(ref_logits, -1)
    by_hand = (p * (p.log() - q.log())).sum(-1)
    torch_kl = F.kl_div(q.log(), p.log(), reduction="none", log_target=True).sum(-1)
    got = full_vocab_kl(logits, ref_logits)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, by_hand, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(got, torch_kl, rtol=1e-13, atol=1e-15)


def test_k1_and_k3_are_unbiased_k2_is_not():
    g = torch.Generator().manual_seed(3)
    V = 10
    logits = torch.randn(1, 1, V, generator=g, dtype=torch.float64)
    ref_logits = logits + 0.8 * torch.randn(1, 1, V, generator=g, dtype=torch.float64)
    logp = torch.log_softmax(logits, -1).reshape(1, V)  # every token a as one column
    ref = torch.log_softmax(ref_logits, -1).reshape(1, V)
    p = logp.exp()
    exact = full_vocab_kl(logits, ref_logits).item()
    for estimator in ("k1", "k3"):
        expectation = (p * kl_penalty(logp, ref, estimator)).sum().item()
        assert expectation == pytest.approx(exact, rel=1e-12)  # a 10-term float64 sum
    biased = (p * kl_penalty(logp, ref, "k2")).sum().item()
    assert abs(biased - exact) > 1e-3 * exact


def test_nonnegative_estimators():
    g = torch.Generator().manual_seed(4)
    logp = torch.randn(4, 6, generator=g, dtype=torch.float64)
    ref = torch.randn(4, 6, generator=g, dtype=torch.float64)
    assert (kl_penalty(logp, ref, "k1") < 0).any()  # k1 alone can be negative
    assert (kl_penalty(logp, ref, "k2") >= 0).all()
    assert (kl_penalty(logp, ref, "k3") >= 0).all()


def test_k3_is_accurate_for_tiny_log_ratios():
    # exp(x) − x − 1 cancels catastrophically near 0; k3 ≈ ℓ²/2 there.
    lr = torch.tensor([[1e-6]], dtype=torch.float32)
    got = kl_penalty(lr, torch.zeros_like(lr), "k3").item()
    assert got == pytest.approx(0.5e-12, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_kept(dtype):
    x = torch.randn(2, 3, dtype=dtype)
    for estimator in ("k1", "k2", "k3"):
        assert kl_penalty(x, x * 0.5, estimator).dtype == dtype


def test_string_and_enum_modes_agree_and_unknown_raises():
    x = torch.randn(2, 3, dtype=torch.float64)
    y = torch.randn(2, 3, dtype=torch.float64)
    for member in (KLEstimator.k1, KLEstimator.k2, KLEstimator.k3):
        assert torch.equal(kl_penalty(x, y, member), kl_penalty(x, y, member.value))
    with pytest.raises(ValueError, match="'k1', 'k2', 'k3', 'full_vocab'"):
        kl_penalty(x, y, "k4")
    with pytest.raises(ValueError, match="full_vocab_kl"):
        kl_penalty(x, y, "full_vocab")


def test_registry_has_uniform_signature():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    ref_logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    tokens = torch.randint(5, (2, 3), generator=g)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    ref = torch.log_softmax(ref_logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert set(KL_ESTIMATORS) == set(KLEstimator)
    kwargs = dict(logprobs=logp, ref_logprobs=ref, logits=logits, ref_logits=ref_logits)
    for member in KLEstimator:
        out = lookup(KL_ESTIMATORS, member.value)(**kwargs)
        assert out.shape == (2, 3)
    torch.testing.assert_close(
        lookup(KL_ESTIMATORS, "full_vocab")(**kwargs), full_vocab_kl(logits, ref_logits)
    )
    torch.testing.assert_close(lookup(KL_ESTIMATORS, "k3")(**kwargs), kl_penalty(logp, ref, "k3"))
    with pytest.raises(ValueError, match="needs logits"):
        lookup(KL_ESTIMATORS, "full_vocab")(logprobs=logp, ref_logprobs=ref)
    with pytest.raises(ValueError, match="valid values: 'k1', 'k2', 'k3', 'full_vocab'"):
        lookup(KL_ESTIMATORS, "kl")


def test_full_vocab_chunked_and_masked_equals_the_formula(monkeypatch):
    # Three positions per chunk over 2 × 5 positions, 7 of them valid: chunks of 3, 3, 1 that cross
    # batch rows. The result must equal the one-shot formula at valid positions, bit for bit in
    # float64 (each position's KL is computed alone either way), and 0 at masked ones even where
    # their logits are NaN (padding garbage).
    import remax.algo.logprobs as module

    g = torch.Generator().manual_seed(4)
    V = 11
    logits = torch.randn(2, 5, V, generator=g, dtype=torch.float64)
    ref_logits = torch.randn(2, 5, V, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    logits[~mask] = torch.nan
    p, logp, logq = logits.softmax(-1), logits.log_softmax(-1), ref_logits.log_softmax(-1)
    formula = torch.where(mask, (p * (logp - logq)).sum(-1), 0.0)  # (B, T)
    whole = full_vocab_kl(logits, ref_logits, mask)
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 3 * V)
    chunked = full_vocab_kl(logits, ref_logits, mask)
    assert torch.equal(chunked, whole)
    torch.testing.assert_close(chunked, formula, rtol=1e-13, atol=1e-15)
    assert (chunked[~mask] == 0).all() and (chunked[mask] > 0).all()
