"""Reward functions the tests name as ``reward_model.function=tests.reward_functions:<name>``."""

from __future__ import annotations

from remax.data import synthetic


def topic_margin(prompts: list[str], responses: list[str]) -> list[float]:
    """+1 per response letter from the prompt's topic half, −1 per other letter, over the letters
    (2 · gold − 1; −1 for an answer without letters): a rule-based reward, not the gold score."""
    out = []
    for prompt, response in zip(prompts, responses):
        topic = set(synthetic.preferred_letters(prompt))
        letters = [c for c in response if c in synthetic.ALPHABET]
        out.append(sum(1 if c in topic else -1 for c in letters) / len(letters) if letters else -1)
    return out


def fails_on_z(prompts: list[str], responses: list[str]) -> list[float]:
    """Raises for a response containing ``z``: the error must name that row."""
    return [1.0 / ("z" not in r) for r in responses]


def wrong_length(prompts: list[str], responses: list[str]) -> list[float]:
    return [0.0]


def not_finite(prompts: list[str], responses: list[str]) -> list[float]:
    return [float("nan") if i == 1 else 0.0 for i in range(len(prompts))]


def slow_topic_margin(prompts: list[str], responses: list[str]) -> list[float]:
    """:func:`topic_margin`, 3 s late: steps longer than a signal's guard window."""
    import time

    time.sleep(3)
    return topic_margin(prompts, responses)


def paced_topic_margin(prompts: list[str], responses: list[str]) -> list[float]:
    """:func:`topic_margin`, 2 s late: a 2×2 run long enough for a real time limit or a
    preemption to land mid-run (its steps otherwise take 0.2 s); the same rewards, so the same
    export as an unpaced run."""
    import time

    time.sleep(2)
    return topic_margin(prompts, responses)


def lightly_paced_topic_margin(prompts: list[str], responses: list[str]) -> list[float]:
    """:func:`topic_margin`, 0.5 s late: a node can be taken down between two checkpoints."""
    import time

    time.sleep(0.5)
    return topic_margin(prompts, responses)


def fails_on_rank_3(prompts: list[str], responses: list[str]) -> list[float]:
    """Raises on the fourth rank only: the failure record must name that rank."""
    import os

    if os.environ.get("SLURM_PROCID") == "3":
        raise RuntimeError("reward server unreachable from rank 3")
    return topic_margin(prompts, responses)


def hangs_on_rank_3_once(prompts: list[str], responses: list[str]) -> list[float]:
    """Never returns on the fourth rank at its fifth call of the job's first segment (a stuck
    reward server); :func:`topic_margin` everywhere else."""
    import os
    import time

    global _CALLS
    _CALLS += 1
    first_segment = os.environ.get("SLURM_RESTART_COUNT", "0") == "0"
    if os.environ.get("SLURM_PROCID") == "3" and first_segment and _CALLS == 5:
        time.sleep(3600)
    return topic_margin(prompts, responses)


_CALLS = 0
