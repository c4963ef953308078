"""The sampling distribution's logits (remax/algo/sampling.py): the realised token kept in the
nucleus for ``logprob_dist=sampling_adjusted`` scoring."""

from __future__ import annotations

import torch

from remax.algo.logprobs import logprobs_from_logits
from remax.algo.sampling import filter_logits, nucleus_with_token


def test_nucleus_with_token_scores_an_outside_token_under_the_nucleus_plus_itself():
    # One position, p ∝ e^[3, 2, 1, 0, −1]: top_p 0.9 keeps tokens 0–2 (mass before token 3 is
    # ≈ 0.96). Token 4 drawn at the edge (bf16, vLLM) is scored as logit − logsumexp({0, 1, 2, 4});
    # token 1, inside, exactly as the plain filtered path.
    logits = torch.tensor([[[3.0, 2.0, 1.0, 0.0, -1.0]] * 2], dtype=torch.float64)  # (1, 2, 5)
    tokens = torch.tensor([[4, 1]])
    kept, outside = nucleus_with_token(logits, tokens, temperature=1.0, top_p=0.9, top_k=0)
    assert outside.tolist() == [[True, False]]
    got = logprobs_from_logits(kept, tokens)
    nucleus_plus = torch.tensor([3.0, 2.0, 1.0, -1.0], dtype=torch.float64)
    assert got[0, 0] == -1.0 - torch.logsumexp(nucleus_plus, 0)
    plain = filter_logits(logits, temperature=1.0, top_p=0.9, top_k=0)
    assert got[0, 1] == logprobs_from_logits(plain, tokens)[0, 1]
    assert torch.isfinite(got).all()


def test_nucleus_with_token_gradient_is_finite_and_matches_the_filter_inside():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(9, (3, 4), generator=g)
    kept, outside = nucleus_with_token(logits, tokens, temperature=0.7, top_p=0.8, top_k=5)
    assert outside.any() and (~outside).any()
    lp = logprobs_from_logits(kept, tokens)
    (grad,) = torch.autograd.grad(lp.sum(), logits)
    assert torch.isfinite(lp).all() and torch.isfinite(grad).all()
    plain = logprobs_from_logits(filter_logits(logits, temperature=0.7, top_p=0.8, top_k=5), tokens)
    assert torch.equal(lp[~outside], plain[~outside])
