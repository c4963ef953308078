"""The critic-free baselines: ReMax, RLOO, GRPO and none, one table with one signature.

Notation: B prompts, k samples per prompt (``rollout.samples_per_prompt``). Rows are prompt-major:
row i·k + j is sample j of prompt i, the order ``repeat_interleave(k)`` gives.

Each function is the entry of one :class:`~remax.algo.types.Baseline` in
``remax.algo.registry.BASELINES``, with one keyword-only signature
``fn(*, rewards, k, greedy_rewards, std_norm) -> (B·k,)``: the sequence-level advantage A of each
sample, the scalar its Σ_t log π is weighted by before the KL shaping and discount of
:func:`remax.algo.remax.token_returns`. Inputs are detached.

| baseline | A_ij | expected gradient (seq_sum, exact: tests/algo/test_baselines.py) |
|---|---|---|
| ``greedy`` (ReMax) | r_ij − r(x_i, ā_i) | ∇E[r]: ā depends on θ and x, not on the sample |
| ``leave_one_out`` (RLOO) | r_ij − (Σ_{l≠j} r_il)/(k − 1) | ∇E[r]: the other samples are independent of j |
| ``group_norm``, no std (Dr. GRPO) | r_ij − mean_l r_il | (k − 1)/k · ∇E[r]: = (k − 1)/k · RLOO's A |
| ``group_norm`` (GRPO) | (r_ij − mean_l r_il)/(std_l r_il + ε) | biased: the std depends on sample j |
| ``none`` | r_ij | ∇E[r] (REINFORCE) |

The Dr. GRPO identity, with b_j the leave-one-out mean: mean = (r_j + (k − 1)·b_j)/k, so
r_j − mean = (k − 1)/k · (r_j − b_j). GRPO's std convention: the unbiased sample std (divisor k − 1, as
``torch.std``, verl and TRL), plus ε = :data:`GROUP_STD_EPS` (verl's) so a group of equal rewards
gets A = 0 rather than 0/0.
"""

from __future__ import annotations

import torch

__all__ = ["GROUP_STD_EPS", "greedy", "group_norm", "leave_one_out", "no_baseline"]

GROUP_STD_EPS = 1e-6
"""ε added to the group std of ``group_norm`` (verl's ``epsilon``): a group whose k rewards are
equal has std 0 and A = 0/ε = 0."""


def _groups(rewards: torch.Tensor, k: int, min_k: int) -> torch.Tensor:
    """(B·k,) rewards as (B, k) groups, refusing a k the baseline is not defined for."""
    if k < min_k:
        raise ValueError(f"this baseline needs k >= {min_k} samples per prompt, got k = {k}")
    if rewards.dim() != 1 or rewards.shape[0] % k:
        raise ValueError(f"rewards must be (B·k,) with k = {k}; got {tuple(rewards.shape)}")
    return rewards.detach().reshape(-1, k)


def greedy(*, rewards, k, greedy_rewards=None, std_norm=True) -> torch.Tensor:
    """ReMax: r − r(x, ā), the prompt's greedy reward repeated over its k samples."""
    groups = _groups(rewards, k, 1)
    if greedy_rewards is None or greedy_rewards.shape != groups.shape[:1]:
        shape = None if greedy_rewards is None else tuple(greedy_rewards.shape)
        raise ValueError(
            f"baseline 'greedy' needs greedy_rewards (B,) = ({groups.shape[0]},); got {shape}"
        )
    return (groups - greedy_rewards.detach().to(groups.dtype)[:, None]).reshape(-1)


def leave_one_out(*, rewards, k, greedy_rewards=None, std_norm=True) -> torch.Tensor:
    """RLOO: r_j − (Σ_l r_l − r_j)/(k − 1) within each prompt's group."""
    groups = _groups(rewards, k, 2)
    others = (groups.sum(1, keepdim=True) - groups) / (k - 1)  # (B, k)
    return (groups - others).reshape(-1)


def group_norm(*, rewards, k, greedy_rewards=None, std_norm=True) -> torch.Tensor:
    """GRPO: (r − group mean) / (unbiased group std + ε); ``std_norm=False``: r − group mean."""
    groups = _groups(rewards, k, 2)
    centred = groups - groups.mean(1, keepdim=True)  # (B, k)
    if std_norm:
        centred = centred / (groups.std(1, keepdim=True, correction=1) + GROUP_STD_EPS)
    return centred.reshape(-1)


def no_baseline(*, rewards, k, greedy_rewards=None, std_norm=True) -> torch.Tensor:
    """Vanilla REINFORCE: A = r."""
    return _groups(rewards, k, 1).reshape(-1)
