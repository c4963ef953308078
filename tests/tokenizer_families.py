"""Tokenizers of the real model families, built in-process (no download), each with a tiny model.

What matters for the token plumbing is each family's special tokens, not its vocabulary, so every
tokenizer here is character-level over printable ASCII (exact decode/encode round trips) with the
family's own special tokens, post-processor and chat template:

- ``llama2``: ``<s>`` BOS added by the tokenizer, ``</s>`` EOS, no pad (Llama-2-7b-hf);
- ``mistral``: as Llama-2, plus Mistral-7B-Instruct-v0.2's chat template, which renders
  ``{{ bos_token }}[INST] ... [/INST]`` itself;
- ``llama3``: ``<|begin_of_text|>`` BOS, ``<|eot_id|>`` EOS and header tokens in the template;
- ``opt``: ``</s>`` is BOS, EOS and (with ``<pad>``) the tokenizer prefixes it (facebook/opt-*);
- ``gpt2``: nothing added, no pad; ``<|endoftext|>`` is its BOS/EOS name but never prefixed.

``save_family(name, dir)`` writes ``dir`` as an HF checkpoint (tokenizer + a tiny random-init
model of the family's architecture), so tests load it exactly as users load a hub model.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import NamedTuple

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
)

CHARS = list(string.ascii_letters + string.digits + string.punctuation + " \n")

MISTRAL_CHAT = (  # Mistral-7B-Instruct-v0.2's template, shortened to the user/assistant turns
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)
LLAMA3_CHAT = (  # Meta-Llama-3-8B-Instruct's template, without the date line
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


class Family(NamedTuple):
    specials: list[str]  # special tokens, in id order (ids 0..)
    bos: str | None  # the tokenizer's bos_token
    eos: str
    pad: str | None
    prefix: str | None  # what the tokenizer's own call puts before the text
    chat_template: str | None
    arch: str  # llama | mistral | opt | gpt2


FAMILIES = {
    "llama2": Family(["<unk>", "<s>", "</s>"], "<s>", "</s>", None, "<s>", None, "llama"),
    "mistral": Family(
        ["<unk>", "<s>", "</s>"], "<s>", "</s>", None, "<s>", MISTRAL_CHAT, "mistral"
    ),
    "llama3": Family(
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
        + ["<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
        None,
        "<|begin_of_text|>",
        LLAMA3_CHAT,
        "llama",
    ),
    "opt": Family(["<pad>", "</s>", "<unk>"], "</s>", "</s>", "<pad>", "</s>", None, "opt"),
    "gpt2": Family(["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", None, None, None, "gpt2"),
}
# The families whose tokenizer adds a BOS (all but GPT-2).
WITH_BOS = [name for name, f in FAMILIES.items() if f.prefix is not None]


def build_family_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """The family's tokenizer as ``from_pretrained`` returns it (no pad where the family has none)."""
    fam = FAMILIES[name]
    vocab = {s: i for i, s in enumerate(fam.specials)}
    vocab |= {c: i + len(vocab) for i, c in enumerate(CHARS)}
    unk = "<unk>" if "<unk>" in vocab else fam.eos
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if fam.prefix is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{fam.prefix} $A", special_tokens=[(fam.prefix, vocab[fam.prefix])]
        )
    kwargs = {"bos_token": fam.bos, "eos_token": fam.eos, "unk_token": unk}
    if fam.pad is not None:
        kwargs["pad_token"] = fam.pad
    extra = [s for s in fam.specials if s not in kwargs.values()]
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        additional_special_tokens=extra,
        model_input_names=["input_ids", "attention_mask"],
        **kwargs,
    )
    out.chat_template = fam.chat_template
    return out


def tiny_family_model(name: str, tok, seed: int = 0):
    """A random-init causal LM of the family's architecture, a few thousand parameters."""
    fam = FAMILIES[name]
    torch.manual_seed(seed)
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    }
    small = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64}
    heads = {"num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1}
    if fam.arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**small, **heads, **ids)).eval()
    if fam.arch == "mistral":
        return MistralForCausalLM(MistralConfig(**small, **heads, **ids)).eval()
    if fam.arch == "opt":
        config = OPTConfig(
            vocab_size=len(tok),
            hidden_size=32,
            ffn_dim=64,
            word_embed_proj_dim=32,
            num_hidden_layers=1,
            num_attention_heads=1,
            max_position_embeddings=128,
            **ids,
        )
        return OPTForCausalLM(config).eval()
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=1, n_positions=128, **ids)
    return GPT2LMHeadModel(config).eval()


def save_family(name: str, path: Path) -> Path:
    """``path`` as a checkpoint of the family: tokenizer and tiny model, loadable offline."""
    tok = build_family_tokenizer(name)
    tok.save_pretrained(path)
    tiny_family_model(name, tok).save_pretrained(path)
    return path
