"""The one sampler: sampled and greedy decoding through one function.

ReMax's baseline is the greedy response of the same policy to the same prompt. Making it a flag of
the same decode (per row) means the baseline cannot drift from the policy's decoding — the
regression class remax-spec §8 lists for peers (greedy silently sampled, baseline built from the
sampled response). Sampled and greedy rows of a batch share one batched decode with a KV cache:
greedy rows take the argmax of the raw logits, so temperature/top-p/top-k cannot leak into them.

Notation: B batch, P prompt length (left-padded), T generated length (right-padded), V vocab.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch

from remax.algo.sampling import filter_logits
from remax.config.sampling import SamplingConfig
from remax.models.policy import position_ids


class Rollout(NamedTuple):
    """A decoded batch.

    Fields:
        prompt_ids: (B, P) left-padded prompts.
        prompt_mask: (B, P) bool.
        response: (B, T) generated ids, pad after the first EOS.
        response_mask: (B, T) bool, generated tokens up to and including the first EOS (all T if
            none was produced). Every row has at least one generated token.
        logprobs: (B, T) float, the decoding engine's log-prob of each generated token under the
            raw softmax (0 where masked), or None when the actor decoded (``hf``): only the
            off-policy gap metric reads it; the loss always uses the actor's own log-probs.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor | None = None

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def sequences(self) -> torch.Tensor:
        """(B, P + T)."""
        return torch.cat([self.prompt_ids, self.response], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + T) long."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1).long()

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) generated tokens, EOS included."""
        return self.response_mask.sum(-1)

    @property
    def end_index(self) -> torch.Tensor:
        """(B,) column of the first EOS after the prompt, or of the last token if none."""
        return self.prompt_len + self.lengths - 1

    def select(self, rows: torch.Tensor | slice) -> Rollout:
        return Rollout(*(None if t is None else t[rows] for t in self))


def _cache_kw(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); accept either generation."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    sampling: SamplingConfig,
    *,
    greedy: bool | torch.Tensor,
    eos_token_id: int,
    pad_token_id: int,
    all_finished=None,
) -> Rollout:
    """Decode a response for every prompt.

    Args:
        model: an HF causal LM.
        prompt_ids: (B, P) left-padded.
        prompt_mask: (B, P).
        sampling: decoding of sampled rows.
        greedy: True/False for all rows, or a (B,) bool tensor choosing greedy rows.
        eos_token_id: the stop token (a trained action, kept in ``response_mask``).
        pad_token_id: written after a row's EOS.
        all_finished: ``(this_rank_done: bool) -> bool``, whether every rank is done. Ranks whose
            forwards are collective (ZeRO-3 gathering layer by layer) must run the same number of
            decoding steps; a rank that finished early decodes padding until all are done.

    Sampling draws from torch's global RNG of the model's device, so a run is reproducible from
    its saved RNG state.
    """
    B = prompt_ids.shape[0]
    device = prompt_ids.device
    greedy_rows = torch.as_tensor(greedy, device=device).expand(B)
    attention = prompt_mask.long()
    positions = position_ids(attention)
    was_training = model.training
    model.eval()
    out = model(
        input_ids=prompt_ids,
        attention_mask=attention,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
    )
    next_pos = positions[:, -1:] + 1  # (B, 1)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, valid = [], []
    for _ in range(sampling.max_new_tokens):
        logits = out.logits[:, -1].float()  # (B, V)
        sampled = torch.multinomial(
            filter_logits(
                logits, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k
            ).softmax(-1),
            1,
        ).squeeze(-1)
        token = torch.where(greedy_rows, logits.argmax(-1), sampled)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        valid.append(~finished)
        finished = finished | (token == eos_token_id)
        done = bool(finished.all())
        if all_finished(done) if all_finished is not None else done:
            break
        attention = torch.cat([attention, attention.new_ones(B, 1)], dim=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=attention,
            position_ids=next_pos,
            use_cache=True,
            **{_cache_kw(model): _cache(out)},
        )
        next_pos = next_pos + 1
    model.train(was_training)
    return Rollout(prompt_ids, prompt_mask.bool(), torch.stack(tokens, 1), torch.stack(valid, 1))
