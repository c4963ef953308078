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


def _nucleus_by_full_sort(logits, *, temperature, top_p, top_k):
    """The filter as first written: top-k, then top-p by sorting the whole vocabulary."""
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def _same_up_to_ties(fast, full) -> bool:
    """Equal, or differing only in which of several equal logits top-p kept at its edge (either
    ranking breaks ties arbitrarily): the same values kept, row by row."""
    V = fast.shape[-1]
    for a, b in zip(fast.reshape(-1, V), full.reshape(-1, V)):
        only_a, only_b = a.isfinite() & ~b.isfinite(), b.isfinite() & ~a.isfinite()
        if not torch.equal(a[only_a].sort().values, b[only_b].sort().values):
            return False
    return True


def test_top_p_ranks_only_the_top_k_survivors_and_drops_the_same_tokens_as_a_full_sort():
    """The fast path (top-p over ``topk`` of the top-k survivors) against the full-vocabulary sort,
    on logits wide and peaked: identical in fp32; in bf16 (many ties) identical up to which of
    equal logits is kept at the edge."""
    g = torch.Generator().manual_seed(0)
    exact = ties = 0
    for dtype in (torch.float32, torch.bfloat16):
        for scale in (0.5, 3.0):  # flat (a wide nucleus) and peaked (a narrow one)
            logits = (torch.randn(4, 6, 2000, generator=g) * scale).to(dtype).float()
            for top_k in (0, 1, 7, 50, 2000, 5000):
                for top_p in (0.3, 0.9, 1.0):
                    for temperature in (0.7, 1.0):
                        kw = dict(temperature=temperature, top_p=top_p, top_k=top_k)
                        fast, full = (
                            filter_logits(logits, **kw),
                            _nucleus_by_full_sort(logits, **kw),
                        )
                        if dtype == torch.float32 or torch.equal(fast, full):
                            assert torch.equal(fast, full), (dtype, scale, kw)
                            exact += 1
                        else:
                            assert _same_up_to_ties(fast, full), (dtype, scale, kw)
                            ties += 1
    assert exact + ties == 2 * 2 * 6 * 3 * 2 and ties > 0, (exact, ties)
