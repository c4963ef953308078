"""An in-repo synthetic preference task with a programmatic gold score.

Prompt: 4–8 random letters from a 16-letter alphabet, then ``=``. Response: letters, then EOS.
Gold score: the fraction of response letters that occur in the prompt (0 for an empty answer).

Why this task: SFT demonstrations are uniformly random letters, so an SFT policy scores only about
``|set(prompt)| / 16`` ≈ 0.3 — the preference is *not* already satisfied by imitation. It is
learnable from pairs (a reward model must compare response letters with prompt letters, which two
attention layers can do) and by RL (copying prompt letters is easy for attention). The reward
depends on the prompt, so a per-prompt baseline such as ReMax's greedy one matters.

Everything is generated deterministically from a seed; train and held-out sets use disjoint
random streams.
"""

from __future__ import annotations

import random

ALPHABET = "abcdefghijklmnop"
SEPARATOR = "="
PROMPT_LEN = (4, 8)
RESPONSE_LEN = (3, 8)
# Preference pairs whose gold scores differ by less than this are skipped: ties carry no
# preference, and near-ties are label noise (real data sets also keep clear preferences).
MIN_PAIR_MARGIN = 0.2

_STREAMS = {"sft": 1, "preference": 2, "prompts": 3}
_SPLITS = {"train": 0, "eval": 1}


def gold_score(prompt: str, response: str) -> float:
    """Fraction of the response's letters that appear in the prompt; 0.0 for an empty answer."""
    allowed = set(prompt.removesuffix(SEPARATOR))
    letters = [c for c in response if c in ALPHABET]
    if not letters:
        return 0.0
    return sum(c in allowed for c in letters) / len(letters)


def _rng(seed: int, stream: str, split: str) -> random.Random:
    return random.Random(f"{seed}:{_STREAMS[stream]}:{_SPLITS[split]}")


def _prompt(rng: random.Random) -> str:
    n = rng.randint(*PROMPT_LEN)
    return "".join(rng.choice(ALPHABET) for _ in range(n)) + SEPARATOR


def _response(rng: random.Random) -> str:
    n = rng.randint(*RESPONSE_LEN)
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def sft_records(n: int, *, seed: int, split: str = "train") -> list[dict[str, str]]:
    """``n`` demonstrations ``{"prompt", "response"}`` with uniformly random responses."""
    rng = _rng(seed, "sft", split)
    return [{"prompt": _prompt(rng), "response": _response(rng)} for _ in range(n)]


def preference_records(n: int, *, seed: int, split: str = "train") -> list[dict[str, str]]:
    """``n`` pairs ``{"prompt", "chosen", "rejected"}``: chosen has the higher gold score."""
    rng = _rng(seed, "preference", split)
    out: list[dict[str, str]] = []
    while len(out) < n:
        prompt, a, b = _prompt(rng), _response(rng), _response(rng)
        ga, gb = gold_score(prompt, a), gold_score(prompt, b)
        if abs(ga - gb) < MIN_PAIR_MARGIN:
            continue
        chosen, rejected = (a, b) if ga > gb else (b, a)
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def prompt_records(n: int, *, seed: int, split: str = "train") -> list[dict[str, str]]:
    """``n`` RL prompts ``{"prompt"}``."""
    rng = _rng(seed, "prompts", split)
    return [{"prompt": _prompt(rng)} for _ in range(n)]
