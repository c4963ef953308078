"""PPO baseline maths as DeepSpeed-Chat defines it (remax-spec §7).

Reference: DeepSpeedExamples `applications/DeepSpeed-Chat/dschat/rlhf/ppo_trainer.py`
(`compute_rewards`, `get_advantages_and_returns`, `actor_loss_fn`, `critic_loss_fn`), whose
defaults are kl_ctl 0.1, clip_reward_value 5, cliprange 0.2, cliprange_value 0.2, γ 1.0, λ 0.95.
The trainer owns those values; here they are keyword arguments.

Departures from the DS-Chat functions, all deliberate:
- The RM score goes on the last token where `response_mask` is True. DS-Chat's end index has a
  "+1" (one past the last unmasked token, i.e. the EOS that pad == eos masks out); we express the
  same thing by letting the caller put EOS inside the mask, as the ReMax release does (spec §7).
- Masked positions are replaced by zeros with `torch.where` before any arithmetic, so NaN/inf
  garbage there cannot leak into losses or gradients (DS-Chat multiplies by the mask, and
  0 · inf = NaN). Rows or batches without valid tokens give zeros, where DS-Chat divides by 0
  (`masked_mean` clamps the token count at 1).
- No advantage whitening: DS-Chat's PPO trainer does not whiten advantages or rewards (neither
  `dschat/rlhf/ppo_trainer.py` nor the older `training/step3_rlhf_finetuning/ppo_trainer.py`),
  so there is no `whiten_advantages` here; adding one would change the baseline being compared.
- The losses also return stats (clip fractions, approximate KL) as detached tensors.

Notation: B batch, T response length. Every (B, T) tensor is aligned so that column t is the
t-th response token; `response_mask` is (B, T) bool, True on valid tokens, contiguous from
column 0 (right padding).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from remax.algo.masked import masked_mean

__all__ = [
    "PolicyLossStats",
    "ValueLossStats",
    "gae_advantages",
    "ppo_policy_loss",
    "ppo_rewards",
    "ppo_value_loss",
]


class PolicyLossStats(NamedTuple):
    """Detached scalar diagnostics of `ppo_policy_loss`, each a token mean over the mask.

    Attributes:
        clip_fraction: Share of valid tokens where the clipped surrogate is strictly the larger
            loss, i.e. where the clip removed the gradient.
        approx_kl: k3 estimate of KL(π_old ‖ π), (ratio − 1) − log ratio: non-negative per token
            and unbiased under samples from π_old (Schulman, "Approximating KL divergence").
        ratio_mean: Mean importance ratio π/π_old; exactly 1 on the first on-policy minibatch.
    """

    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor


class ValueLossStats(NamedTuple):
    """Detached scalar diagnostics of `ppo_value_loss`, each a token mean over the mask.

    Attributes:
        clip_fraction: Share of valid tokens where the clipped squared error is strictly larger.
        values_mean: Mean predicted value.
        mse: Mean unclipped squared error (v − R)².
    """

    clip_fraction: torch.Tensor
    values_mean: torch.Tensor
    mse: torch.Tensor


def _check_shapes(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(
            f"expected (B, T) tensors of one shape, got {shapes}; slice prompt positions off and "
            "pad every tensor to the same response length"
        )


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}; pass a positive float")


def ppo_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    kl_coef: float,
    reward_clip: float | None = None,
) -> torch.Tensor:
    """Per-token PPO rewards: k1 KL penalty on every token plus the RM score on the last one.

    r_t = −kl_coef · (logprobs_t − ref_logprobs_t) for every valid t, and
    r_{n−1} += clip(scores, −reward_clip, reward_clip) for the row's last valid token n − 1.

    Args:
        scores: (B,) reward-model score of each response.
        logprobs: (B, T) log π_old of the sampled tokens (experience time, no grad needed).
        ref_logprobs: (B, T) log π_ref of the same tokens.
        response_mask: (B, T) bool, contiguous from column 0.
        kl_coef: β ≥ 0 (DS-Chat `kl_ctl`, 0.1).
        reward_clip: Clip the raw score to ±reward_clip before adding it (DS-Chat
            `clip_reward_value`, 5); None leaves it unclipped.

    Returns:
        (B, T) rewards in `logprobs.dtype`, zero on masked positions and on empty rows.

    Raises:
        ValueError: On mismatched shapes, a negative `kl_coef`, a non-positive `reward_clip`,
            or a mask with holes (the last-token placement needs a contiguous mask).
    """
    _check_shapes(logprobs=logprobs, ref_logprobs=ref_logprobs, response_mask=response_mask)
    if tuple(scores.shape) != (logprobs.shape[0],):
        raise ValueError(f"scores must be (B,) = ({logprobs.shape[0]},), got {tuple(scores.shape)}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}; use 0 to disable the KL reward")
    if reward_clip is not None:
        _check_positive("reward_clip", reward_clip)
    mask = response_mask.bool()
    lengths = mask.sum(dim=1)  # (B,)
    cols = torch.arange(mask.shape[1], device=mask.device)  # (T,)
    if not torch.equal(mask, cols < lengths[:, None]):
        raise ValueError(
            "response_mask must be contiguous from column 0 (right padding only); got rows with "
            "holes or left padding. Slice the prompt off and right-pad the responses"
        )

    with torch.no_grad():
        # k1 estimator, as DS-Chat `compute_rewards`: kl_divergence_estimate = -kl_ctl * (lp - ref).
        kl = -kl_coef * (logprobs - ref_logprobs)  # (B, T)
        rewards = torch.where(mask, kl, torch.zeros_like(kl))
        score = scores.to(rewards.dtype)
        if reward_clip is not None:
            # DS-Chat clips the raw RM score, not the total reward (spec §4 row 8).
            score = score.clamp(-reward_clip, reward_clip)
        # An empty row has lengths - 1 = -1, which matches no column, so it gets no score.
        is_last = cols == (lengths - 1)[:, None]  # (B, T)
        return rewards + torch.where(is_last, score[:, None], torch.zeros_like(rewards))


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) with V = 0 after the last token.

    δ_t = r_t + γ · V_{t+1} − V_t, A_t = δ_t + γλ · A_{t+1}, returns R_t = A_t + V_t, where
    V_{t+1} and A_{t+1} are 0 past the row's last valid token (the response is terminal).

    Args:
        rewards: (B, T) per-token rewards, e.g. from `ppo_rewards`.
        values: (B, T) critic values V(s_t) at experience time.
        response_mask: (B, T) bool, contiguous from column 0. A masked position is treated as an
            episode boundary, so with a contiguous mask this is exactly "V = 0 after the end".
        gamma: Discount in (0, 1] (DS-Chat 1.0).
        lam: GAE λ in [0, 1] (DS-Chat 0.95); λ = 1 gives Monte-Carlo returns, λ = 0 TD(0).

    Returns:
        (advantages, returns), both (B, T) in `rewards.dtype`, detached, zero on masked
        positions.

    Raises:
        ValueError: On mismatched shapes or `gamma`/`lam` out of range.
    """
    _check_shapes(rewards=rewards, values=values, response_mask=response_mask)
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if not 0 <= lam <= 1:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    mask = response_mask.bool()
    # Advantages and returns are regression/surrogate targets: DS-Chat builds them under
    # no_grad and detaches them, so no gradient may flow into the critic through them.
    with torch.no_grad():
        zeros = torch.zeros_like(rewards)
        # DS-Chat zeroes rewards and values after the end index before its GAE loop
        # ("otherwise the advantage/return will be wrong"); `where` also discards NaN there.
        rewards = torch.where(mask, rewards, zeros)
        values = torch.where(mask, values.to(rewards.dtype), zeros)
        advantages = torch.empty_like(rewards)
        next_value = zeros[:, 0]  # (B,)
        next_adv = zeros[:, 0]  # (B,)
        # Reverse loop over T, vectorised over B, like DS-Chat's (itself from trlx).
        for t in range(rewards.shape[1] - 1, -1, -1):
            m = mask[:, t]
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            adv = torch.where(m, delta + gamma * lam * next_adv, zeros[:, t])
            advantages[:, t] = adv
            next_adv = adv
            next_value = values[:, t]  # already 0 where masked
        returns = advantages + values
    return advantages, returns


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """PPO-clip surrogate, −min(ρ·A, clip(ρ, 1 − ε, 1 + ε)·A), token mean over the batch.

    Args:
        logprobs: (B, T) log π of the sampled tokens, with grad (training-time forward).
        old_logprobs: (B, T) log π_old from experience time; treated as a constant.
        advantages: (B, T) e.g. from `gae_advantages`; treated as a constant.
        response_mask: (B, T) bool.
        clip_range: ε > 0 (DS-Chat `cliprange`, 0.2).

    Returns:
        (loss, stats): a 0-dim loss in `logprobs.dtype`, the sum over valid tokens divided by their
        count over the whole batch (DS-Chat `actor_loss_fn`; 0 when there are none), and
        `PolicyLossStats`.

    Raises:
        ValueError: On mismatched shapes or a non-positive `clip_range`.
    """
    _check_shapes(
        logprobs=logprobs,
        old_logprobs=old_logprobs,
        advantages=advantages,
        response_mask=response_mask,
    )
    _check_positive("clip_range", clip_range)
    mask = response_mask.bool()
    zeros = torch.zeros_like(logprobs)
    # DS-Chat masks the log-ratio before exp, so padding cannot overflow exp; `where` also keeps
    # NaN/inf at masked positions out of the backward pass (0 * inf would be NaN).
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), zeros)  # (B, T)
    ratio = torch.exp(log_ratio)
    adv = torch.where(mask, advantages.detach(), zeros)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = PolicyLossStats(
            clip_fraction=masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            approx_kl=masked_mean((ratio - 1) - log_ratio, mask),
            ratio_mean=masked_mean(ratio, mask),
        )
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_range_value: float = 0.2,
) -> tuple[torch.Tensor, ValueLossStats]:
    """Clipped value loss, 0.5 · max((v − R)², (clip(v, v_old ± c) − R)²), token mean.

    Args:
        values: (B, T) critic values with grad (training-time forward).
        old_values: (B, T) critic values from experience time; treated as a constant.
        returns: (B, T) targets, e.g. from `gae_advantages`; treated as a constant.
        response_mask: (B, T) bool.
        clip_range_value: c > 0 (DS-Chat `cliprange_value`, 0.2), in units of the value itself.

    Returns:
        (loss, stats): a 0-dim loss in `values.dtype`, summed over valid tokens and divided by
        their count (DS-Chat `critic_loss_fn`; 0 when there are none), and `ValueLossStats`.

    Raises:
        ValueError: On mismatched shapes or a non-positive `clip_range_value`.
    """
    _check_shapes(
        values=values, old_values=old_values, returns=returns, response_mask=response_mask
    )
    _check_positive("clip_range_value", clip_range_value)
    mask = response_mask.bool()
    zeros = torch.zeros_like(values)
    v = torch.where(mask, values, zeros)
    old = torch.where(mask, old_values.detach(), zeros)
    ret = torch.where(mask, returns.detach(), zeros)
    # Same form as DS-Chat: clamp with tensor bounds around the experience-time value.
    v_clipped = torch.clamp(v, old - clip_range_value, old + clip_range_value)
    err = (v - ret) ** 2
    err_clipped = (v_clipped - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = ValueLossStats(
            clip_fraction=masked_mean((err_clipped > err).to(v.dtype), mask),
            values_mean=masked_mean(v, mask),
            mse=masked_mean(err, mask),
        )
    return loss, stats
