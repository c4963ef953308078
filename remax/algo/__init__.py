"""Layer 0: the algorithm maths as pure tensor-in, tensor-out functions (style.md §2).

Imports torch and the standard library only: no transformers, no config objects, no
``torch.distributed``. Choices are the ``str`` Enums of :mod:`remax.algo.types`; the two tables
of :mod:`remax.algo.registry` map them to functions with one keyword-only signature per table, so a trainer dispatches with
``lookup(TABLE, cfg_value)(**same_keywords)`` whatever the choice.

Notation: B batch, T response length, V vocab.
"""

from __future__ import annotations

import importlib

# Names resolved on first use (PEP 562): ``remax.algo.types`` is imported by the config schema on
# login-node commands, and importing this package must not pay ~2.5 s for torch there.
_EXPORTS = {
    "AGGREGATIONS": "registry",
    "BASELINES": "registry",
    "KL_ESTIMATORS": "registry",
    "lookup": "registry",
    "RemaxStats": "remax",
    "policy_gradient_loss": "remax",
    "remax_advantages": "remax",
    "remax_stats": "remax",
    "SequenceAdvantages": "remax",
    "sequence_advantages": "remax",
    "token_returns": "remax",
    "bradley_terry_loss": "preference",
    "pairwise_accuracy": "preference",
    "entropy_from_logits": "logprobs",
    "logprobs_from_logits": "logprobs",
    "full_vocab_kl": "kl",
    "kl_penalty": "kl",
    "masked_mean": "masked",
    "masked_sum": "masked",
    "masked_whiten": "masked",
    "seq_sum": "masked",
    "token_mean": "masked",
    "sft_loss": "sft",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'remax.algo' has no attribute {name!r}")
    return getattr(importlib.import_module(f"remax.algo.{_EXPORTS[name]}"), name)
