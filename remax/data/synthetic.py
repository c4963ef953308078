"""An in-repo synthetic preference task with a programmatic gold score.

Prompt: 4–8 random letters from a 16-letter alphabet, then ``=``. Response: letters, then EOS.
The prompt has a topic: the half of the alphabet (``a``–``h`` or ``i``–``p``) holding most of its
letters (prompt lengths are odd, so there is no tie). Gold score: the fraction of response letters
from the topic's half (0 for an empty answer).

Why this task: SFT demonstrations are uniformly random letters, so imitation scores 0.5 on average
— the preference is *not* already satisfied by SFT, and RL has headroom to 1.0. It is learnable
from pairs and by RL in a few dozen steps of a 112k-parameter policy: the topic is a property of
the prompt's bag of letters, which one attention layer can average without position information
(a topic at a fixed position is much harder: rotary attention only sees relative positions). The preferred letters depend on the prompt, so
rewards differ across prompts and a per-prompt baseline such as ReMax's greedy one matters.

Everything is generated deterministically from a seed; train and held-out sets use disjoint
random streams.
"""

from __future__ import annotations

import random

ALPHABET = "abcdefghijklmnop"
SEPARATOR = "="
PROMPT_LENGTHS = (5, 7)  # odd: the majority half is always defined
RESPONSE_LEN = (3, 8)
# Preference pairs whose gold scores differ by less than this are skipped: ties carry no
# preference, and near-ties are label noise (real data sets also keep clear preferences).
MIN_PAIR_MARGIN = 0.2
PAIR_LENGTHS = (1, 14)
LONG_LENGTHS = (16, 20)
LONG_FRACTION = 0.25
SFT_GOOD_PROB = 0.5  # SFT learns the topic only partly (gold ≈ 0.75): RL has headroom to 1.0

_STREAMS = {"sft": 1, "preference": 2, "prompts": 3}
_SPLITS = {"train": 0, "eval": 1}


def preferred_letters(prompt: str) -> str:
    """The prompt's topic: the half of the alphabet holding most of its letters."""
    lower, upper = ALPHABET[: len(ALPHABET) // 2], ALPHABET[len(ALPHABET) // 2 :]
    letters = prompt.removesuffix(SEPARATOR)
    in_lower = sum(c in lower for c in letters)
    return lower if 2 * in_lower > len(letters) else upper


def gold_score(prompt: str, response: str) -> float:
    """Fraction of the response's letters from the prompt's topic half; 0.0 for an empty answer."""
    allowed = set(preferred_letters(prompt))
    letters = [c for c in response if c in ALPHABET]
    if not letters:
        return 0.0
    return sum(c in allowed for c in letters) / len(letters)


def gold_rewards(prompts: list[str], responses: list[str]) -> list[float]:
    """:func:`gold_score` of each row: the gold score as a reward function
    (``reward_model.kind=function reward_model.function=remax.data.synthetic:gold_rewards``)."""
    return [gold_score(p, r) for p, r in zip(prompts, responses)]


def _rng(seed: int, stream: str, split: str) -> random.Random:
    return random.Random(f"{seed}:{_STREAMS[stream]}:{_SPLITS[split]}")


def _prompt(rng: random.Random) -> str:
    n = rng.choice(PROMPT_LENGTHS)
    halves = (ALPHABET[: len(ALPHABET) // 2], ALPHABET[len(ALPHABET) // 2 :])
    topic = rng.randrange(2)
    # Letters lean towards a random topic half (3:1), so most prompts have a clear majority.
    letters = [
        rng.choice(halves[topic] if rng.random() < 0.75 else halves[1 - topic]) for _ in range(n)
    ]
    return "".join(letters) + SEPARATOR


def _response(rng: random.Random, prompt: str, good_prob: float, lengths=RESPONSE_LEN) -> str:
    """Each letter from the topic half with probability ``good_prob``, else uniform."""
    good = preferred_letters(prompt)
    n = rng.randint(*lengths)
    return "".join(rng.choice(good if rng.random() < good_prob else ALPHABET) for _ in range(n))


def sft_records(n: int, *, seed: int, split: str = "train") -> list[dict[str, str]]:
    """``n`` demonstrations ``{"prompt", "response"}`` with uniformly random responses."""
    rng = _rng(seed, "sft", split)
    out = []
    for _ in range(n):
        prompt = _prompt(rng)
        out.append({"prompt": prompt, "response": _response(rng, prompt, SFT_GOOD_PROB)})
    return out


def preference_records(n: int, *, seed: int, split: str = "train") -> list[dict[str, str]]:
    """``n`` pairs ``{"prompt", "chosen", "rejected"}``: chosen has the higher gold score."""
    rng = _rng(seed, "preference", split)
    out: list[dict[str, str]] = []
    while len(out) < n:
        # Responses of every quality (topic probability uniform in [0, 1]) so the RM sees the range
        # an improving policy will produce.
        # Lengths wider than the demonstrations', some past the reward model's ``max_seq_len`` (they
        # lose their EOS when truncated): the RM must score every ending an RL policy can produce,
        # including a response cut at the length cap, or RL exploits the unseen ones (length hacking).
        prompt = _prompt(rng)
        a, b = (
            _response(
                rng,
                prompt,
                rng.random(),
                LONG_LENGTHS if rng.random() < LONG_FRACTION else PAIR_LENGTHS,
            )
            for _ in range(2)
        )
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
