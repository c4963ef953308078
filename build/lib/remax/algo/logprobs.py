"""Token log-probabilities and entropies from logits, computed in float32 or wider.

Notation: B batch, T response length, V vocab.

Alignment is the caller's job: ``logits[:, t]`` must already be the distribution that scores
``tokens[:, t]``. For a causal LM over ``sequences`` (B, P + T) with P prompt tokens that means
``logits[:, P - 1 : -1]`` and ``sequences[:, P:]`` (logits at position t predict token t + 1;
remax-spec §9 test 14).

bf16/fp16 logits are upcast before the softmax: in bf16 a log-prob near −10 has a spacing of
2⁻⁴ nats, far above the 1e-2 nats budget of remax-spec §9 test 21. The work is done a few batch rows
at a time (one row once T·V reaches ``CHUNK_ELEMENTS``), so besides the caller's logits the float32
temporaries stay near one row's size; the release instead materialises full B × L × V log-softmax
tensors for actor and reference (remax-spec §3, "Memory").
"""

from __future__ import annotations

import torch

__all__ = ["entropy_from_logits", "logprobs_from_logits"]


CHUNK_ELEMENTS = 1 << 24
"""Largest number of logits (rows × T × V) upcast and reduced at once: 64 MiB in float32. Bigger
chunks save little time (one chunk already has millions of elements), smaller ones make many-row
batches of short responses slow."""


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    # float64 stays float64 (exact-gradient tests); everything narrower is computed in float32.
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def row_chunks(batch: int, row_elements: int) -> list[slice]:
    """Slices of the batch dimension holding about ``CHUNK_ELEMENTS`` elements each (>= 1 row)."""
    rows = max(1, CHUNK_ELEMENTS // max(row_elements, 1))
    return [slice(start, min(start + rows, batch)) for start in range(0, batch, rows)]


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of each realised token under the softmax of its (aligned) logits.

    Computed as ``logits[token] − logsumexp(logits)``, which equals ``log_softmax`` gathered at the
    token but never stores the log-softmax; for float32 input autograd keeps no copy of the logits
    either (logsumexp saves its input, which is then a view of ``logits``).

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
    B, T, V = logits.shape
    chunks = []
    for rows in row_chunks(B, T * V):
        chunk = logits[rows].to(dtype)  # (b, T, V); a no-op view when already in `dtype`
        picked = chunk.gather(-1, tokens[rows].long().unsqueeze(-1)).squeeze(-1)  # (b, T)
        chunks.append(picked - torch.logsumexp(chunk, dim=-1))
    if not chunks:
        return logits.new_zeros(tokens.shape, dtype=dtype)
    return torch.cat(chunks)  # (B, T)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax of the logits at every position, in nats.

    Uses H = logsumexp(z) − Σ_v softmax(z)_v · z_v, a chunk of batch rows at a time.

    Args:
        logits: (B, T, V), any float dtype.

    Returns:
        (B, T) entropies, float32 (float64 if ``logits`` is float64).
    """
    if logits.dim() != 3:
        raise ValueError(f"expected logits (B, T, V); got {tuple(logits.shape)}")
    dtype = _compute_dtype(logits)
    B, T, V = logits.shape
    zero = torch.zeros((), dtype=dtype, device=logits.device)
    chunks = []
    for rows in row_chunks(B, T * V):
        chunk = logits[rows].to(dtype)  # (b, T, V)
        probs = torch.softmax(chunk, dim=-1)  # (b, T, V)
        # −inf logits (top-k/top-p filtered) have p = 0: 0 · (−inf) is NaN in value and gradient.
        finite = torch.where(probs > 0, chunk, zero)
        chunks.append(torch.logsumexp(chunk, dim=-1) - (probs * finite).sum(-1))
    if not chunks:
        return logits.new_zeros((B, T), dtype=dtype)
    return torch.cat(chunks)  # (B, T)
