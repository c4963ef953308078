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
logging and for its eval KL (the ``--target_kl`` early stop), and which [MC]'s "full_step" setting probably uses as the penalty (remax-spec §4 row 5,
unverified).
"""

from __future__ import annotations

import torch

import remax.algo.logprobs as token_logprobs
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


def full_vocab_kl(
    logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact KL(π‖π_ref) = Σ_v π(v) (log π(v) − log π_ref(v)) at every (valid) position.

    π and π_ref are the plain softmax of the logits as given: temperature 1, no top-p/top-k. Pass
    the models' raw logits for the release's quantity (its eval KL, the early stop: remax-spec §3);
    a filtered −inf logit is a token of probability 0 and is handled (0 · log 0 counts as 0).

    Computed in float32 (float64 stays float64) over at most ``CHUNK_ELEMENTS // V`` positions at
    a time (:data:`remax.algo.logprobs.CHUNK_ELEMENTS`), taken across the batch and the sequence,
    so a 32k vocabulary and a long answer never upcast more than one chunk: the temporaries stay
    near ``CHUNK_ELEMENTS`` elements whatever B and T are.

    Args:
        logits: (B, T, V) policy logits, aligned as for
            :func:`remax.algo.logprobs.logprobs_from_logits`.
        ref_logits: (B, T, V) reference logits at the same positions.
        mask: (B, T) bool, the positions to compute (e.g. the response mask); None: all of them.

    Returns:
        (B, T) non-negative KL in nats; exactly 0 where the two rows of logits are identical and at
        masked positions, which are never computed (no NaN from padding garbage).
    """
    if logits.dim() != 3 or logits.shape != ref_logits.shape:
        raise ValueError(
            f"expected logits and ref_logits of equal shape (B, T, V); got {tuple(logits.shape)} "
            f"and {tuple(ref_logits.shape)}"
        )
    B, T, V = logits.shape
    if mask is not None and tuple(mask.shape) != (B, T):
        raise ValueError(f"mask must be (B, T) = ({B}, {T}); got {tuple(mask.shape)}")
    wide = torch.float64 if torch.float64 in (logits.dtype, ref_logits.dtype) else torch.float32
    valid = torch.ones(B, T, dtype=torch.bool, device=logits.device) if mask is None else mask
    rows, cols = valid.bool().nonzero(as_tuple=True)  # (N,) each: the positions to compute
    out = logits.new_zeros((B, T), dtype=wide)
    step = max(1, token_logprobs.CHUNK_ELEMENTS // max(V, 1))  # read per call: tests shrink it
    for start in range(0, rows.numel(), step):
        r, c = rows[start : start + step], cols[start : start + step]
        # Advanced indexing copies only this chunk's (n, V) rows, never a reshape of all of B × T.
        out = out.index_put((r, c), _kl_rows(logits[r, c].to(wide), ref_logits[r, c].to(wide)))
    return out  # (B, T)


def _kl_rows(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """(n,) exact KL of each row of (n, V) logits against the reference's."""
    logp = torch.log_softmax(logits, dim=-1)  # (n, V)
    logq = torch.log_softmax(ref_logits, dim=-1)  # (n, V)
    # Tokens with π(v) = 0 contribute 0 even where π_ref(v) = 0 too (0 · (−inf + inf) is NaN).
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    diff = torch.where(logp > -torch.inf, logp - logq, zero)
    return (logp.exp() * diff).sum(-1)
