"""Chat templates: the one place that turns a raw prompt (or a conversation) into model input text.

Loaders (`remax.data.sources`) return raw text and never template; every stage calls
`format_prompt` / `format_conversation` with the configured `ChatTemplate` (``data.template``).

- ``plain``: the prompt unchanged.
- ``hh``: Anthropic HH as the Dahoas data sets store it, ``"\\n\\nHuman: {prompt}\\n\\nAssistant:"``.
  Dahoas ``prompt`` columns are already in this form (possibly several turns, always ending in
  ``"Assistant:"``; responses start with a space), so a prompt that already is an HH dialogue is
  returned unchanged: ``hh`` is idempotent and one template serves raw and Dahoas prompts alike.
- ``tokenizer``: the tokenizer's own chat template, ``apply_chat_template(..., tokenize=False,
  add_generation_prompt=True)``, for instruction-tuned models (Mistral-Instruct, Llama-2-chat).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
ROLES = ("system", "user", "assistant")


class ChatTemplate(str, enum.Enum):
    plain = "plain"
    hh = "hh"
    tokenizer = "tokenizer"


def as_template(template: ChatTemplate | str) -> ChatTemplate:
    """``template`` as a `ChatTemplate`; an unknown name raises ValueError listing the valid ones."""
    try:
        return ChatTemplate(template)
    except ValueError:
        valid = ", ".join(t.value for t in ChatTemplate)
        raise ValueError(f"unknown chat template {template!r}; valid: {valid}") from None


def is_hh_dialogue(text: str) -> bool:
    """True for text already in HH form: starts with a Human turn, ends with ``Assistant:``."""
    return text.lstrip().startswith("Human:") and text.rstrip().endswith("Assistant:")


def format_prompt(
    prompt: str,
    template: ChatTemplate | str,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> str:
    """Model input text for a single user ``prompt``; ``hh`` leaves an HH dialogue as it is."""
    template = as_template(template)
    if template is ChatTemplate.hh and is_hh_dialogue(prompt):
        return prompt
    return format_conversation([{"role": "user", "content": prompt}], template, tokenizer)


def format_conversation(
    turns: list[dict[str, Any]],
    template: ChatTemplate | str,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> str:
    """Model input text for a conversation ending in a user turn, ready for the next answer.

    ``turns`` are ``{"role", "content"}`` dicts with role system/user/assistant, e.g. an MT-bench
    second turn: ``[user q1, assistant a1, user q2]``. ``plain`` joins the contents with blank
    lines; ``hh`` renders ``"\\n\\nHuman: q1\\n\\nAssistant: a1\\n\\nHuman: q2\\n\\nAssistant:"``
    (a system message, if any, goes first as bare text).
    """
    template = as_template(template)
    _check_turns(turns)
    if template is ChatTemplate.plain:
        return "\n\n".join(t["content"] for t in turns)
    if template is ChatTemplate.hh:
        marker = {"system": "", "user": HUMAN + " ", "assistant": ASSISTANT + " "}
        return "".join(marker[t["role"]] + t["content"] for t in turns) + ASSISTANT
    if tokenizer is None:
        raise ValueError("chat template 'tokenizer' needs a tokenizer; pass tokenizer=...")
    if getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {name!r} has no chat_template; use template 'hh' or 'plain', "
            "or a tokenizer of an instruction-tuned model"
        )
    messages = [{"role": t["role"], "content": t["content"]} for t in turns]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _check_turns(turns: list[dict[str, Any]]) -> None:
    if not turns:
        raise ValueError("empty conversation: give at least one user turn")
    for i, turn in enumerate(turns):
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise ValueError(
                f"turn {i}: expected {{'role': one of {list(ROLES)}, 'content': str}}, got {turn!r}"
            )
    if turns[-1]["role"] != "user":
        raise ValueError(
            f"the last turn must be the user's (the model answers next), got {turns[-1]['role']!r}"
        )
