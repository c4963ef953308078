"""Scalar-head reward model read at the end token.

Stored as an HF ``*ForSequenceClassification`` checkpoint with ``num_labels=1`` (backbone plus a
bias-free linear ``score`` head, like DeepSpeed-Chat's ``v_head``), so any tool can load the export.
The score is NOT HF's pooling (last non-pad token, which with pad == eos would skip the EOS): it is
read at an explicit end index, the first EOS after the prompt or the last position when no EOS was
produced (remax-spec §3, ``forward_value``).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from remax.config import ModelConfig
from remax.models import tiny
from remax.models.policy import (
    _tiny_config,
    disable_dropout,
    load_tokenizer,
    position_ids,
    torch_dtype,
)


def load_reward_model(cfg: ModelConfig | None, *, path: str | None = None, seed: int, device):
    """Return ``(model, tokenizer)``: from ``path``/``cfg.path``, or tiny random-init when both None."""
    path = path if path is not None else (cfg.path if cfg is not None else None)
    cfg = cfg if cfg is not None else ModelConfig()
    tok = load_tokenizer(path)
    dtype = torch_dtype(cfg.dtype)
    if path is None:
        torch.manual_seed(seed)
        model = tiny.tiny_reward_model(_tiny_config(cfg, tok, num_labels=1))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
    model.to(device=device, dtype=dtype)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
    disable_dropout(model)
    return model, tok


def score(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    end_index: torch.Tensor,
) -> torch.Tensor:
    """Reward of each sequence.

    Args:
        input_ids: (B, L).
        attention_mask: (B, L).
        end_index: (B,) column of the end token (first EOS after the prompt, else the last one).

    Returns:
        (B,) float32 scores; differentiable (the reward-model stage trains through it).
    """
    hidden = model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
    ).last_hidden_state  # (B, L, H)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    end_hidden = hidden[rows, end_index]  # (B, H): only the end token goes through the head
    return model.score(end_hidden).squeeze(-1).float()
