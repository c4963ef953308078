"""The sampling distribution's logits: temperature, top-k and nucleus filtering.

Notation: B batch, V vocab. Shared by the sampler (``remax.rollout``) and by the
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
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass before it reaches top_p; the most likely token always stays.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits
