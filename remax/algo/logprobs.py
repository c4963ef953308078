"""Token log-probabilities and entropies from logits, computed in float32 or wider.

Notation: B batch, T response length, V vocab.

Alignment is the caller's job: ``logits[:, t]`` must already be the distribution that scores
``tokens[:, t]``. For a causal LM over ``sequences`` (B, P + T) with P prompt tokens that means
``logits[:, P - 1 : -1]`` and ``sequences[:, P:]`` (logits at position t predict token t + 1;
remax-spec §9 test 14).

bf16/fp16 logits are upcast before the softmax: in bf16 a log-prob near −10 has a spacing of
2⁻⁴ nats, far above the 1e-2 nats budget of remax-spec §9 test 21. The work is done one batch row at
a time, so besides the caller's logits only (T, V) float32 temporaries exist; the release instead
materialises full B × L × V log-softmax tensors (remax-spec §3, "Memory").
"""

from __future__ import annotations

import torch

__all__ = ["entropy_from_logits", "logprobs_from_logits"]


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    # float64 stays float64 (exact-gradient tests); everything narrower is computed in float32.
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of each realised token under the softmax of its (aligned) logits.

    Computed as ``logits[token] − logsumexp(logits)``, which equals ``log_softmax`` gathered at the
    token but never stores the (T, V) log-softmax; for float32 input autograd keeps no (T, V) copy
    either (logsumexp saves its input, which is a view of ``logits``).

    Args:
        logits: (B, T, V), any float dtype; ``logits[:, t]`` scores ``tokens[:, t]``.
        tokens: (B, T) integer token ids in [0, V).

    Returns:
        (B, T) log-probabilities, float32 (float64 if ``logits`` is float64). Differentiable w.r.t.
        ``logits``.
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and tokens (B, T); got {tuple(logits.shape)} and "
            f"{tuple(tokens.shape)}"
        )
    dtype = _compute_dtype(logits)
    rows = []
    for row_logits, row_tokens in zip(logits, tokens, strict=True):
        row_logits = row_logits.to(dtype)  # (T, V); a no-op view when already in `dtype`
        picked = row_logits.gather(-1, row_tokens.long().unsqueeze(-1)).squeeze(-1)  # (T,)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    if not rows:
        return logits.new_zeros(tokens.shape, dtype=dtype)
    return torch.stack(rows)  # (B, T)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax of the logits at every position, in nats.

    Uses H = logsumexp(z) − Σ_v softmax(z)_v · z_v, one batch row at a time.

    Args:
        logits: (B, T, V), any float dtype.

    Returns:
        (B, T) entropies, float32 (float64 if ``logits`` is float64).
    """
    if logits.dim() != 3:
        raise ValueError(f"expected logits (B, T, V); got {tuple(logits.shape)}")
    dtype = _compute_dtype(logits)
    rows = []
    for row_logits in logits:
        row_logits = row_logits.to(dtype)  # (T, V)
        probs = torch.softmax(row_logits, dim=-1)  # (T, V)
        # −inf logits (top-k/top-p filtered) have p = 0: 0 · (−inf) is NaN in value and gradient.
        zero = torch.zeros((), dtype=dtype, device=probs.device)
        finite = torch.where(probs > 0, row_logits, zero)
        rows.append(torch.logsumexp(row_logits, dim=-1) - (probs * finite).sum(-1))
    if not rows:
        return logits.new_zeros(logits.shape[:2], dtype=dtype)
    return torch.stack(rows)  # (B, T)
