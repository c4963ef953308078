"""Token log-probs and entropies from logits (remax-spec §9 tests 14 and 21)."""

from __future__ import annotations

import math

import pytest
import torch

from remax.algo.logprobs import entropy_from_logits, logprobs_from_logits


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_alignment_matches_slow_loop_over_a_causal_sequence():
    # A causal "LM" over the full sequence: logits[:, s] is the distribution of token s + 1.
    B, P, T, V = 3, 4, 5, 11
    g = _gen(1)
    sequences = torch.randint(V, (B, P + T), generator=g)
    logits = torch.randn(B, P + T, V, generator=g, dtype=torch.float64)

    fast = logprobs_from_logits(logits[:, P - 1 : -1], sequences[:, P:])  # (B, T)

    slow = torch.empty(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            s = P + t  # absolute position of response token t
            slow[b, t] = torch.log_softmax(logits[b, s - 1], dim=-1)[sequences[b, s]]
    # same float64 arithmetic up to logsumexp vs log_softmax rounding
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-13)

    # an off-by-one slice scores each token with its own position's logits: clearly different
    wrong = logprobs_from_logits(logits[:, P:], sequences[:, P:])
    assert (wrong - slow).abs().max() > 0.1


def test_gradient_matches_log_softmax_gather():
    g = _gen(2)
    logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(7, (2, 3), generator=g)
    weights = torch.randn(2, 3, generator=g, dtype=torch.float64)
    (grad_fast,) = torch.autograd.grad(
        (logprobs_from_logits(logits, tokens) * weights).sum(), logits
    )
    ref = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), logits)
    torch.testing.assert_close(grad_fast, grad_ref, rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
)
def test_output_dtype(dtype, expected):
    logits = torch.randn(2, 3, 5, generator=_gen(3)).to(dtype)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    assert logprobs_from_logits(logits, tokens).dtype == expected
    assert entropy_from_logits(logits).dtype == expected


def test_bf16_logits_are_upcast_before_the_softmax():
    # Test 21. A realistic vocabulary and logit scale: a bf16 log-softmax rounds log-probs near
    # −log V ≈ −10 to a spacing of 2⁻⁴ nats; the fp32 path must stay within 1e-2 nats.
    B, T, V = 2, 8, 4096
    g = _gen(4)
    logits32 = torch.randn(B, T, V, generator=g) * 2.0
    tokens = torch.randint(V, (B, T), generator=g)
    logits16 = logits32.to(torch.bfloat16)

    ours = logprobs_from_logits(logits16, tokens)
    # exact log-probs of the same (already rounded) bf16 logits, in float64
    exact16 = logprobs_from_logits(logits16.double(), tokens)
    # fp32 arithmetic over 4096 terms: error ~1e-6; 1e-4 leaves margin, far below bf16's 1e-2
    assert (ours.double() - exact16).abs().max() < 1e-4
    # the spec's criterion against the fp32 logits before rounding them to bf16
    exact32 = logprobs_from_logits(logits32, tokens)
    assert (ours - exact32).abs().max() < 1e-2
    # the test has teeth: a log-softmax computed in bf16 misses the budget
    naive = torch.log_softmax(logits16, -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert (naive.double() - exact16).abs().max() > 1e-2


def test_entropy_hand_values():
    V = 6
    uniform = torch.zeros(1, 2, V, dtype=torch.float64)
    torch.testing.assert_close(
        entropy_from_logits(uniform), torch.full((1, 2), math.log(V)).double()
    )
    # one-hot-like logits: entropy ~ 0; −inf logits (top-k filtered) must not give NaN
    peaked = torch.full((1, 1, V), -torch.inf, dtype=torch.float64)
    peaked[0, 0, 2] = 0.0
    assert entropy_from_logits(peaked).item() == 0.0
    g = _gen(5)
    logits = torch.randn(3, 4, V, generator=g, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(
        entropy_from_logits(logits), -(p * p.log()).sum(-1), rtol=0, atol=1e-14
    )


def test_entropy_gradient_is_finite_with_filtered_logits():
    logits = torch.tensor([[[0.0, 1.0, -torch.inf]]], dtype=torch.float64, requires_grad=True)
    entropy_from_logits(logits).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_shape_validation():
    with pytest.raises(ValueError, match="expected logits"):
        logprobs_from_logits(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_chunked_computation_equals_one_chunk(monkeypatch):
    # Force one row per chunk (and a ragged last chunk) and compare with the single-chunk result.
    from remax.algo import logprobs as module
    from remax.algo.kl import full_vocab_kl

    g = _gen(6)
    logits = torch.randn(5, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    tokens = torch.randint(4, (5, 3), generator=g)
    whole = [logprobs_from_logits(logits, tokens), entropy_from_logits(logits)]
    whole.append(full_vocab_kl(logits, ref_logits))
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 2 * 3 * 4)  # two rows per chunk: 2 + 2 + 1
    assert len(module.row_chunks(5, 3 * 4)) == 3
    chunked = [logprobs_from_logits(logits, tokens), entropy_from_logits(logits)]
    chunked.append(full_vocab_kl(logits, ref_logits))
    for a, b in zip(whole, chunked, strict=True):
        assert torch.equal(a, b)
    (grad_chunked,) = torch.autograd.grad(chunked[0].sum(), logits)
    (grad_whole,) = torch.autograd.grad(whole[0].sum(), logits)
    assert torch.equal(grad_chunked, grad_whole)
