"""Records → tensors: left-padded prompt batches, response-masked SFT examples, preference pairs.

Every sequence is left-padded, so in SFT and reward-model batches the end token (the EOS after the
response) is the last column; RL batches append the response on the right (``remax.rollout``).
Prompts are left-truncated to their last ``max_prompt_len`` tokens (release data_utils). Every
stage builds its sequences here, under one special-token rule (``data.special_tokens``,
remax-spec §3): the tokenizer's prefix (BOS) once at the start, never twice after a chat template
that renders it; responses get no special tokens, only the EOS.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class PromptBatch(NamedTuple):
    """input_ids (B, P) left-padded; attention_mask (B, P) bool."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


class SFTBatch(NamedTuple):
    """input_ids, attention_mask (B, L); loss_mask (B, L−1) bool over the targets ``input_ids[:, 1:]``:
    response tokens and the EOS, never prompt or padding (spec test 23)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor


class PairBatch(NamedTuple):
    """chosen / rejected (input_ids, attention_mask), each (B, L) left-padded: end token at L − 1."""

    chosen_ids: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_ids: torch.Tensor
    rejected_mask: torch.Tensor


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = True
    return ids.to(device), mask.to(device)


def encode(tokenizer, text: str) -> list[int]:
    """The text's own tokens, no special tokens added (responses, and prompts with the switch off)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer's own call puts before any text: ``[BOS]`` for Llama and Mistral,
    ``[</s>]`` for OPT, ``[]`` for GPT-2 (its ``<|endoftext|>`` is never prefixed)."""
    plain = encode(tokenizer, "a")
    full = tokenizer("a")["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return full[:k]
    return []


def sequence_start(tokenizer, text: str, special_tokens: bool = True) -> list[int]:
    """The tokens of a text that starts a sequence, under the one special-token rule of every
    stage (remax-spec §3): with ``special_tokens``, the tokenizer's prefix (BOS) comes first
    exactly once: a text that already starts with it (a chat template that renders
    ``{{ bos_token }}``, as Mistral-Instruct's) gets no second one."""
    return _start(encode(tokenizer, text), special_prefix(tokenizer) if special_tokens else [])


def _start(ids: list[int], prefix: list[int]) -> list[int]:
    return ids if ids[: len(prefix)] == prefix else prefix + ids


def prompt_ids(
    tokenizer, prompt: str, max_prompt_len: int, special_tokens: bool = True
) -> list[int]:
    """:func:`sequence_start` of the prompt, left-truncated to ``max_prompt_len`` tokens; the
    prefix survives the truncation (every sequence of every stage starts with it)."""
    prefix = special_prefix(tokenizer) if special_tokens else []  # one probe per prompt
    ids, n = _start(encode(tokenizer, prompt), prefix), len(prefix)
    keep = max(max_prompt_len - n, 0)
    return ids[:n] + ids[len(ids) - keep :] if len(ids) - n > keep else ids


def _prompt_response(
    tokenizer, prompt: str, response: str, max_prompt_len: int, max_seq_len: int, special: bool
):
    p = prompt_ids(tokenizer, prompt, max_prompt_len, special)
    r = encode(tokenizer, response) + [tokenizer.eos_token_id]
    r = r[: max(1, max_seq_len - len(p))]  # truncated responses lose their EOS, as in the release
    return p, r


def collate_prompts(
    tokenizer, prompts: list[str], max_prompt_len: int, device, *, special_tokens: bool = True
) -> PromptBatch:
    """Left-truncated, left-padded prompts (``special_tokens``: see :func:`prompt_ids`)."""
    rows = [prompt_ids(tokenizer, p, max_prompt_len, special_tokens) for p in prompts]
    return PromptBatch(*_left_pad(rows, tokenizer.pad_token_id, device))


def collate_sft(
    tokenizer,
    records: list[dict],
    max_prompt_len: int,
    max_seq_len: int,
    device,
    *,
    special_tokens: bool = True,
) -> SFTBatch:
    rows, targets = [], []
    for rec in records:
        p, r = _prompt_response(
            tokenizer, rec["prompt"], rec["response"], max_prompt_len, max_seq_len, special_tokens
        )
        rows.append(p + r)
        targets.append([0] * len(p) + [1] * len(r))
    ids, mask = _left_pad(rows, tokenizer.pad_token_id, device)
    target_mask, _ = _left_pad(targets, 0, device)
    return SFTBatch(ids, mask, target_mask[:, 1:].bool())


def collate_pairs(
    tokenizer,
    records: list[dict],
    max_prompt_len: int,
    max_seq_len: int,
    device,
    *,
    special_tokens: bool = True,
) -> PairBatch:
    def row(prompt: str, response: str) -> list[int]:
        p, r = _prompt_response(
            tokenizer, prompt, response, max_prompt_len, max_seq_len, special_tokens
        )
        return p + r

    chosen = [row(r["prompt"], r["chosen"]) for r in records]
    rejected = [row(r["prompt"], r["rejected"]) for r in records]
    return PairBatch(
        *_left_pad(chosen, tokenizer.pad_token_id, device),
        *_left_pad(rejected, tokenizer.pad_token_id, device),
    )


class EpochSampler:
    """Deterministic shuffled batches with a resumable position.

    The order of epoch ``e`` is a permutation seeded by ``(seed, e)``, so the state is just
    ``(epoch, position)``: a resumed run draws exactly the batches an uninterrupted one would.
    An incomplete last batch is dropped (every step sees ``batch_size`` examples).
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int) -> None:
        if num_examples < batch_size:
            raise ValueError(
                f"dataset has {num_examples} examples, fewer than train.batch_size={batch_size}: "
                "use a smaller batch or more data"
            )
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.epoch, self.position = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_examples, generator=g)

    def next_indices(self) -> list[int]:
        if self.position + self.batch_size > self.num_examples:
            self.epoch, self.position = self.epoch + 1, 0
        idx = self._order()[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return idx.tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
