"""Layer 0: the algorithm maths as pure tensor-in, tensor-out functions (style.md §2).

Imports torch and the standard library only: no transformers, no config objects, no
``torch.distributed``. Choices are the ``str`` Enums of :mod:`remax.algo.types`; the two tables
below map them to functions with one keyword-only signature per table, so a trainer dispatches with
``lookup(TABLE, cfg_value)(**same_keywords)`` whatever the choice.

Notation: B batch, T response length, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import TypeVar

import torch

from remax.algo.kl import full_vocab_kl, kl_penalty
from remax.algo.logprobs import entropy_from_logits, logprobs_from_logits
from remax.algo.masked import masked_mean, masked_sum, masked_whiten, seq_sum, token_mean
from remax.algo.preference import bradley_terry_loss, pairwise_accuracy
from remax.algo.remax import RemaxStats, policy_gradient_loss, remax_advantages, remax_stats
from remax.algo.sft import sft_loss
from remax.algo.types import Aggregation, KLEstimator, as_enum

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "RemaxStats",
    "bradley_terry_loss",
    "entropy_from_logits",
    "full_vocab_kl",
    "kl_penalty",
    "logprobs_from_logits",
    "lookup",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "pairwise_accuracy",
    "policy_gradient_loss",
    "remax_advantages",
    "remax_stats",
    "sft_loss",
]

KLFn = Callable[..., torch.Tensor]


def _token_kl(estimator: KLEstimator) -> KLFn:
    def kl_fn(
        *,
        logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor,
        logits: torch.Tensor | None = None,
        ref_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return kl_penalty(logprobs, ref_logprobs, estimator)

    kl_fn.__name__ = kl_fn.__qualname__ = f"kl_{estimator.value}"
    return kl_fn


def _full_vocab_kl(
    *,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    if logits is None or ref_logits is None:
        raise ValueError(
            "kl estimator 'full_vocab' needs logits= and ref_logits= (B, T, V); the token "
            "estimators k1/k2/k3 need only the log-probs"
        )
    return full_vocab_kl(logits, ref_logits)


KL_ESTIMATORS: dict[KLEstimator, KLFn] = {
    KLEstimator.k1: _token_kl(KLEstimator.k1),
    KLEstimator.k2: _token_kl(KLEstimator.k2),
    KLEstimator.k3: _token_kl(KLEstimator.k3),
    KLEstimator.full_vocab: _full_vocab_kl,
}
"""Per-token KL penalty, (B, T). Signature: ``(*, logprobs, ref_logprobs, logits=None,
ref_logits=None)``; only ``full_vocab`` reads the (B, T, V) logits, so callers may skip keeping them
for the token estimators."""

AGGREGATIONS: dict[Aggregation, Callable[..., torch.Tensor]] = {
    Aggregation.token_mean: token_mean,
    Aggregation.seq_sum: seq_sum,
}
"""Per-token values (B, T) → scalar. Signature: ``(*, values, mask, denominator=None)``."""

F = TypeVar("F")


def lookup(table: dict[Enum, F], key: Enum | str) -> F:
    """Returns ``table[key]``, accepting an Enum member or its string value.

    Args:
        table: One of the registries above (keys are members of a single Enum).
        key: The choice, e.g. ``cfg.algo.kl_estimator`` or ``"k3"``.

    Returns:
        The registered function.

    Raises:
        ValueError: ``key`` names no member of the Enum, or the member has no entry; the message
            lists the valid names.
    """
    if not table:
        raise ValueError("cannot look up a key in an empty table")
    enum_cls = type(next(iter(table)))
    member = as_enum(enum_cls, key)
    if member not in table:
        valid = ", ".join(repr(k.value) for k in table)
        raise ValueError(f"{enum_cls.__name__} {member.value!r} has no entry; registered: {valid}")
    return table[member]
