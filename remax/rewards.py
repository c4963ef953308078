"""Rewards of decoded responses, from a reward model of any tokenizer and kind, or a function.

One object, :class:`RewardScorer`, is called at one place by each trainer and by evaluation:
``scorer(rollout, prompts) -> (B,)``. What it does, per ``reward_model`` config:

1. **Fast path** (``kind=export``, ``template=policy``, the RM's vocabulary equal to the policy's,
   no ``max_len``): the RM reads the rollout's own token ids at the rollout's end index, exactly
   what the release scores. No decoding.
2. **Cross-tokenizer path** (any other model): the policy's responses are decoded to text, rendered
   together with the prompt in the RM's format (``template``: the policy's prompt text, the RM
   tokenizer's chat template, or a format string such as UltraRM's ``"Human: ...\\nAssistant: ..."``),
   tokenized by the RM's tokenizer, right-padded into one batch and read where the kind reads
   (``remax.models.reward_adapters``). Truncation follows the RM's training: ``policy`` prompts are
   left-truncated to ``data.max_prompt_len`` tokens and the EOS is appended only where the policy
   stopped (``remax.data.batching``); rendered texts keep their last ``max_len`` tokens.
3. **Function** (``kind=function``): ``module:function`` gets the prompts and responses as text
   and returns one float per row; a failure names the failing row.

Then the switch ``normalize`` (none | fixed) maps raw scores to rewards. Clipping is the algorithm's
(``algo.reward_clip``, ``algo.clip_target``): it needs the baseline, which the scorer does not see.

``prompts`` are the raw user prompts (before the policy's chat template): the ``tokenizer`` and
``format`` templates and reward functions read them; without them, the policy's decoded prompt text
stands in. One RM forward per call: under ZeRO-3 every rank must run the same number of forwards.

Notation: B batch, P prompt length, T response length, L RM tokens.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable

import torch

from remax.config import (
    ConfigError,
    ModelConfig,
    RewardKind,
    RewardNormalization,
    RewardSourceConfig,
)
from remax.config import RewardTemplate as Template
from remax.data.batching import encode, prompt_ids
from remax.models.reward_adapters import load_reward_adapter, score_tokens
from remax.rollout import Rollout

log = logging.getLogger("remax.rewards")


class RewardFunctionError(ConfigError):
    """The configured reward function failed to import, raised, or returned something unusable
    (bad input: jobs report it in one ``error:`` line)."""


def load_reward_function(spec: str) -> Callable:
    """The callable named by ``module:function`` (``reward_model.function``)."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardFunctionError(
            f"reward_model.function={spec}: cannot import {module_name!r} ({exc}); put the module "
            "on PYTHONPATH or fix the name"
        ) from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardFunctionError(
            f"reward_model.function={spec}: {module_name} has no function {name!r}; "
            "give module:function of a callable (prompts, responses) -> floats"
        )
    return fn


def call_reward_function(
    fn: Callable, spec: str, prompts: list[str], responses: list[str]
) -> torch.Tensor:
    """(B,) float32 rewards ``fn(prompts, responses)``; errors name the failing row."""

    def row_text(i: int) -> str:
        return f"row {i} (prompt {prompts[i]!r:.200}, response {responses[i]!r:.200})"

    try:
        values = list(fn(list(prompts), list(responses)))
    except Exception as exc:
        # Find the row: the batch call says only that some row failed.
        for i in range(len(prompts)):
            try:
                fn([prompts[i]], [responses[i]])
            except Exception as row_exc:
                raise RewardFunctionError(
                    f"reward function {spec} failed on {row_text(i)}: "
                    f"{type(row_exc).__name__}: {row_exc}"
                ) from row_exc
        raise RewardFunctionError(
            f"reward function {spec} failed on a batch of {len(prompts)} rows (no single row "
            f"fails alone): {type(exc).__name__}: {exc}"
        ) from exc
    if len(values) != len(prompts):
        raise RewardFunctionError(
            f"reward function {spec} returned {len(values)} values for {len(prompts)} rows: "
            "return one float per (prompt, response)"
        )
    out = []
    for i, value in enumerate(values):
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise RewardFunctionError(
                f"reward function {spec} returned {values[i]!r} for {row_text(i)}: "
                "return a finite float"
            )
        out.append(value)
    return torch.tensor(out, dtype=torch.float32)


def right_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """(B, L) ids and mask, right-padded, and (B,) the column of each row's last token."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    end = torch.tensor([len(r) - 1 for r in rows])
    return ids.to(device), mask.to(device), end.to(device)


class RewardScorer:
    """``scorer(rollout, prompts) -> (B,)`` rewards; see the module docstring."""

    def __init__(
        self,
        cfg: RewardSourceConfig,
        policy_tokenizer,
        *,
        max_prompt_len: int,
        special_tokens: bool = True,
        model=None,
        tokenizer=None,
    ) -> None:
        self.cfg, self.policy_tokenizer, self.max_prompt_len = cfg, policy_tokenizer, max_prompt_len
        self.special_tokens = special_tokens  # data.special_tokens: the rule the RM trained with
        self.model, self.tokenizer = model, tokenizer
        if tokenizer is not None and cfg.template == Template.tokenizer:
            if getattr(tokenizer, "chat_template", None) is None:
                raise ConfigError(
                    f"reward_model.template=tokenizer: the tokenizer of reward_model.path="
                    f"{cfg.path} has no chat_template; use reward_model.template=format with the "
                    "RM's training format in reward_model.format, or template=policy"
                )
        self.function = (
            load_reward_function(cfg.function) if cfg.kind == RewardKind.function else None
        )
        self.same_vocab = (
            tokenizer is not None
            and policy_tokenizer is not None
            and tokenizer.get_vocab() == policy_tokenizer.get_vocab()
        )
        self.fast_path = (
            model is not None
            and cfg.kind == RewardKind.export
            and cfg.template == Template.policy
            and cfg.max_len is None
            and self.same_vocab
        )

    def for_policy(self, policy_tokenizer) -> RewardScorer:
        """This scorer for a policy with ``policy_tokenizer`` (evaluation scores several)."""
        if policy_tokenizer is self.policy_tokenizer:
            return self
        return RewardScorer(
            self.cfg,
            policy_tokenizer,
            max_prompt_len=self.max_prompt_len,
            special_tokens=self.special_tokens,
            model=self.model,
            tokenizer=self.tokenizer,
        )

    @classmethod
    def load(
        cls,
        cfg: RewardSourceConfig,
        model_cfg: ModelConfig,
        policy_tokenizer,
        *,
        max_prompt_len: int,
        special_tokens: bool = True,
        seed: int,
        device,
    ) -> RewardScorer | None:
        """The scorer of ``cfg``, its model (if any) loaded in ``model_cfg``'s dtype; None when
        ``cfg`` names no reward (the synthetic task's gold score is then the reward)."""
        if not cfg.has_reward:
            log.info("reward_model.path is null: the synthetic task's gold score is the reward")
            return None
        model = tokenizer = None
        if cfg.kind != RewardKind.function:
            model, tokenizer = load_reward_adapter(cfg, model_cfg, seed=seed, device=device)
        scorer = cls(
            cfg,
            policy_tokenizer,
            max_prompt_len=max_prompt_len,
            special_tokens=special_tokens,
            model=model,
            tokenizer=tokenizer,
        )
        what = cfg.function if model is None else f"{cfg.path} (kind={cfg.kind.value})"
        how = "the policy's tokens" if scorer.fast_path else f"template={cfg.template.value}"
        log.info("reward: %s, reading %s", what, how)
        return scorer

    @property
    def source(self) -> str:
        """``reward_model`` or ``function``: what the summaries call the reward's source."""
        return "function" if self.function is not None else "reward_model"

    @torch.no_grad()
    def __call__(self, rollout: Rollout, prompts: list[str] | None = None) -> torch.Tensor:
        """(B,) float32 rewards of the rollout's responses, on the rollout's device."""
        device = rollout.response.device
        if self.fast_path:
            ro = rollout
            raw = score_tokens(
                self.model, RewardKind.export, ro.sequences, ro.attention_mask, ro.end_index
            )
            return self.normalize(raw)
        responses, stopped = self.decode_responses(rollout)
        policy_text = self.cfg.template == Template.policy and self.function is None
        if policy_text or prompts is None:
            # The text the policy read, its template included; an RM of the policy's vocabulary
            # also keeps its special tokens (a template's BOS and headers, as the fast path reads).
            prompts = self.decode_prompts(rollout, keep_special=policy_text and self.same_vocab)
        if self.function is not None:
            raw = call_reward_function(self.function, self.cfg.function, prompts, responses)
        else:
            raw = self.score_text(prompts, responses, stopped)
        return self.normalize(raw.to(device))

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """(B,) rewards from (B,) raw scores, per ``reward_model.normalize``."""
        if self.cfg.normalize == RewardNormalization.fixed:
            return (raw - self.cfg.offset) / self.cfg.scale
        return raw

    # ----------------------------------------------------------------- text
    def decode_prompts(self, rollout: Rollout, keep_special: bool = False) -> list[str]:
        tok = self.policy_tokenizer
        return [
            tok.decode(ids[mask], skip_special_tokens=not keep_special)
            for ids, mask in zip(rollout.prompt_ids, rollout.prompt_mask.bool())
        ]

    def decode_responses(self, rollout: Rollout) -> tuple[list[str], list[bool]]:
        """Response texts (special tokens dropped) and whether each row stopped at an EOS."""
        tok, lengths = self.policy_tokenizer, rollout.lengths.tolist()
        rows = [r[:n].tolist() for r, n in zip(rollout.response, lengths)]
        stopped = [bool(r) and r[-1] == tok.eos_token_id for r in rows]
        return [tok.decode(r, skip_special_tokens=True) for r in rows], stopped

    def render(self, prompt: str, response: str, stopped: bool = True) -> list[int]:
        """The RM token ids of one (prompt, response), as the RM was trained to read them."""
        tok, template = self.tokenizer, self.cfg.template
        if template == Template.policy:
            # data.special_tokens, as the RM's pairs and the policy's prompts (remax-spec §3).
            ids = prompt_ids(tok, prompt, self.max_prompt_len, self.special_tokens)
            ids += encode(tok, response)
            ids += [tok.eos_token_id] if stopped else []
        elif template == Template.tokenizer:
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": response},
            ]
            # The RM's own template says where its BOS goes (as apply_chat_template(tokenize=True)).
            ids = encode(tok, tok.apply_chat_template(messages, tokenize=False))
        else:
            text = self.cfg.format.format(prompt=prompt, response=response)
            ids = tok(text)["input_ids"]  # special tokens (BOS) as the RM's tokenizer adds them
        ids = ids or [tok.eos_token_id]
        limit = self.cfg.max_len
        if limit is not None and len(ids) > limit:
            # Keep the end (the token the RM reads) and a leading BOS.
            keep_bos = tok.bos_token_id is not None and ids[0] == tok.bos_token_id
            ids = ids[:1] + ids[-(limit - 1) :] if keep_bos else ids[-limit:]
        return ids

    def score_text(
        self, prompts: list[str], responses: list[str], stopped: list[bool] | None = None
    ) -> torch.Tensor:
        """(B,) raw scores of texts, in one batched RM forward."""
        stopped = stopped if stopped is not None else [True] * len(prompts)
        rows = [self.render(p, r, s) for p, r, s in zip(prompts, responses, stopped)]
        device = next(self.model.parameters()).device
        ids, mask, end = right_pad(rows, self.tokenizer.pad_token_id, device)
        return score_tokens(self.model, self.cfg.kind, ids, mask, end)
