"""The sampling distribution's logits: temperature, top-k and nucleus filtering.

Notation: B batch, T response length, V vocab. Shared by the sampler (``remax.rollout``) and by the
``logprob_dist=sampling_adjusted`` scoring path, so both apply the same transformation.
"""

from __future__ import annotations

import torch


def filter_logits(
    logits: torch.Tensor, *, temperature: float, top_p: float, top_k: int
) -> torch.Tensor:
    """Logits of the distribution actually sampled from, in HF's order: temperature, top-k, top-p.

    Args:
        logits: (..., V).
        temperature: > 0.
        top_p: nucleus mass in (0, 1]; 1 disables.
        top_k: keep the k largest; 0 disables.

    Returns:
        (..., V) with removed tokens at −inf. The argmax is never removed.
    """
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = logits.masked_fill(_outside_nucleus(logits, top_p, top_k > 0), float("-inf"))
    return logits


@torch.no_grad()
def _outside_nucleus(logits: torch.Tensor, top_p: float, after_top_k: bool) -> torch.Tensor:
    """(..., V) bool: the tokens top-p drops. A token is dropped once the mass of the tokens
    ranked above it reaches ``top_p``; the most likely token always stays.

    After top-k the nucleus lies among the tokens still finite (k, or a few more on ties at the
    k-th value), so only those are ranked (``topk``) instead of sorting the whole vocabulary: the
    same tokens dropped (up to which of several equal logits at the cut stays: any ranking breaks
    such ties arbitrarily), at a fraction of the cost (a 32k-vocabulary sort per decoding step was
    most of vLLM's CPU decode and a third of ``hf``'s)."""
    V = logits.shape[-1]
    finite = (logits > float("-inf")).sum(-1)
    kept = int(finite.max()) if after_top_k and finite.numel() else V
    if kept < V:
        ranked, order = torch.topk(logits, kept, dim=-1)
    else:
        ranked, order = torch.sort(logits, descending=True, dim=-1)
    probs = ranked.softmax(-1)
    drop_ranked = (probs.cumsum(-1) - probs) >= top_p
    return torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, drop_ranked)


def nucleus_with_token(
    logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float, top_p: float, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`filter_logits` with each realised token kept in its own position's nucleus.

    A token the sampler drew can fall outside the nucleus recomputed here: bf16 logits or another
    engine (vLLM) put a token at the top-p/top-k edge on the other side of the cut. Its filtered
    log-prob is −inf, which makes the loss inf/NaN. Here its temperature-scaled logit is put back,
    so it is scored under the nucleus plus itself: the distribution the sampler actually drew from
    when the two disagree only on that edge token. This stays closer to the exact sampled law than
    the alternatives: the unfiltered log π(a) drops the nucleus renormalisation that every other
    token gets, and masking the token out of the loss drops a real sample (a biased estimator).
    For a token inside the nucleus nothing changes (the restored value is the value already there).

    Args:
        logits: (B, T, V) raw logits; ``logits[:, t]`` scores ``tokens[:, t]``.
        tokens: (B, T) realised token ids.
        temperature, top_p, top_k: as :func:`filter_logits`.

    Returns:
        ((B, T, V) filtered logits with every realised token finite, (B, T) bool: the realised
        token was outside the recomputed nucleus). Differentiable w.r.t. ``logits``.
    """
    filtered = filter_logits(logits, temperature=temperature, top_p=top_p, top_k=top_k)
    index = tokens.long().unsqueeze(-1)  # (B, T, 1)
    outside = filtered.gather(-1, index).squeeze(-1) == float("-inf")  # (B, T)
    # Same elementwise division as filter_logits, so an inside token gets back its exact value.
    restored = filtered.scatter(-1, index, logits.gather(-1, index) / temperature)
    return restored, outside
