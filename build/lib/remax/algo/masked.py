"""Masked reductions and the two loss aggregations.

Notation: B batch, T response length.

Every function selects with ``torch.where`` instead of multiplying by the mask, so whatever sits at
a masked position (padding garbage, ``-inf`` log-probs, NaN) changes neither the value nor the
gradient: ``inf * 0`` is NaN, a ``where`` is not. Empty masks give 0, never NaN, so a batch of empty
responses (remax-spec §9 test 16) cannot poison a step.
"""

from __future__ import annotations

import torch

__all__ = ["masked_mean", "masked_sum", "masked_whiten", "seq_sum", "token_mean"]


def _check(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if x.shape != mask.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal the values' shape {tuple(x.shape)}"
        )
    return mask.bool()


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over positions where ``mask`` is true.

    Args:
        x: Values, any shape, e.g. (B, T).
        mask: Same shape as ``x``; bool (or 0/1), true = valid.
        dim: Dimension to reduce; None reduces everything.

    Returns:
        The masked sum: 0-dim if ``dim`` is None, else ``x``'s shape without ``dim``; dtype of
        ``x``.
    """
    mask = _check(x, mask)
    kept = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is true; 0 where nothing is valid.

    Args:
        x: Values, any shape, e.g. (B, T).
        mask: Same shape as ``x``; bool (or 0/1), true = valid.
        dim: Dimension to reduce; None reduces everything.

    Returns:
        The masked mean, shaped as :func:`masked_sum`. An empty selection gives exactly 0 (the sum
        is 0 and the count is clamped to 1), with a defined, zero gradient.
    """
    mask = _check(x, mask)
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Shifts and scales the valid entries of ``x`` to mean 0 and variance 1.

    Statistics are taken over all valid entries together (global, not per row), with the population
    variance (divide by the count). ReMax itself never whitens (remax-spec §4 row 19); this exists
    for ablations and peer estimators.

    Args:
        x: Values, any shape, e.g. advantages (B, T).
        mask: Same shape as ``x``; bool (or 0/1), true = valid.
        eps: Added to the variance before the square root; a constant selection maps to 0.

    Returns:
        Same shape and dtype as ``x``; masked positions are exactly 0.
    """
    mask = _check(x, mask)
    mean = masked_mean(x, mask)
    centred = torch.where(mask, x - mean, torch.zeros((), dtype=x.dtype, device=x.device))
    var = masked_mean(centred.square(), mask)
    return centred * torch.rsqrt(var + eps)


def _normaliser(
    default: torch.Tensor, denominator: float | torch.Tensor | None, like: torch.Tensor
) -> torch.Tensor:
    """The divisor of an aggregation: ``denominator`` if given, else ``default`` clamped to >= 1."""
    if denominator is None:
        return default.clamp(min=1).to(like.dtype)
    if not isinstance(denominator, torch.Tensor):
        if denominator <= 0:
            raise ValueError(f"denominator must be > 0, got {denominator}")
        return torch.tensor(denominator, dtype=like.dtype, device=like.device)
    # A tensor is not checked on the host (that would synchronise a GPU). A global count of 0 means
    # every rank's numerator is 0 too, so dividing by 1 instead returns the correct 0 without NaN.
    den = denominator.to(like.dtype)
    return torch.where(den > 0, den, torch.ones((), dtype=like.dtype, device=like.device))


def token_mean(
    *,
    values: torch.Tensor,
    mask: torch.Tensor,
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of the valid per-token values divided by the number of valid tokens.

    The release's aggregation (remax-spec §3, ``actor_loss_fn``). For one batch it is
    :func:`seq_sum` times B/N (N valid tokens), but N depends on the sampled lengths, so batches of
    long responses get smaller weight than under :func:`seq_sum`.

    Args:
        values: Per-token values, (B, T).
        mask: (B, T) bool, true = valid token.
        denominator: Overrides the local valid-token count, e.g. the count of the whole global
            batch across data-parallel ranks, so that summing the ranks' losses gives the global
            token mean (remax-spec §4 row 10, §9 test 20). A Python number must be > 0.

    Returns:
        0-dim tensor, dtype of ``values``; 0 when nothing is valid.
    """
    mask = _check(values, mask)
    return masked_sum(values, mask) / _normaliser(mask.sum(), denominator, values)


def seq_sum(
    *,
    values: torch.Tensor,
    mask: torch.Tensor,
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sequence sum of the valid per-token values, averaged over the sequences.

    Algorithm 1's aggregation (remax-spec §2 step 4): one term per sequence, whatever its length.
    Rows with no valid token still count in the batch size, as they do in a batch mean.

    Args:
        values: Per-token values, (B, T).
        mask: (B, T) bool, true = valid token.
        denominator: Overrides the local sequence count B, e.g. with the global number of sequences
            across data-parallel ranks. A Python number must be > 0.

    Returns:
        0-dim tensor, dtype of ``values``.
    """
    mask = _check(values, mask)
    batch = torch.tensor(values.shape[0], device=values.device)
    return masked_sum(values, mask) / _normaliser(batch, denominator, values)
