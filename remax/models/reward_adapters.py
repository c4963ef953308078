"""Reward-model adapters: load any kind of reward model, and read it where it was trained to read.

Public reward models ship in three shapes; ``reward_model.kind`` names which one a path holds:

| kind | model | the score is read at |
|---|---|---|
| ``export`` | this project's reward_model export (``*ForSequenceClassification``, ``score`` head) | an explicit end index: the EOS after the response, else the last token (``remax.models.reward.score``) |
| ``hf_seq_cls`` | any ``AutoModelForSequenceClassification`` (one label), any architecture | the text's last token (an explicit end index), where HF pools a text given alone |
| ``regression_head`` | UltraRM-13B's ``LlamaRewardModel``: a ``LlamaModel`` named ``model`` plus a bias-free ``regression_head`` | the last attended token, as its own forward (``attention_mask.cumsum(1).argmax(1)``) |

UltraRM's class is published as code in its model card, not in the repository, so
``trust_remote_code`` cannot load it: :class:`RegressionHeadRewardModel` is that architecture,
and its checkpoint's ``model.*`` and ``regression_head.weight`` load into it by name. A checkpoint
that lacks the head a kind needs is refused (HF would initialise a random head and score noise).

Batches given to :func:`score_tokens` are right-padded: with positions counted from column 0 (HF's
default), each row then scores exactly as it would alone. No kind reads where the padding is:
HF's own pooling (the last token that is not ``config.pad_token_id``) would, whenever the
tokenizer pads with another id, or the pad id is the EOS a text ends with.

Notation: B batch, L tokens.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaModel,
    LlamaPreTrainedModel,
    PreTrainedModel,
)

from remax.config import ConfigError, ModelConfig, RewardKind, RewardSourceConfig
from remax.models.policy import disable_dropout, torch_dtype
from remax.models.reward import load_reward_model, score

log = logging.getLogger("remax.models")


class RewardLoadError(ConfigError):
    """A reward model path does not hold the kind of model ``reward_model.kind`` names (bad input:
    jobs report it in one ``error:`` line)."""


class RegressionHeadRewardModel(LlamaPreTrainedModel):
    """UltraRM-style reward model: Llama backbone ``model`` and a bias-free ``regression_head``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.model = LlamaModel(config)
        self.regression_head = nn.Linear(config.hidden_size, 1, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) float32 score at each row's last attended token (UltraRM's ``ends``)."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        ends = attention_mask.long().cumsum(1).argmax(1)  # (B,) last 1 of the mask
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.regression_head(hidden[rows, ends]).squeeze(-1).float()


def load_reward_tokenizer(cfg: RewardSourceConfig):
    """The RM's own tokenizer; a pad token is only needed to fill batches (its id is masked)."""
    tok = AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _from_pretrained(cls, cfg: RewardSourceConfig, dtype, head: str):
    model, info = cls.from_pretrained(
        cfg.path,
        dtype=dtype,
        trust_remote_code=cfg.trust_remote_code,
        output_loading_info=True,
    )
    missing = [k for k in info.get("missing_keys", []) if k.startswith(head)]
    if missing:
        raise RewardLoadError(
            f"reward_model.path={cfg.path} has no trained {head!r} head for "
            f"reward_model.kind={cfg.kind.value} (missing {missing}): it would score with random "
            "weights; set reward_model.kind to the checkpoint's kind "
            f"({', '.join(k.value for k in RewardKind if k != RewardKind.function)})"
        )
    return model


def load_reward_adapter(
    cfg: RewardSourceConfig, model_cfg: ModelConfig, *, seed: int, device
) -> tuple[PreTrainedModel, object]:
    """``(model, tokenizer)`` of ``cfg.kind`` from ``cfg.path``, frozen, dropout off.

    ``model_cfg`` gives dtype and gradient checkpointing (the policy's: an RM is scored in the
    dtype the policy runs in).
    """
    if cfg.kind == RewardKind.export:
        model, tok = load_reward_model(model_cfg, path=cfg.path, seed=seed, device=device)
        _check_vocabulary(cfg, model, tok)
        return model.eval().requires_grad_(False), tok
    dtype = torch_dtype(model_cfg.dtype)
    tok = load_reward_tokenizer(cfg)
    if cfg.kind == RewardKind.hf_seq_cls:
        model = _from_pretrained(AutoModelForSequenceClassification, cfg, dtype, head="score")
        labels = model.config.num_labels
        if labels != 1:
            raise RewardLoadError(
                f"reward_model.path={cfg.path} has num_labels={labels}: a reward model has one "
                "output; use a single-score sequence-classification reward model"
            )
    elif cfg.kind == RewardKind.regression_head:
        model = _from_pretrained(RegressionHeadRewardModel, cfg, dtype, head="regression_head")
    else:
        raise ValueError(f"reward_model.kind={cfg.kind.value} has no model to load")
    model.to(device=device, dtype=dtype)
    disable_dropout(model)
    _check_vocabulary(cfg, model, tok)
    return model.eval().requires_grad_(False), tok


def _check_vocabulary(cfg: RewardSourceConfig, model, tokenizer) -> None:
    """Refuse an export whose tokenizer has ids its model cannot embed: re-tokenized answers
    would index past the embedding table mid-run (an IndexError at some step, not at load)."""
    embedded = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embedded:
        raise RewardLoadError(
            f"reward_model.path={cfg.path}: its tokenizer has {len(tokenizer)} tokens but the "
            f"model embeds {embedded}: save the tokenizer the reward model was trained with, or "
            "resize its embeddings (model.resize_token_embeddings) before saving"
        )


def score_tokens(
    model,
    kind: RewardKind,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    end_index: torch.Tensor,
) -> torch.Tensor:
    """(B,) float32 scores of right-padded RM tokens.

    Args:
        input_ids: (B, L) right-padded with the RM's pad id.
        attention_mask: (B, L).
        end_index: (B,) column of each row's last token (read by ``export`` and ``hf_seq_cls``;
            ``regression_head`` finds it as its own forward does: the last 1 of the mask).
    """
    if kind == RewardKind.export:
        return score(model, input_ids, attention_mask, end_index)
    if kind == RewardKind.hf_seq_cls:
        return _seq_cls_at_end(model, input_ids, attention_mask, end_index)
    return model(input_ids, attention_mask)


def _seq_cls_at_end(model, input_ids, attention_mask, end_index) -> torch.Tensor:
    """(B,) scores of an HF sequence classifier, read at ``end_index``.

    Every last-token classifier in transformers applies its ``score`` head to ``base_model``'s
    last hidden state and pools the last column whose id is not ``config.pad_token_id``. That
    column is the text's end only if the batch is padded with exactly that id and the text does
    not end in it, so the head is applied at the known end instead. A classifier without a
    ``score`` head (BERT-style, pooled at the first token) keeps its own forward: padding at the
    end does not move what it reads.
    """
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Module):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return head(hidden[rows, end_index]).squeeze(-1).float()  # (B,): one label


def critic_compatible(cfg: RewardSourceConfig, rm_tokenizer, policy_tokenizer) -> str | None:
    """None when PPO's critic can start from the RM; else why not (one phrase for the log line).

    The critic reads the policy's token ids through a ``score`` head on ``base_model``, so the RM
    must be a sequence-classification model with the policy's vocabulary.
    """
    if cfg.kind == RewardKind.function or cfg.path is None:
        return "the reward is a function, not a model"
    if cfg.kind == RewardKind.regression_head:
        return "its regression_head is not a sequence-classification score head"
    if rm_tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        return "it uses another tokenizer than the policy"
    return None
