"""A reward never depends on what else is in the batch (issue 19, item 4).

Third-party reward models come with pad ids that disagree with their tokenizer's, or none at all.
HF's sequence classifier pools at the last token that is not ``config.pad_token_id``: a batch
right-padded with another id is read at a padding column, and with pad set to EOS a text that
ends in EOS is read one token early. Per kind, with a mismatched and a missing config pad id,
batched scores equal each text scored alone and the model's own reading of that text alone.
"""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from remax.config import ModelConfig, RewardKind, RewardSourceConfig, RewardTemplate
from remax.models.reward_adapters import RegressionHeadRewardModel
from remax.models.tiny import llama_config
from remax.rewards import RewardScorer

SPECIAL = ["<pad>", "<unk>", "<|end|>"]
CHARS = list(string.ascii_lowercase) + list(" =:.,?!")
PROMPTS = ["abc=", "ponmlk=", "h=", "aiaiaj=", "ppppp=", "abcdefgh="]
RESPONSES = ["c", "", "hello there", "zz", "q", "a long answer, of many tokens!"]
# The first four stopped (the rendered text ends in EOS), the last two ran out of tokens.
STOPPED = [True, True, True, True, False, False]


def rm_tokenizer(*, pad: bool) -> PreTrainedTokenizerFast:
    """One token per character; EOS ``<|end|>``; a ``<pad>`` of its own, or no pad token."""
    vocab = {s: i for i, s in enumerate(SPECIAL)} | {c: i + 3 for i, c in enumerate(CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<|end|>",
        additional_special_tokens=["<pad>"],
        model_input_names=["input_ids", "attention_mask"],
        **({"pad_token": "<pad>"} if pad else {}),
    )


def build_model(kind: RewardKind, vocab: int, pad_id: int | None, eos_id: int):
    """A tiny random-init model of ``kind`` whose config pad id is ``pad_id`` (None: none)."""
    torch.manual_seed(0)
    if kind == RewardKind.hf_seq_cls:  # the case: GPT-2, absolute positions
        config = GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64, num_labels=1
        )
        config.pad_token_id, config.eos_token_id = pad_id, eos_id
        model = GPT2ForSequenceClassification(config)
    else:
        config = llama_config(
            vocab,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=64,
            eos_token_id=eos_id,
        )
        config.pad_token_id = pad_id
        cls = (
            LlamaForSequenceClassification
            if kind == RewardKind.export
            else RegressionHeadRewardModel
        )
        model = cls(config)
    head = model.score if hasattr(model, "score") else model.regression_head
    torch.nn.init.normal_(head.weight)  # a head far from zero: a wrong read shows clearly
    return model.eval()


def own_score(kind: RewardKind, path, ids: list[int]) -> float:
    """The model's own reading of one text alone, loaded fresh: HF's pooling (``export`` and
    ``hf_seq_cls``: with the saved config, a lone text is read at its last token) or UltraRM's
    forward (``regression_head``: the last attended token)."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        if kind == RewardKind.regression_head:
            model = RegressionHeadRewardModel.from_pretrained(path).eval()
            return float(model(input_ids, torch.ones_like(input_ids))[0])
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        return float(model(input_ids=input_ids).logits[0, 0])


@pytest.mark.parametrize("pad", ["mismatched", "missing"])
@pytest.mark.parametrize(
    "kind", [RewardKind.export, RewardKind.hf_seq_cls, RewardKind.regression_head]
)
def test_batched_scores_equal_each_text_alone_and_the_models_own_read(tmp_path, kind, pad):
    """mismatched: the config pads with ``<unk>``, the tokenizer with ``<pad>`` (the issue's GPT-2
    classifier); missing: no pad id anywhere, so the loaders pad with EOS and texts end in EOS."""
    tok = rm_tokenizer(pad=pad == "mismatched")
    config_pad = tok.unk_token_id if pad == "mismatched" else None
    build_model(kind, len(tok), config_pad, tok.eos_token_id).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    cfg = RewardSourceConfig(path=str(tmp_path / "rm"), kind=kind, template=RewardTemplate.policy)
    scorer = RewardScorer.load(cfg, ModelConfig(), None, max_prompt_len=12, seed=0, device="cpu")
    assert scorer.tokenizer.pad_token_id != config_pad

    batched = scorer.score_text(PROMPTS, RESPONSES, STOPPED)
    alone = torch.cat(
        [scorer.score_text([p], [r], [s]) for p, r, s in zip(PROMPTS, RESPONSES, STOPPED)]
    )
    rows = [scorer.render(p, r, s) for p, r, s in zip(PROMPTS, RESPONSES, STOPPED)]
    assert len({len(r) for r in rows}) == len(rows), "every row but the longest is padded"
    assert [r[-1] == tok.eos_token_id for r in rows] == STOPPED
    own = torch.tensor([own_score(kind, tmp_path / "rm", r) for r in rows])
    assert own.std() > 0.1, "a wrong read would change the score"
    assert torch.allclose(batched, alone, atol=1e-5, rtol=0), (batched, alone)
    assert torch.allclose(batched, own, atol=1e-5, rtol=0), (batched, own)
