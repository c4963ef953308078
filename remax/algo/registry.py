"""The three choice tables of the maths: Enum → function, one keyword-only signature per table.

The trainers dispatch through them (``lookup(KL_ESTIMATORS, algo.kl_estimator)(...)``,
``policy_gradient_loss``'s aggregation), so a new estimator is one function and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import TypeVar

import torch

from remax.algo import baselines
from remax.algo.kl import full_vocab_kl, kl_penalty
from remax.algo.masked import seq_sum, token_mean
from remax.algo.types import Aggregation, Baseline, KLEstimator, as_enum

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
    # A token mean too: the caller passes each rank's micro-batch normaliser as ``denominator``.
    Aggregation.rank_token_mean: token_mean,
}
"""Per-token values (B, T) → scalar. Signature: ``(*, values, mask, denominator=None)``."""

BASELINES: dict[Baseline, Callable[..., torch.Tensor]] = {
    Baseline.greedy: baselines.greedy,  # ReMax
    Baseline.leave_one_out: baselines.leave_one_out,  # RLOO
    Baseline.group_norm: baselines.group_norm,  # GRPO; std_norm=False: Dr. GRPO
    Baseline.none: baselines.no_baseline,
}
"""Rewards → (B·k,) sequence-level advantages (``remax.algo.baselines``; B prompts, k samples per
prompt, prompt-major rows). Signature: ``(*, rewards (B·k,), k, greedy_rewards (B,) or None,
std_norm)``; only ``greedy`` reads ``greedy_rewards`` (``Baseline.needs_greedy``: the rollout decodes
greedy rows for it alone) and only ``group_norm`` reads ``std_norm``. A new critic-free algorithm is
one function here and one ``hydra_conf/algo`` preset (docs/architecture.md)."""

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
