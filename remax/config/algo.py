"""The RL algorithms' conventions (``algo``): ReMax (remax-spec §4) and the PPO baseline (§7)."""

from __future__ import annotations

from dataclasses import dataclass

from remax.algo.types import (
    Aggregation,
    Baseline,
    ClipTarget,
    DiscountConvention,
    EmptyResponse,
    EvalDecoding,
    KLEstimator,
    KLMode,
    LogprobDist,
)
from remax.config.base import _require
from remax.config.sampling import SamplingFields


@dataclass(kw_only=True)
class RemaxAlgoConfig(SamplingFields):
    """ReMax conventions (remax-spec §4). Defaults are Algorithm 1 of the paper."""

    baseline: Baseline = Baseline.greedy
    """The advantage of each sample (``remax.algo.registry.BASELINES``): ``greedy`` r − r(x, greedy
    response) (ReMax), ``leave_one_out`` (RLOO), ``group_norm`` (GRPO), ``none`` (REINFORCE). The
    last three compare the k = ``rollout.samples_per_prompt`` samples of a prompt; only ``greedy``
    decodes a greedy response."""
    group_std_norm: bool = True
    """``group_norm`` only: divide by the group's std (GRPO); false: centre only (Dr. GRPO)."""
    clip_ratio: float | None = None
    """ε of GRPO's clipped ratio min(ρA, clip(ρ, 1 ± ε)A); null: the plain −A·log π. With one
    on-policy update ρ = 1 and the gradient is the same (DeepSeekMath: 0.2)."""
    kl_loss_coef: float = 0.0
    """β of a per-token KL term (``kl_estimator``) added to the loss with its gradient, as GRPO's
    (DeepSeekMath: 0.04 with k3); ``kl_coef`` puts the KL in the reward instead."""
    kl_coef: float = 0.0
    """β of the per-token KL penalty in the return."""
    kl_mode: KLMode = KLMode.own_token
    """``own_token``: token i carries its own KL (the release); ``reward_to_go``: Σ_{j>=i} (verl)."""
    kl_estimator: KLEstimator = KLEstimator.k1
    """Per-token KL estimator (k1 = log-ratio, as the release)."""
    gamma: float = 1.0
    """Discount of the terminal reward term, in (0, 1]."""
    discount_convention: DiscountConvention = DiscountConvention.official
    """``official``: token i of n gets γ^(n−i) (last token γ¹); ``textbook``: γ^(n−1−i)."""
    reward_clip: float | None = None
    """Clip bound, None for no clip (release: 5.0)."""
    clip_target: ClipTarget = ClipTarget.advantage
    """``advantage``: clip r − r_greedy (the release); ``reward``: clip each score."""
    aggregation: Aggregation = Aggregation.seq_sum
    """``seq_sum`` (Algorithm 1) or ``token_mean`` (the release)."""
    logprob_dist: LogprobDist = LogprobDist.raw_softmax
    """Which distribution the log-probs score (see remax-spec test 19)."""
    train_on_eos: bool = True
    """EOS is a trained action and the RM reads it."""
    empty_response: EmptyResponse = EmptyResponse.keep
    """Answers that end at once: ``keep`` (Algorithm 1: trained like any answer), ``space_token``
    (the release: rewritten to " " + EOS) or ``mask`` (no gradient; biases the EOS logit)."""
    empty_max_tokens: int = 0
    """``space_token`` only: answers with at most this many tokens before EOS count as empty. The
    release rewrites answers with <= 1 non-pad token (``remax_trainer.py`` generate_experience): 1."""
    eval_decoding: EvalDecoding = EvalDecoding.sampled
    """Decoding of evaluation answers."""
    early_stop_kl: float | None = None
    """Stop when the periodic eval's mean per-token KL (nats/token) reaches this value (release:
    1.0, ``--target_kl``, a per-token mean); None never stops."""
    epochs: int = 1
    """Passes over one rollout. Fixed at 1: ReMax is on-policy with no importance ratio."""

    def __post_init__(self) -> None:
        _require(self.kl_coef >= 0, "algo.kl_coef", self.kl_coef, "use a value >= 0, e.g. 0.05")
        _require(0 < self.gamma <= 1, "algo.gamma", self.gamma, "use a value in (0, 1], e.g. 0.99")
        _require(
            self.reward_clip is None or self.reward_clip > 0,
            "algo.reward_clip",
            self.reward_clip,
            "use a positive bound or null for no clip",
        )
        self.check_sampling("algo.")
        _check_empty(self.empty_max_tokens)
        _check_reference_support(self)
        _require(self.kl_loss_coef >= 0, "algo.kl_loss_coef", self.kl_loss_coef, "use a value >= 0")
        _require(
            self.clip_ratio is None or self.clip_ratio > 0,
            "algo.clip_ratio",
            self.clip_ratio,
            "use a value > 0 (GRPO: 0.2) or null for no clip",
        )
        _require(
            self.epochs == 1,
            "algo.epochs",
            self.epochs,
            "ReMax is on-policy without an importance ratio: use 1 (use the PPO stage for reuse)",
        )
        _require(
            self.early_stop_kl is None or self.early_stop_kl > 0,
            "algo.early_stop_kl",
            self.early_stop_kl,
            "use a positive KL or null",
        )


@dataclass(kw_only=True)
class PPOAlgoConfig(SamplingFields):
    """PPO as DeepSpeed-Chat defines it (remax-spec §7). Defaults are DS-Chat's trainer constants."""

    kl_coef: float = 0.1
    """β of the per-token k1 KL reward −β·(log π_old − log π_ref) (DS-Chat ``kl_ctl``)."""
    gamma: float = 1.0
    """GAE discount, in (0, 1]."""
    lam: float = 0.95
    """GAE λ, in [0, 1]: 1 gives Monte-Carlo returns, 0 one-step TD."""
    clip_range: float = 0.2
    """ε of the clipped policy surrogate (DS-Chat ``cliprange``)."""
    clip_range_value: float = 0.2
    """Clip of the critic's value around its experience-time value, in reward units
    (DS-Chat ``cliprange_value``)."""
    ppo_epochs: int = 1
    """Passes over one rollout batch."""
    mini_batches: int = 1
    """Optimizer steps per epoch: the rollout batch is cut into this many minibatches, in order.
    Must divide ``train.batch_size``."""
    reward_clip: float | None = 5.0
    """Clip of the raw reward-model score before it is added on the last token (DS-Chat
    ``clip_reward_value``); None for no clip."""
    train_on_eos: bool = True
    """EOS is a trained action and carries the score (the ReMax release's convention; DS-Chat's
    "+1" end index expresses the same placement, remax-spec §7)."""
    empty_response: EmptyResponse = EmptyResponse.mask
    """Answers that end at once: ``space_token`` (the ReMax release), ``keep`` (trained like any
    answer) or ``mask`` (no gradient; the closest to DS-Chat, which drops answers of at most one
    token)."""
    empty_max_tokens: int = 0
    """``space_token`` only: answers with at most this many tokens before EOS count as empty (the
    ReMax release: 1)."""
    eval_decoding: EvalDecoding = EvalDecoding.sampled
    """Decoding of evaluation answers (the same as the ReMax run's for a fair comparison)."""
    critic_lora: bool = False
    """With ``model.lora.rank`` > 0: the critic gets the same adapters (its value head trained
    fully); false: the critic trains every weight while the actor trains adapters."""

    def __post_init__(self) -> None:
        _require(self.kl_coef >= 0, "algo.kl_coef", self.kl_coef, "use a value >= 0, e.g. 0.1")
        _require(0 < self.gamma <= 1, "algo.gamma", self.gamma, "use a value in (0, 1], e.g. 1.0")
        _require(0 <= self.lam <= 1, "algo.lam", self.lam, "use a value in [0, 1], e.g. 0.95")
        _require(
            self.clip_range > 0, "algo.clip_range", self.clip_range, "use a value > 0, e.g. 0.2"
        )
        _require(
            self.clip_range_value > 0,
            "algo.clip_range_value",
            self.clip_range_value,
            "use a value > 0, e.g. 0.2",
        )
        _require(self.ppo_epochs >= 1, "algo.ppo_epochs", self.ppo_epochs, "use >= 1")
        _require(self.mini_batches >= 1, "algo.mini_batches", self.mini_batches, "use >= 1")
        _require(
            self.reward_clip is None or self.reward_clip > 0,
            "algo.reward_clip",
            self.reward_clip,
            "use a positive bound or null for no clip",
        )
        self.check_sampling("algo.")
        _check_empty(self.empty_max_tokens)


def _check_empty(empty_max_tokens: int) -> None:
    _require(
        empty_max_tokens in (0, 1),
        "algo.empty_max_tokens",
        empty_max_tokens,
        "use 0 (EOS-first answers) or 1 (the release: <= 1 token)",
    )


def _check_reference_support(algo: RemaxAlgoConfig) -> None:
    # sampling_adjusted scores the reference with the policy's top-p/top-k filter too: a token
    # inside the policy's nucleus but outside the reference's has log π_ref = −inf, so the KL
    # penalty and the eval KL (the early stop) become infinite or NaN.
    truncated = algo.top_p < 1 or algo.top_k > 0
    uses_kl = algo.kl_coef > 0 or algo.early_stop_kl is not None
    _require(
        not (algo.logprob_dist == LogprobDist.sampling_adjusted and truncated and uses_kl),
        "algo.logprob_dist",
        getattr(algo.logprob_dist, "value", algo.logprob_dist),
        f"sampling_adjusted with top_p={algo.top_p}, top_k={algo.top_k} gives log π_ref = −inf for "
        "tokens outside the reference's nucleus (infinite KL): use raw_softmax, or kl_coef=0 and "
        "early_stop_kl=null",
    )
