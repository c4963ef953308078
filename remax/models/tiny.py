"""Tiny random-init Llama models and an in-process character tokenizer: no hub, no network.

The CPU default of every stage and the fixture of every test. The tokenizer covers the synthetic
task's alphabet (``remax.data.synthetic``) and is saved with ``save_pretrained`` like any other, so
an ``export/`` of a tiny run loads with ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

EOS = "<eos>"
UNK = "<unk>"
BOS = "<bos>"
# pad == eos for every model, as in the release (remax-spec §3); attention masks carry the padding.
# BOS is distinct from EOS and the tokenizer prefixes it, as Llama's does, so every test sees the
# special-token rule of remax-spec §3 (``data.special_tokens``) at work.
CHARS = list(string.ascii_lowercase) + list(" =:.,?!\n")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; ids 0/1 are EOS(=pad)/UNK, the last id is BOS, which the
    tokenizer's call prefixes (as Llama's ``<s>``). Left padding, as RL prompts need."""
    vocab = {EOS: 0, UNK: 1} | {c: i + 2 for i, c in enumerate(CHARS)}
    vocab[BOS] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    # transformers 5: padding_side must be a constructor argument or it is not saved.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=UNK,
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )


def llama_config(
    vocab_size: int,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    eos_token_id: int = 0,
    bos_token_id: int | None = None,
    num_labels: int = 1,
    max_position_embeddings: int = 128,
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=eos_token_id if bos_token_id is None else bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        num_labels=num_labels,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )


def tiny_policy(config: LlamaConfig) -> LlamaForCausalLM:
    return LlamaForCausalLM(config)


def tiny_reward_model(config: LlamaConfig) -> LlamaForSequenceClassification:
    return LlamaForSequenceClassification(config)
