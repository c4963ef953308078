"""Layer 0: the algorithm maths as pure tensor-in, tensor-out functions (style.md §2).

Imports torch and the standard library only: no transformers, no config objects, no
``torch.distributed``. Choices are the ``str`` Enums of :mod:`remax.algo.types`; the two tables
of :mod:`remax.algo.registry` map them to functions with one keyword-only signature per table, so a trainer dispatches with
``lookup(TABLE, cfg_value)(**same_keywords)`` whatever the choice.

Notation: B batch, T response length, V vocab.
"""

from __future__ import annotations

from remax.algo.kl import full_vocab_kl, kl_penalty
from remax.algo.logprobs import entropy_from_logits, logprobs_from_logits
from remax.algo.masked import masked_mean, masked_sum, masked_whiten, seq_sum, token_mean
from remax.algo.preference import bradley_terry_loss, pairwise_accuracy
from remax.algo.registry import AGGREGATIONS, KL_ESTIMATORS, lookup
from remax.algo.remax import RemaxStats, policy_gradient_loss, remax_advantages, remax_stats
from remax.algo.sft import sft_loss

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
    "seq_sum",
    "sft_loss",
    "token_mean",
]
