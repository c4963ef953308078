"""Tiny SFT and reward-model exports built the way a user saves any HF model (``save_pretrained``),
so stages run on the real path (``model.path``, ``reward_model.path``) without a hub."""

from __future__ import annotations

from pathlib import Path

import torch

from remax.models.tiny import build_tokenizer, llama_config, tiny_policy, tiny_reward_model


def save_tiny_exports(root: Path) -> tuple[Path, Path]:
    """Write ``root/sft`` (causal LM) and ``root/rm`` (scalar head); return both paths."""
    tok = build_tokenizer()
    config = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    paths = []
    for name, build, seed in (("sft", tiny_policy, 0), ("rm", tiny_reward_model, 1)):
        torch.manual_seed(seed)
        model = build(llama_config(len(tok), **config))
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths.append(root / name)
    return paths[0], paths[1]
