"""The evaluation stage's root: answers of several policies on one prompt set, scored."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from remax.algo.types import EvalDecoding
from remax.config.base import DType, _require
from remax.config.cluster import ClusterConfig
from remax.config.data import DataConfig
from remax.config.model import RewardSourceConfig
from remax.config.rollout import RolloutConfig
from remax.config.run import LogConfig, RunConfig
from remax.config.sampling import SamplingFields


class PromptFormat(str, enum.Enum):
    prompts = "prompts"  # one prompt per row; columns detected (prompt, instruction, HH, .txt, ...)
    alpaca_eval = "alpaca_eval"  # an AlpacaEval set: one ``instruction`` per row
    mt_bench = "mt_bench"  # FastChat questions: ``question_id`` and ``turns``, every turn answered


class AnswerFormat(str, enum.Enum):
    none = "none"
    alpaca_eval = "alpaca_eval"  # alpaca_eval/<name>.json: [{instruction, output, generator}]
    mt_bench = "mt_bench"  # mt_bench/model_answer/<name>.jsonl, as FastChat gen_model_answer.py


@dataclass(kw_only=True)
class ReferenceConfig:
    path: str | None = None
    """Reference policy of the KL column: an ``export/`` dir or HF name (usually the SFT export);
    None: no KL."""


@dataclass(kw_only=True)
class EvaluateJobConfig(SamplingFields):
    """Evaluation: answers of one or more policies on one prompt set, scored and compared (A vs B)."""

    stage = "evaluate"
    seed: int = 42
    """Seed of sampled decoding; batch k is seeded from (seed, k), so answers do not depend on
    batch order or on resuming."""
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    """Held-out prompts (``prompt_source=held_out``), the chat template, ``max_prompt_len``."""
    log: LogConfig = field(default_factory=LogConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    policies: list[str] = field(default_factory=list)
    """Policies to evaluate: ``export/`` dirs or HF names. A = the first, B = the second."""
    names: list[str] = field(default_factory=list)
    """Labels of the policies (answer-file names, AlpacaEval ``generator``, MT-bench ``model_id``);
    empty: ``<stage>-<run dir>`` of an ``export/`` path, else the path's last part."""
    reward_model: RewardSourceConfig = field(default_factory=RewardSourceConfig)
    """Reward model of the win rate; None on held-out synthetic prompts: the gold score; None on
    other prompts: no reward (answer files only)."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """The decoding engine of the answers (``rollout.engine=hf|vllm``)."""
    prompt_source: str = "held_out"
    """``held_out``: the held-out RL prompts of ``data`` (the synthetic task's by default); else a
    prompt set, a local file or an HF data set name, read as ``prompt_format``."""
    prompt_format: PromptFormat = PromptFormat.prompts
    """How a prompt set is read (``held_out`` ignores it: it is always single-turn)."""
    prompt_split: str = "train"
    """Split of an HF prompt set (AlpacaEval's is ``eval``); ignored for local files."""
    num_prompts: int | None = None
    """The first N prompts; None: all (``held_out``: data.num_eval)."""
    decoding: EvalDecoding = EvalDecoding.sampled
    """``sampled`` (the distribution RL optimised, as the ReMax stage evaluates) or ``greedy``
    (one deterministic answer per prompt, common for judge submissions)."""
    max_new_tokens: int | None = None
    """Generated tokens per answer (per turn), EOS included; None: data.max_response_len."""
    batch_size: int = 64
    """Prompts per generation batch."""
    answer_format: AnswerFormat = AnswerFormat.none
    """Also write one judge answer file per policy (``alpaca_eval`` or ``mt_bench``)."""
    dtype: DType = DType.float32
    """Parameter and compute dtype of every loaded model (bf16 on GPUs)."""

    def __post_init__(self) -> None:
        self.rollout.require_one_sample("evaluate")
        _require(
            len(self.policies) >= 1,
            "policies",
            self.policies,
            "give one or more export/ dirs or HF names, e.g. policies=[runs/remax/<dir>/export]",
        )
        _require(
            not self.names or len(self.names) == len(self.policies),
            "names",
            self.names,
            f"give one name per policy ({len(self.policies)}) or none",
        )
        labels = self.labels
        _require(
            len(set(labels)) == len(labels) and all(n and "/" not in n for n in labels),
            "names",
            labels,
            "labels must be distinct plain names: set names=[a,b,...]",
        )
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "use >= 1")
        _require(
            self.num_prompts is None or self.num_prompts >= 1,
            "num_prompts",
            self.num_prompts,
            "use >= 1, or null for all",
        )
        _require(
            not (self.prompt_source == "held_out" and self.data.source == "synthetic")
            or (self.num_prompts or 0) <= self.data.num_eval,
            "num_prompts",
            self.num_prompts,
            f"must not exceed data.num_eval={self.data.num_eval}",
        )
        _require(
            self.max_new_tokens is None or self.max_new_tokens >= 1,
            "max_new_tokens",
            self.max_new_tokens,
            "use >= 1, or null for data.max_response_len",
        )
        self.check_sampling("")
        self._check_formats()

    def _check_formats(self) -> None:
        """Judge answer files need questions of their format; prompts need a named source."""
        _require(
            self.answer_format != AnswerFormat.mt_bench
            or self.prompt_format == PromptFormat.mt_bench,
            "answer_format",
            self.answer_format.value,
            "MT-bench answers need MT-bench questions: set prompt_format=mt_bench",
        )
        _require(
            self.answer_format != AnswerFormat.alpaca_eval
            or self.prompt_format != PromptFormat.mt_bench,
            "answer_format",
            self.answer_format.value,
            "AlpacaEval answers are single-turn: use answer_format=mt_bench for MT-bench questions",
        )
        _require(
            self.prompt_source != "synthetic",
            "prompt_source",
            self.prompt_source,
            "use held_out for the synthetic task's held-out prompts",
        )

    @property
    def labels(self) -> list[str]:
        """The policies' names: ``names``, or derived from the paths."""
        if self.names:
            return list(self.names)
        out = []
        for path in self.policies:
            parts = path.rstrip("/").split("/")
            is_export = parts[-1] == "export" and len(parts) >= 3
            out.append(f"{parts[-3]}-{parts[-2]}" if is_export else parts[-1])
        return out

    @property
    def response_len(self) -> int:
        """Generated tokens per answer: ``max_new_tokens``, else ``data.max_response_len``."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return self.data.max_response_len

    @property
    def template(self) -> str:
        """Chat template of the prompts; held-out synthetic prompts are never templated (as in
        training, ``remax.data.stage_data.format_prompts``)."""
        if self.prompt_source == "held_out" and self.data.source == "synthetic":
            return "plain"
        return self.data.template
