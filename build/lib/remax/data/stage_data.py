"""Which records each stage trains and evaluates on, for the synthetic task or real data.

Real data follows DeepSpeed-Chat's ``--data_split 2,4,4``: one shuffled pool split into disjoint
SFT / reward-model / RL parts; each part's last ``num_eval`` rows (at most 10 %) are held out.
"""

from __future__ import annotations

from remax.config import DataConfig
from remax.data import synthetic

_STAGE_INDEX = {"sft": 0, "preference": 1, "prompts": 2}


def _synthetic(kind: str, cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    make = {
        "sft": synthetic.sft_records,
        "preference": synthetic.preference_records,
        "prompts": synthetic.prompt_records,
    }[kind]
    return make(cfg.num_train, seed=cfg.seed, split="train"), make(
        cfg.num_eval, seed=cfg.seed, split="eval"
    )


def _real(kind: str, cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    from remax.data import sources

    load = {
        "sft": sources.load_sft_records,
        "preference": sources.load_preference_records,
        "prompts": sources.load_prompt_records,
    }[kind]
    records = list(load(cfg.source))
    part = sources.split_fractions(
        records, tuple(cfg.split), stage_index=_STAGE_INDEX[kind], seed=cfg.seed
    )
    n_eval = min(cfg.num_eval, max(1, len(part) // 10))
    train, held_out = part[: len(part) - n_eval], part[len(part) - n_eval :]
    return train[: cfg.num_train], held_out


def stage_records(kind: str, cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """``(train, eval)`` records of ``kind`` in {"sft", "preference", "prompts"}."""
    if cfg.source == "synthetic":
        return _synthetic(kind, cfg)
    return _real(kind, cfg)


def format_prompts(records: list[dict], cfg: DataConfig, tokenizer=None) -> list[dict]:
    """Apply the configured chat template to every record's prompt (one place: templates.py)."""
    if cfg.source == "synthetic" or cfg.template == "plain":
        return records
    from remax.data.templates import format_prompt

    return [{**r, "prompt": format_prompt(r["prompt"], cfg.template, tokenizer)} for r in records]
