"""ReMax: REINFORCE with the greedy response's reward as the baseline.

Notation: B batch, T response length.

Li et al., "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning
Large Language Models", ICML 2024 (arXiv 2310.10505), Algorithm 1 (remax-spec §2). Per prompt x of a
batch of B prompts:

    a  ~ π_θ(·|x)                                  sampled response a = (a_1, ..., a_n)
    ā  = argmax-decode π_θ(·|x)                     greedy response, no gradient
    A(x) = r(x, a) − r(x, ā)                        one scalar per prompt
    L(θ) = −(1/B) Σ_x A(x) · Σ_t log π_θ(a_t | x, a_<t)
    one optimizer step on L(θ)

so the gradient estimate is g = (r(x, a) − r(x, ā)) ∇_θ log π_θ(a|x). It is unbiased: ā depends on
(θ, x) only, not on the sample a, hence E_a[r(x, ā) ∇ log π(a|x)] = r(x, ā) ∇ Σ_a π(a|x) = 0. The
baseline is a constant: no gradient flows through the greedy path (every input of this module
that is not a log-prob is detached). Algorithm 1 has no KL term, no clipping, no discount, no value
model, no importance ratio and no advantage normalisation.

The official release (liziniu/ReMax @ 536ba49, ``step3_rlhf_finetuning/remax_trainer.py``,
remax-spec §3) departs from Algorithm 1 in four ways, each a keyword here (spec §4):

1. **KL in the return, own token only** (``kl_mode``). Token i's return gets −β·kl_i with
   kl_i = log π(a_i) − log π_ref(a_i) of that token alone: the release's ``cumulative_kl`` is
   overwritten, not accumulated (``compute_returns``, ~L248-250). ``"reward_to_go"`` uses
   −β·Σ_{j≥i} γ^(j−i)·kl_j instead (verl, OpenRLHF); with γ = 1 its expected update is exactly
   ∇(E[r] − β·KL(π‖π_ref)), which own-token KL is not.
2. **Discount exponent** (``gamma``, ``discount_convention``). The terminal reward reaches valid
   token i (0-based) of n with weight γ^(n−i): the release multiplies by γ before adding, so even
   the last token gets γ¹ (``"official"``). The textbook weight is γ^(n−1−i). The scripts pass
   γ = 0.99; Algorithm 1 is γ = 1, where both conventions agree.
3. **Clip after subtracting** (``reward_clip``, ``clip_target``). d = clip(r − r_greedy, ±5), 5.0
   hard-coded (the ``--clip_reward_value`` flag is ignored). ``"reward"`` clips r and r_greedy
   first, as DeepSpeed-Chat's PPO clips the raw score.
4. **Token mean** (``aggregation``). loss = −Σ_{b,t} R·log π·m / Σ_{b,t} m over the micro-batch,
   not Algorithm 1's per-sequence sum averaged over sequences (``"seq_sum"``). For one batch the
   two differ by the factor B/N (N valid tokens), but N depends on the sampled lengths: batches of
   long responses take smaller steps, and with one sequence per micro-batch (the Llama-2 script)
   each sequence's gradient is divided by its own length. The expected update is then no longer
   ∇E[r] (tests/algo/test_exact_gradient.py).

Together, for valid token i of n: R_i = KLterm_i + γ^(n−i)·clip(r − r_greedy) (release) versus
R_i = r − r_greedy for every token (Algorithm 1: β = 0, γ = 1, no clip).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from remax.algo.masked import masked_mean, masked_sum
from remax.algo.registry import AGGREGATIONS, BASELINES, lookup
from remax.algo.types import (
    Aggregation,
    Baseline,
    ClipTarget,
    DiscountConvention,
    KLMode,
    as_enum,
)

__all__ = [
    "RemaxStats",
    "SequenceAdvantages",
    "policy_gradient_loss",
    "remax_advantages",
    "remax_stats",
    "sequence_advantages",
    "token_returns",
]


def _float_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """Promoted dtype of the given tensors, or the default float dtype if that is not floating."""
    dtype = None
    for t in tensors:
        if t is not None:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    if dtype is None or not dtype.is_floating_point:
        return torch.get_default_dtype()
    return dtype


def _check_rewards(rewards: torch.Tensor, baseline_rewards: torch.Tensor) -> None:
    if rewards.dim() != 1 or baseline_rewards.shape != rewards.shape:
        raise ValueError(
            f"rewards and baseline_rewards must both be (B,); got {tuple(rewards.shape)} and "
            f"{tuple(baseline_rewards.shape)}"
        )


def _prefix_mask(response_mask: torch.Tensor, batch: int) -> torch.Tensor:
    """Validates a (B, T) response mask whose valid tokens start at column 0 and are contiguous."""
    if response_mask.dim() != 2 or response_mask.shape[0] != batch:
        raise ValueError(
            f"response_mask must be (B, T) with B = {batch}; got {tuple(response_mask.shape)}"
        )
    mask = response_mask.bool()
    # Token i's discount depends on its rank among the valid tokens; the release reads that rank
    # off the column (``range(start, ends[j])``), which is only right for a prefix mask. A
    # left-padded or holed mask would silently shift every exponent, so refuse it (one host sync on
    # GPU).
    gaps = mask[:, 1:] & ~mask[:, :-1]
    if bool(gaps.any()):
        row = int(gaps.any(dim=1).nonzero()[0])
        raise ValueError(
            f"response_mask row {row} is not a prefix (valid tokens must start at column 0 and be "
            "contiguous); right-pad responses and slice the prompt off before calling"
        )
    return mask


def _discounted_reverse_cumsum(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """G[:, i] = Σ_{j≥i} γ^(j−i) x[:, j] for (B, T) ``x``.

    A reverse loop over T: rescaling by γ^(−i) over- or underflows for long responses, and a (T, T)
    discount matrix costs O(T²) memory and loses precision under TF32 matmuls.
    """
    out = torch.empty_like(x)
    running = torch.zeros_like(x[:, 0])  # (B,)
    for t in range(x.shape[1] - 1, -1, -1):
        running = x[:, t] + gamma * running
        out[:, t] = running
    return out


def remax_advantages(
    rewards: torch.Tensor,
    baseline_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    reward_clip: float | None = None,
    kl_mode: KLMode | str = KLMode.own_token,
    discount_convention: DiscountConvention | str = DiscountConvention.official,
    clip_target: ClipTarget | str = ClipTarget.advantage,
) -> torch.Tensor:
    """Per-token returns R (used directly as advantages) of the ReMax estimator.

    With d = r − r_greedy (clipped as ``clip_target`` says), for valid token i (0-based) of n:

        R_i = KLterm_i + γ^e(i) · d,   e(i) = n − i ("official") or n − 1 − i ("textbook"),
        KLterm_i = −β·kl_i ("own_token")  or  −β·Σ_{j≥i, j<n} γ^(j−i)·kl_j ("reward_to_go").

    The defaults are Algorithm 1 (β = 0, γ = 1, no clip): R_i = d on every valid token. The release
    is ``kl_coef=0.05, gamma=0.99, reward_clip=5.0`` with the other defaults.

    Args:
        rewards: (B,) reward of the sampled responses r(x, a).
        baseline_rewards: (B,) reward of the greedy responses r(x, ā); zeros for ``Baseline.none``.
        response_mask: (B, T) bool, valid response tokens, contiguous from column 0; the last valid
            one is EOS or the truncation point. A row may be empty.
        kl: (B, T) per-token KL penalty term, e.g. the k1 log-ratio log π − log π_ref. Required when
            ``kl_coef > 0``; ignored when ``kl_coef == 0``. Values at masked positions are ignored.
        kl_coef: β >= 0.
        gamma: Discount γ in (0, 1], applied to the terminal reward (and to the KL reward-to-go).
        reward_clip: Clip bound c > 0, or None for no clipping.
        kl_mode: :class:`KLMode` or its value.
        discount_convention: :class:`DiscountConvention` or its value.
        clip_target: :class:`ClipTarget` or its value.

    Returns:
        (B, T) returns, detached (the baseline is a constant, remax-spec §2), dtype promoted from
        the inputs (float64 in, float64 out). Masked positions are exactly 0; an empty row is all
        0.

    Raises:
        ValueError: bad shapes, a non-prefix mask, an unknown mode, ``kl_coef < 0``, ``gamma``
            outside (0, 1], ``reward_clip <= 0``, or ``kl_coef > 0`` without ``kl``.
    """
    if reward_clip is not None and reward_clip <= 0:
        raise ValueError(f"reward_clip must be > 0 or None, got {reward_clip} (release: 5.0)")
    _check_rewards(rewards, baseline_rewards)
    dtype = _float_dtype(rewards, baseline_rewards, kl)
    d = _remax_margins(
        rewards, baseline_rewards, reward_clip, clip_target, dtype
    ).advantages  # (B,)
    shaping = dict(kl_coef=kl_coef, gamma=gamma, kl_mode=kl_mode)
    return token_returns(
        d, response_mask, kl=kl, discount_convention=discount_convention, **shaping
    )


def token_returns(
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    kl_mode: KLMode | str = KLMode.own_token,
    discount_convention: DiscountConvention | str = DiscountConvention.official,
) -> torch.Tensor:
    """Per-token returns from one sequence-level advantage d per row (:func:`remax_advantages`
    with d given: R_i = KLterm_i + γ^e(i)·d, the same discount and KL conventions).

    Args:
        advantages: (B,) d of each row, e.g. ``sequence_advantages(...).advantages``.
        response_mask: (B, T) bool prefix mask of valid tokens.
        kl, kl_coef, gamma, kl_mode, discount_convention: as in :func:`remax_advantages`.

    Returns:
        (B, T) returns, detached, 0 at masked positions.
    """
    kl_mode = as_enum(KLMode, kl_mode, name="kl_mode")
    discount_convention = as_enum(
        DiscountConvention, discount_convention, name="discount_convention"
    )
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef} (use 0 to disable the KL penalty)")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma} (Algorithm 1 uses 1.0)")
    if kl_coef > 0 and kl is None:
        raise ValueError(f"kl_coef = {kl_coef} > 0 needs the per-token `kl` (B, T) tensor")
    if advantages.dim() != 1:
        raise ValueError(f"advantages must be (B,); got {tuple(advantages.shape)}")
    mask = _prefix_mask(response_mask, advantages.shape[0])
    if kl is not None and kl.shape != mask.shape:
        raise ValueError(f"kl {tuple(kl.shape)} must match response_mask {tuple(mask.shape)}")

    dtype = _float_dtype(advantages, kl)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    d = advantages.detach().to(dtype)  # (B,)
    n = mask.sum(dim=1, keepdim=True)  # (B, 1) valid tokens per row
    position = torch.arange(mask.shape[1], device=mask.device)  # (T,)
    exponent = n - position  # (B, T); official: the last valid token (i = n − 1) gets γ¹
    if discount_convention is DiscountConvention.textbook:
        exponent = exponent - 1
    exponent = exponent.clamp(min=0).to(dtype)  # masked positions go negative; zeroed below
    returns = torch.pow(torch.tensor(gamma, dtype=dtype, device=mask.device), exponent) * d[:, None]

    if kl is not None and kl_coef != 0:
        kl = torch.where(mask, kl.detach().to(dtype), zero)  # (B, T); padding garbage dropped
        if kl_mode is KLMode.reward_to_go:
            kl = _discounted_reverse_cumsum(kl, gamma)
        returns = returns - kl_coef * kl
    return torch.where(mask, returns, zero)


def policy_gradient_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    aggregation: Aggregation | str = Aggregation.token_mean,
    denominator: float | torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    clip_ratio: float | None = None,
    kl_loss: torch.Tensor | None = None,
    kl_loss_coef: float = 0.0,
) -> torch.Tensor:
    """REINFORCE loss −A·log π aggregated over the valid tokens, with GRPO's two switches.

    - ``"token_mean"``: −Σ_{b,t} A·log π·m / Σ_{b,t} m (the release).
    - ``"seq_sum"``: −(1/B) Σ_b Σ_t A·log π·m (Algorithm 1).

    ``clip_ratio`` ε replaces −A·log π by the clipped surrogate −min(ρ·A, clip(ρ, 1 − ε, 1 + ε)·A),
    ρ = π/π_old (GRPO, DeepSeekMath eq. 3). On-policy with one update π_old is the same forward, so
    ρ = 1 and ∇ = −A·∇log π: the same gradient as without the clip; it starts to matter once a
    batch is reused. ``kl_loss_coef`` β adds β·kl_loss per token to the loss, with its gradient
    (GRPO's k3 in the loss rather than in the reward: E_π[∇k3] = ∇KL(π_ref ‖ π), exact test in
    tests/algo/test_baselines.py).

    Args:
        logprobs: (B, T) log π_θ of the sampled tokens, with grad.
        advantages: (B, T) e.g. from :func:`remax_advantages`; detached here, they are constants.
        response_mask: (B, T) bool, valid tokens. Values of any tensor at masked positions
            change neither the loss nor the gradient (NaN and ±inf included).
        aggregation: :class:`Aggregation` or its value.
        denominator: Replaces Σ m (token_mean) or B (seq_sum), e.g. by the global token or sequence
            count across data-parallel ranks (remax-spec §4 row 10). A Python number must be > 0.
        old_logprobs: (B, T) log π_old of the experience; needed with ``clip_ratio``; constant.
        clip_ratio: ε > 0 of the clipped ratio, or None for the plain −A·log π.
        kl_loss: (B, T) per-token KL estimate with grad (e.g. k3 of ``logprobs``); needed when
            ``kl_loss_coef > 0``.
        kl_loss_coef: β >= 0 of the KL term in the loss.

    Returns:
        0-dim loss, dtype promoted from ``logprobs`` and ``advantages``. With no valid token it is 0
        with a zero (not NaN) gradient.
    """
    aggregation = as_enum(Aggregation, aggregation, name="aggregation")
    if not logprobs.shape == advantages.shape == response_mask.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, advantages {tuple(advantages.shape)} and "
            f"response_mask {tuple(response_mask.shape)} must all be the same (B, T)"
        )
    mask = response_mask.bool()
    # Mask the advantages before multiplying: otherwise a NaN advantage at a padded position makes
    # the gradient of the padded log-prob 0 · NaN = NaN even though its value is dropped.
    zero = torch.zeros((), dtype=advantages.dtype, device=advantages.device)
    advantages = torch.where(mask, advantages.detach(), zero)
    per_token = _surrogate(logprobs, advantages, mask, old_logprobs, clip_ratio)  # (B, T)
    per_token = _add_kl_loss(per_token, mask, kl_loss, kl_loss_coef)
    aggregate = lookup(AGGREGATIONS, aggregation)
    return aggregate(values=per_token, mask=mask, denominator=denominator)


def _add_kl_loss(per_token, mask, kl_loss, kl_loss_coef) -> torch.Tensor:
    """(B, T) ``per_token`` + β·``kl_loss`` at valid tokens (GRPO's KL in the loss)."""
    if kl_loss_coef < 0:
        raise ValueError(f"kl_loss_coef must be >= 0, got {kl_loss_coef}")
    if kl_loss_coef == 0:
        return per_token
    if kl_loss is None or kl_loss.shape != mask.shape:
        shape = None if kl_loss is None else tuple(kl_loss.shape)
        raise ValueError(f"kl_loss_coef > 0 needs kl_loss (B, T) = {tuple(mask.shape)}: {shape}")
    return per_token + kl_loss_coef * torch.where(mask, kl_loss, 0.0)


def _surrogate(logprobs, advantages, mask, old_logprobs, clip_ratio) -> torch.Tensor:
    """(B, T) per-token −A·log π, or the clipped −min(ρA, clip(ρ)A) with ``clip_ratio``."""
    if clip_ratio is None:
        return -advantages * logprobs
    if clip_ratio <= 0 or old_logprobs is None or old_logprobs.shape != logprobs.shape:
        raise ValueError(
            f"clip_ratio={clip_ratio} needs a value > 0 and old_logprobs (B, T) like logprobs"
        )
    # Masked before exp: padding's log-ratio cannot overflow, nor carry NaN into the backward.
    ratio = torch.exp(torch.where(mask, logprobs - old_logprobs.detach(), 0.0))  # (B, T)
    bounded = ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio)
    return torch.maximum(-advantages * ratio, -advantages * bounded)


class SequenceAdvantages(NamedTuple):
    """One scalar per sample, (B·k,) each, detached."""

    advantages: torch.Tensor
    """A after ``reward_clip``: what the policy gradient weighs Σ_t log π by."""
    raw: torch.Tensor
    """A before any clipping: its sign gives the win/tie fractions of the logs."""


def sequence_advantages(
    rewards: torch.Tensor,
    greedy_rewards: torch.Tensor | None,
    *,
    k: int,
    baseline: Baseline | str,
    std_norm: bool = True,
    reward_clip: float | None = None,
    clip_target: ClipTarget | str = ClipTarget.advantage,
) -> SequenceAdvantages:
    """One advantage per sample from :data:`~remax.algo.registry.BASELINES`, with the reward clip
    of remax-spec §4 row 9: ``clip_target="reward"`` clips every score (sampled and greedy) before
    the baseline, ``"advantage"`` clips A after it (the release: clip(r − r_greedy)).

    Args:
        rewards: (B·k,) r of the sampled responses, prompt-major (row i·k + j: prompt i).
        greedy_rewards: (B,) r of each prompt's greedy response, or None when the baseline does
            not read it (``Baseline.needs_greedy``).
        k: Samples per prompt.
        baseline: :class:`Baseline` or its value.
        std_norm: ``group_norm`` only: divide by the group std (GRPO) or not (Dr. GRPO).
        reward_clip: Clip bound c > 0, or None.
        clip_target: :class:`ClipTarget` or its value.

    Returns:
        :class:`SequenceAdvantages` of detached (B·k,) tensors in the rewards' dtype.
    """
    fn = lookup(BASELINES, as_enum(Baseline, baseline, name="baseline"))
    clip_target = as_enum(ClipTarget, clip_target, name="clip_target")
    raw = fn(rewards=rewards, k=k, greedy_rewards=greedy_rewards, std_norm=std_norm)
    if reward_clip is None:
        return SequenceAdvantages(raw, raw)
    if clip_target is ClipTarget.advantage:
        return SequenceAdvantages(raw.clamp(-reward_clip, reward_clip), raw)
    clip = lambda r: None if r is None else r.detach().clamp(-reward_clip, reward_clip)  # noqa: E731
    clipped = fn(rewards=clip(rewards), k=k, greedy_rewards=clip(greedy_rewards), std_norm=std_norm)
    return SequenceAdvantages(clipped, raw)


class RemaxStats(NamedTuple):
    """Batch diagnostics of one ReMax step; every field is a detached 0-dim tensor.

    Means are over the local batch; averaging across data-parallel ranks is the trainer's job.
    """

    reward_mean: torch.Tensor
    """Mean r(x, a) of the sampled responses."""
    baseline_mean: torch.Tensor
    """Mean r(x, ā) of the greedy responses."""
    advantage_mean: torch.Tensor
    """Mean of d = r − r_greedy (or the baseline's advantage), before clipping."""
    advantage_std: torch.Tensor
    """Population standard deviation of d before clipping."""
    clip_frac: torch.Tensor
    """Fraction of rows whose d was changed by ``reward_clip`` (0 without clipping)."""
    win_frac: torch.Tensor
    """Fraction of rows where the sample beat the greedy response (d > 0)."""
    tie_frac: torch.Tensor
    """Fraction of rows with d == 0 (e.g. sample == greedy): they carry no reward signal."""
    kl_mean: torch.Tensor
    """Mean per-token KL term over the valid tokens (0 without ``kl``)."""
    kl_seq_mean: torch.Tensor
    """Mean over rows of the per-sequence KL sum Σ_t kl_t (0 without ``kl``)."""
    return_mean: torch.Tensor
    """Mean return R over the valid tokens (the release logs it as ``return``)."""
    return_max: torch.Tensor
    """Largest return over the valid tokens, 0 if there are none (the release's ``max_return``)."""
    response_length_mean: torch.Tensor
    """Mean number of valid tokens per row."""
    empty_frac: torch.Tensor
    """Fraction of rows with no valid token."""


def _remax_margins(rewards, baseline_rewards, reward_clip, clip_target, dtype):
    """ReMax's (B,) d = r − r_greedy after and before the clip, in ``dtype``: the greedy baseline
    of :func:`sequence_advantages` at k = 1 (one place for the clip conventions)."""
    r, b = rewards.detach().to(dtype), baseline_rewards.detach().to(dtype)
    return sequence_advantages(
        r, b, k=1, baseline=Baseline.greedy, reward_clip=reward_clip, clip_target=clip_target
    )


@torch.no_grad()
def remax_stats(
    rewards: torch.Tensor,
    baseline_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    kl: torch.Tensor | None = None,
    reward_clip: float | None = None,
    clip_target: ClipTarget | str = ClipTarget.advantage,
    margins: SequenceAdvantages | None = None,
) -> RemaxStats:
    """Diagnostics of a ReMax batch, for logging.

    Args:
        rewards: (B,) r(x, a).
        baseline_rewards: (B,) r(x, ā).
        response_mask: (B, T) bool, valid tokens.
        advantages: (B, T) output of :func:`remax_advantages`.
        kl: (B, T) per-token KL term, or None.
        reward_clip, clip_target: As passed to :func:`remax_advantages`, for ``clip_frac``.
        margins: The (B,) advantages before and after the clip when another baseline made them
            (:func:`sequence_advantages`); None: d = r − ``baseline_rewards`` as ReMax's.

    Returns:
        :class:`RemaxStats` of detached 0-dim tensors in the promoted float dtype of the inputs.
    """
    _check_rewards(rewards, baseline_rewards)
    mask = response_mask.bool()
    dtype = _float_dtype(rewards, baseline_rewards, advantages, kl)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    if margins is None:  # ReMax's d = r − r_greedy, (B,)
        margins = _remax_margins(rewards, baseline_rewards, reward_clip, clip_target, dtype)
    raw, clipped = margins.raw.to(dtype), margins.advantages.to(dtype)
    valid_adv = torch.where(mask, advantages.detach().to(dtype), zero)  # (B, T)
    if kl is None:
        kl_mean = kl_seq_mean = zero
    else:
        kl = kl.detach().to(dtype)
        kl_mean = masked_mean(kl, mask)
        kl_seq_mean = masked_sum(kl, mask, dim=1).mean() if mask.shape[0] else zero
    lengths = mask.sum(dim=1).to(dtype)  # (B,)

    def mean(x: torch.Tensor) -> torch.Tensor:  # 0 for an empty batch instead of NaN
        return x.to(dtype).mean() if x.numel() else zero

    return RemaxStats(
        reward_mean=mean(rewards.detach()),
        baseline_mean=mean(baseline_rewards.detach()),
        advantage_mean=mean(raw),
        advantage_std=raw.std(correction=0) if raw.numel() else zero,
        clip_frac=mean(clipped != raw),
        win_frac=mean(raw > 0),
        tie_frac=mean(raw == 0),
        kl_mean=kl_mean,
        kl_seq_mean=kl_seq_mean,
        return_mean=masked_mean(valid_adv, mask),
        return_max=torch.where(mask, valid_adv, -torch.inf).max() if mask.any() else zero,
        response_length_mean=mean(lengths),
        empty_frac=mean(lengths == 0),
    )
