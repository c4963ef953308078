"""Per-token KL penalties between the policy π and the frozen reference π_ref.

Notation: B batch, T response length, V vocab.

The three sample-based estimators follow J. Schulman, "Approximating KL divergence" (2020,
http://joschu.net/blog/kl-approx.html), written with the log-ratio ℓ = log π(a) − log π_ref(a) of
the realised token a ~ π:

- k1 = ℓ: unbiased for KL(π‖π_ref), high variance, negative for some tokens. The release uses it
  (``kl_divergence = -(log_probs - ref_log_probs)``, remax-spec §3), scaled by −β into a reward.
- k2 = ½ ℓ²: non-negative, biased; close to KL when π ≈ π_ref.
- k3 = exp(−ℓ) − (−ℓ) − 1 = π_ref/π − 1 − log(π_ref/π): unbiased and non-negative.

``full_vocab_kl`` is the exact per-position KL over the vocabulary, which the release computes for
logging only and which [MC]'s "full_step" setting probably uses as the penalty (remax-spec §4 row 5,
unverified).
"""

from __future__ import annotations

import torch

from remax.algo.logprobs import row_chunks
from remax.algo.types import KLEstimator, as_enum

__all__ = ["full_vocab_kl", "kl_penalty"]


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: KLEstimator | str = KLEstimator.k1,
) -> torch.Tensor:
    """Per-token KL estimate from the realised tokens' log-probabilities.

    Args:
        logprobs: (B, T) log π of the sampled tokens.
        ref_logprobs: (B, T) log π_ref of the same tokens.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (or the :class:`KLEstimator` member).
            ``"full_vocab"`` needs logits: use :func:`full_vocab_kl`.

    Returns:
        (B, T) estimates, dtype of the promoted inputs; exactly 0 where
        ``logprobs == ref_logprobs``. Masked positions hold whatever the inputs imply; the caller
        masks.

    Raises:
        ValueError: shapes differ, the estimator is unknown, or it is ``full_vocab``.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ"
        )
    estimator = as_enum(KLEstimator, estimator, name="kl estimator")
    log_ratio = logprobs - ref_logprobs  # ℓ = log π/π_ref, (B, T)
    if estimator is KLEstimator.k1:
        return log_ratio
    if estimator is KLEstimator.k2:
        return 0.5 * log_ratio.square()
    if estimator is KLEstimator.k3:
        # expm1(x) − x with x = −ℓ is k3 without the cancellation of exp(x) − 1 near x = 0.
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(
        "kl estimator 'full_vocab' needs the logits of both models: call "
        "full_vocab_kl(logits, ref_logits) instead of kl_penalty"
    )


def full_vocab_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(π‖π_ref) = Σ_v π(v) (log π(v) − log π_ref(v)) at every position.

    Computed in float32 (float64 stays float64), a chunk of batch rows at a time (see
    :data:`remax.algo.logprobs.CHUNK_ELEMENTS`), so the temporaries stay near one row's size.

    Args:
        logits: (B, T, V) policy logits, aligned as for
            :func:`remax.algo.logprobs.logprobs_from_logits`.
        ref_logits: (B, T, V) reference logits at the same positions.

    Returns:
        (B, T) non-negative KL in nats; exactly 0 where the two rows of logits are identical.
    """
    if logits.dim() != 3 or logits.shape != ref_logits.shape:
        raise ValueError(
            f"expected logits and ref_logits of equal shape (B, T, V); got {tuple(logits.shape)} "
            f"and {tuple(ref_logits.shape)}"
        )
    wide = torch.float64 if torch.float64 in (logits.dtype, ref_logits.dtype) else torch.float32
    B, T, V = logits.shape
    zero = torch.zeros((), dtype=wide, device=logits.device)
    chunks = []
    for rows in row_chunks(B, T * V):
        logp = torch.log_softmax(logits[rows].to(wide), dim=-1)  # (b, T, V)
        logq = torch.log_softmax(ref_logits[rows].to(wide), dim=-1)  # (b, T, V)
        # Tokens with π(v) = 0 contribute 0 even where π_ref(v) = 0 too (0 · (−inf + inf) is NaN).
        diff = torch.where(logp > -torch.inf, logp - logq, zero)
        chunks.append((logp.exp() * diff).sum(-1))
    if not chunks:
        return logits.new_zeros((B, T), dtype=wide)
    return torch.cat(chunks)  # (B, T)
