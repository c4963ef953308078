"""Causal-LM policy: loading and realised-token log-probs.

Layout used everywhere (one notation): B batch, P prompt length (left-padded), T response length
(right-padded), V vocab. A sequence is ``[pad.. prompt | response | pad..]`` of length P + T with an
attention mask; position ids are the running count of attended tokens, the same convention the
rollout uses while decoding, so training-time log-probs equal experience-time ones (spec test 18).
"""

from __future__ import annotations

import logging

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from remax.algo.logprobs import logprobs_from_logits
from remax.config import ModelConfig
from remax.models import tiny

log = logging.getLogger("remax.models")

_DROPOUT_KEYS = (
    "dropout",
    "attention_dropout",
    "hidden_dropout",
    "activation_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "layerdrop",
)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[str(getattr(name, "value", name))]


def load_tokenizer(path: str | None):
    """The tiny in-process tokenizer (path None) or ``AutoTokenizer`` with left padding, pad = eos."""
    if path is None:
        return tiny.build_tokenizer()
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tok.pad_token_id is None:
        # The release asserts pad == eos for every model (remax-spec §3).
        tok.pad_token = tok.eos_token
    return tok


def disable_dropout(model: PreTrainedModel) -> None:
    """RL and reward scoring run with dropout off (release scripts), so logp is deterministic.

    Editing the config is not enough: some architectures (OPT, GPT-2-style) copy the probability
    into each layer as a plain float when the model is built and call ``F.dropout`` with it, so
    every module's float ``*dropout*`` attribute (and OPT's ``layerdrop``) is zeroed as well.
    """
    for key in _DROPOUT_KEYS:
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and ("dropout" in name or name == "layerdrop"):
                setattr(module, name, 0.0)


def load_policy(cfg: ModelConfig, *, seed: int, device: torch.device):
    """Return ``(model, tokenizer)``; a tiny random-init Llama when ``cfg.path`` is None."""
    tok = load_tokenizer(cfg.path)
    dtype = torch_dtype(cfg.dtype)
    if cfg.path is None:
        torch.manual_seed(seed)
        model = tiny.tiny_policy(_tiny_config(cfg, tok))
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype)
    model.to(device=device, dtype=dtype)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
    disable_dropout(model)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def _tiny_config(cfg: ModelConfig, tok, num_labels: int = 1):
    return tiny.llama_config(
        len(tok),
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        num_labels=num_labels,
    )


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions counting attended tokens only, so left padding does not shift a prompt."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logits(
    model: PreTrainedModel, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int
) -> torch.Tensor:
    """(B, T, V) logits scoring each response token: column t scores token P + t.

    Only the T logits that score the response are materialised (``logits_to_keep``), never the
    prompt's B × P × V.
    """
    T = sequences.shape[1] - prompt_len
    out = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        logits_to_keep=T + 1,
        use_cache=False,
    )
    return out.logits[:, :-1]  # logits at P + t − 1 score token P + t


def response_logprobs(
    model: PreTrainedModel,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: int,
) -> torch.Tensor:
    """Log-prob of each response token under ``model``.

    Args:
        sequences: (B, P + T) prompt and response token ids.
        attention_mask: (B, P + T).
        prompt_len: P; response token t sits at column P + t and is scored by logits at P + t − 1.

    Returns:
        (B, T) float32 log-probs (fp32 log-softmax, spec test 21).
    """
    logits = response_logits(model, sequences, attention_mask, prompt_len)
    return logprobs_from_logits(logits, sequences[:, prompt_len:])


def token_logprobs(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B, L−1) log-prob of tokens 1..L−1 given their prefix (SFT: mask selects response + EOS)."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
    )
    return logprobs_from_logits(out.logits[:, :-1], input_ids[:, 1:])
