"""The data of a stage (``data``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from remax.config.base import _require


@dataclass(kw_only=True)
class DataConfig:
    name: str = "synthetic"
    """Label used in run names."""
    source: str = "synthetic"
    """``synthetic`` (the in-repo task), an HF dataset name, or a local json/jsonl/parquet path."""
    template: str = "plain"
    """Chat template applied to prompts (``remax.data.templates.ChatTemplate``)."""
    max_prompt_len: int = 12
    """Prompts are left-truncated to this many tokens, then left-padded (release: 256)."""
    max_response_len: int = 10
    """Maximum generated tokens, EOS included (release: 256)."""
    max_seq_len: int = 24
    """SFT / reward-model sequence cap (release: 512)."""
    special_tokens: bool = True
    """The one special-token rule of every stage (remax-spec §3): SFT, RM training, RL rollouts,
    the RL evaluation, ``jobs.evaluate`` and both reward-model paths start each sequence with the
    tokenizer's own prefix (BOS for Llama and Mistral, ``</s>`` for OPT, nothing for GPT-2), once:
    a chat template that already renders it gets no second one. True is the release's (its
    tokenizer calls keep the default ``add_special_tokens``); False: the text's own tokens only."""
    num_train: int = 4096
    """Synthetic task: training examples per stage (SFT demos, preference pairs, RL prompts)."""
    num_eval: int = 256
    """Synthetic task: held-out examples (eval prompts for RL must be >= 64)."""
    split: list[int] = field(default_factory=lambda: [2, 4, 4])
    """Real data: DeepSpeed-Chat ``--data_split`` weights for the SFT / RM / RL stages."""
    seed: int = 1234
    """Seed of data generation and splits; independent of the training seed."""

    def __post_init__(self) -> None:
        for key in ("max_prompt_len", "max_response_len", "max_seq_len", "num_train"):
            value = getattr(self, key)
            _require(value > 0, f"data.{key}", value, "use a positive integer")
        _require(self.num_eval >= 64, "data.num_eval", self.num_eval, "use at least 64")
        _require(
            len(self.split) == 3 and all(w >= 0 for w in self.split) and sum(self.split) > 0,
            "data.split",
            self.split,
            "give three non-negative weights, e.g. [2,4,4]",
        )
