"""Choice Enums shared by the maths layer and ``remax/config.py`` (remax-spec §4).

Every convention the paper and the official release disagree on is a named switch. The switches are
``str`` Enums rather than ``typing.Literal`` because Hydra structured configs reject ``Literal``
fields (style.md §4); being ``str`` subclasses, members compare equal to their value and serialise
as plain strings. Member names equal their values so a YAML file, a log line and the code read the
same.

This module imports the standard library only, so the config module can import it without torch.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

__all__ = [
    "Aggregation",
    "Baseline",
    "ClipTarget",
    "DiscountConvention",
    "EmptyResponse",
    "EvalDecoding",
    "ExportPolicy",
    "KLEstimator",
    "KLMode",
    "LogprobDist",
    "as_enum",
]


class Baseline(str, Enum):
    """How a sampled reward becomes its advantage (spec §4 row 1; ``remax.algo.baselines``)."""

    greedy = "greedy"  # r − r(x, ā) of the greedy decode: ReMax
    leave_one_out = "leave_one_out"  # r − mean of the prompt's other k − 1 rewards: RLOO
    group_norm = "group_norm"  # (r − group mean) / group std: GRPO (std off: Dr. GRPO)
    none = "none"  # r: vanilla REINFORCE, for ablations and the variance test

    @property
    def needs_greedy(self) -> bool:
        """Whether the rollout must decode one greedy response per prompt (only ReMax reads it)."""
        return self is Baseline.greedy

    @property
    def min_samples(self) -> int:
        """Fewest samples per prompt k the baseline is defined for: a group of one has no other
        reward to compare with (leave-one-out divides by k − 1, the unbiased std by k − 1)."""
        return 2 if self in (Baseline.leave_one_out, Baseline.group_norm) else 1


class KLMode(str, Enum):
    """Where the per-token KL penalty enters the return (spec §4 row 4)."""

    own_token = "own_token"  # the release: each token gets its own KL only
    reward_to_go = "reward_to_go"  # verl/OpenRLHF: discounted sum of this and later tokens' KL


class KLEstimator(str, Enum):
    """Per-token KL estimator (spec §4 row 5; Schulman, "Approximating KL divergence", 2020)."""

    k1 = "k1"  # log π − log π_ref: unbiased, can be negative; the release
    k2 = "k2"  # ½ (log π − log π_ref)²: biased, non-negative
    k3 = "k3"  # π_ref/π − 1 − log(π_ref/π): unbiased, non-negative
    full_vocab = "full_vocab"  # exact KL(π‖π_ref) over the vocabulary at each position


class DiscountConvention(str, Enum):
    """Exponent of γ on the terminal reward for valid token i of n (spec §4 row 7)."""

    official = "official"  # γ^(n−i): the last token gets γ¹ (release `compute_returns`)
    textbook = "textbook"  # γ^(n−1−i): the last token gets γ⁰


class ClipTarget(str, Enum):
    """What ``reward_clip`` clamps (spec §4 row 9)."""

    advantage = "advantage"  # clip(r − r_greedy): the release
    reward = "reward"  # clip(r) − clip(r_greedy): DeepSpeed-Chat PPO style


class Aggregation(str, Enum):
    """How per-token policy-gradient terms become one scalar (spec §4 row 10)."""

    seq_sum = "seq_sum"  # Algorithm 1: sum over tokens, mean over sequences
    token_mean = "token_mean"  # mean over every valid token of the global batch (all ranks)
    # The release's DeepSpeed loss: a token mean per micro-batch of each rank, averaged over
    # micro-batches and ranks, so every rank's batch weighs 1/N whatever its token count.
    rank_token_mean = "rank_token_mean"


class LogprobDist(str, Enum):
    """Which distribution scores the sampled tokens (spec §4 row 12)."""

    raw_softmax = "raw_softmax"  # softmax of the raw logits (the release)
    sampling_adjusted = "sampling_adjusted"  # after temperature/top-p/top-k: the sampler's own law


class EmptyResponse(str, Enum):
    """Handling of a response with no valid token (spec §4 row 14)."""

    space_token = "space_token"  # the release overwrites the first response token with " "
    keep = "keep"  # Algorithm 1: an EOS-first answer is an answer; its EOS is trained as any token
    mask = (
        "mask"  # ablation: the row contributes nothing to the loss (biased, remax-spec §4 row 14)
    )


class EvalDecoding(str, Enum):
    """Decoding used for evaluation rewards (spec §4 row 16)."""

    sampled = "sampled"
    greedy = "greedy"


class ExportPolicy(str, Enum):
    """Which actor checkpoint becomes the stage's export (spec §4 row 18)."""

    best_eval_reward = "best_eval_reward"  # the release
    last = "last"


E = TypeVar("E", bound=Enum)


def as_enum(enum_cls: type[E], value: str | E, *, name: str | None = None) -> E:
    """Converts a plain string or an Enum member to a member of ``enum_cls``.

    Args:
        enum_cls: Target Enum class.
        value: A member, or a string equal to a member's value.
        name: What the value configures, for the error message (defaults to the class name).

    Returns:
        The member of ``enum_cls``.

    Raises:
        ValueError: ``value`` is not a valid member; the message lists the valid names.
    """
    try:
        return enum_cls(value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in enum_cls)
        label = name or enum_cls.__name__
        raise ValueError(f"unknown {label} {value!r}; valid values: {valid}") from None
