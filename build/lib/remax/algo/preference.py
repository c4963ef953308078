"""Bradley-Terry pairwise loss and accuracy for reward-model training.

Notation: B batch (number of preference pairs).

The reward model scores the chosen and the rejected response of each pair at their end token (the
first EOS after the prompt; remax-spec §3, "SFT and RM stages"); under the Bradley-Terry model
P(chosen ≻ rejected) = σ(s_c − s_r), so the maximum-likelihood loss is −log σ(s_c − s_r).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bradley_terry_loss", "pairwise_accuracy"]


def _check_pairs(chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    if chosen.dim() != 1 or rejected.shape != chosen.shape:
        raise ValueError(
            f"chosen and rejected scores must both be (B,); got {tuple(chosen.shape)} and "
            f"{tuple(rejected.shape)}"
        )


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood −log σ(s_c − s_r) of the preferred response winning.

    ``F.logsigmoid`` keeps large margins finite: a margin of −1000 costs 1000, not inf.

    Args:
        chosen_scores: (B,) scalar scores of the preferred responses.
        rejected_scores: (B,) scalar scores of the dispreferred responses.

    Returns:
        0-dim loss in the promoted dtype; log 2 when every pair is tied, 0 for an empty batch.
    """
    _check_pairs(chosen_scores, rejected_scores)
    nll = -F.logsigmoid(chosen_scores - rejected_scores)  # (B,)
    return nll.sum() / max(nll.shape[0], 1)


@torch.no_grad()
def pairwise_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs ranked correctly; a tie counts one half (a coin flip).

    Args:
        chosen_scores: (B,) scores of the preferred responses.
        rejected_scores: (B,) scores of the dispreferred responses.

    Returns:
        Detached 0-dim tensor in [0, 1] (float dtype of the scores, float32 for integer scores);
        0 for an empty batch.
    """
    _check_pairs(chosen_scores, rejected_scores)
    dtype = torch.promote_types(chosen_scores.dtype, rejected_scores.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float32
    credit = (chosen_scores > rejected_scores).to(dtype) + 0.5 * (
        chosen_scores == rejected_scores
    ).to(dtype)  # (B,)
    return credit.sum() / max(credit.shape[0], 1)
