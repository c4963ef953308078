"""Supervised fine-tuning loss: next-token negative log-likelihood on the response tokens.

Notation: B batch, T sequence length (the positions scored by the shifted logits).

As in DeepSpeed-Chat step 1 (remax-spec §3, "SFT and RM stages"), only response tokens and the
appended EOS carry loss; prompt positions and anything after the first EOS are masked by the caller
(remax-spec §9 test 23).
"""

from __future__ import annotations

import torch

from remax.algo.masked import token_mean

__all__ = ["sft_loss"]


def sft_loss(
    logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-mean negative log-likelihood over the masked-in tokens.

    Args:
        logprobs: (B, T) log-probabilities of the target tokens, e.g. from
            :func:`remax.algo.logprobs.logprobs_from_logits`.
        loss_mask: (B, T) bool, true where the token is trained on.
        denominator: Replaces the local count of trained tokens, e.g. by the global count across
            data-parallel ranks. A Python number must be > 0.

    Returns:
        0-dim loss, dtype of ``logprobs``; 0 (with a zero gradient) when the mask is empty.
    """
    return token_mean(values=-logprobs, mask=loss_mask, denominator=denominator)
