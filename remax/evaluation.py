"""Evaluation: answers of exported policies on one prompt set, scored, compared, and written out.

What one evaluation computes (``jobs.evaluate``; every number is per prompt, then averaged):

- answers: each policy answers every prompt through its rollout engine (``rollout.engine=hf``:
  ``remax.rollout.generate``; ``vllm``: ``remax.rollout.vllm``), greedy or sampled,
  in batches of ``batch_size``. Batch ``k`` is decoded under ``torch.manual_seed`` of a hash of
  ``(seed, k)``, so answers do not depend on which batches ran before (a resumed evaluation equals
  an uninterrupted one) and every policy sees the same random stream.
- multi-turn prompts (MT-bench): turn k's input is the whole conversation so far, the policy's own
  earlier answers included, rendered by ``remax.data.templates.format_conversation``.
- scores (``remax.answer_metrics``, the code of the RL stages' ``eval_after.json`` too): reward,
  the RL stages' reward (``remax.rewards.RewardScorer``: any reward model kind or tokenizer, or a
  reward function), or the synthetic task's gold score when none is given; gold: the synthetic
  task's programmatic score (held-out synthetic prompts only); with a reference, ``kl`` (per answer)
  and ``kl_token`` (per token): the exact full-vocabulary KL(π‖π_ref) along the decoded answer,
  and ``kl_sampled``, ``kl_sampled_token``: the k1 estimate Σ_t log π(a_t) − log π_ref(a_t)
  (for greedy answers, the log-ratio of the one answer each policy gives), both of the raw
  softmax; length: generated tokens, EOS included. Multi-turn rows average each over their turns.
- win rate of policy A (the first) against B (the second) on the same prompts: a win counts 1, a
  tie ½, a loss 0 (AlpacaEval's convention); identical answers are ties whatever float noise the
  batched reward forward adds. The interval is Wilson's score interval (`wilson_interval`).

Resumability: rows are appended to ``partial/<policy>.jsonl`` one whole batch at a time; a rerun
keeps every complete batch and decodes the rest. ``answers.jsonl``, the judge answer files and,
last, ``summary.json`` are written atomically; a run dir with ``summary.json`` is not redone.

Notation: B batch, P prompt length (left-padded), T response length.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from remax import answer_metrics, ledger, watchdog
from remax.answer_metrics import decode_answers
from remax.config import (
    AnswerFormat,
    EvalDecoding,
    EvaluateJobConfig,
    ModelConfig,
    PromptFormat,
)
from remax.data import judge_formats
from remax.data.batching import collate_prompts
from remax.data.stage_data import stage_records
from remax.data.templates import format_conversation, format_prompt
from remax.distributed import select_device
from remax.fileio import atomic_write_text, write_json
from remax.log import MetricWriter
from remax.models.policy import load_policy
from remax.preemption import StopRequest
from remax.rewards import RewardScorer
from remax.rollout import HFEngine, Rollout, SamplingConfig, as_actor, build_rollout_engine
from remax.run_dir import to_plain, wandb_id
from remax.stats import mean_stderr, win_rate

log = logging.getLogger("remax.evaluation")

# What each answer gets (``remax.answer_metrics``): the RL stages' eval_after.json measures the same.
SCORES = ("reward", "gold", "kl", "kl_token", "kl_sampled", "kl_sampled_token", "length")
# Answers whose KLs are scored at once: the policy's and the reference's (rows, T, V) logits live
# together (8 × 1024 tokens × 32k vocabulary in fp32: 1 GiB each).
KL_ROWS = 8

# --------------------------------------------------------------------------- prompt sets


class Prompt(NamedTuple):
    """One evaluation prompt: ``id`` (the MT-bench question_id, else the row index) and its raw user
    ``turns`` (one for single-turn sets), before any chat template."""

    id: int
    turns: list[str]


def load_prompt_set(
    source: str, fmt: PromptFormat | str, *, split: str = "train", limit: int | None = None
) -> list[Prompt]:
    """Prompts of a local file or an HF data set, read as ``fmt``.

    ``mt_bench``: FastChat ``question.jsonl`` (``question_id``, ``turns``), or an HF set with
    ``question_id``/``prompt_id`` and ``turns``/``prompt`` lists (HuggingFaceH4/mt_bench_prompts);
    ``alpaca_eval``: one ``instruction`` per row (an AlpacaEval set or a model-outputs file);
    ``prompts``: one prompt per row, format detected from the columns (``remax.data.sources``).
    """
    fmt = PromptFormat(fmt)
    if fmt is not PromptFormat.mt_bench:
        from remax.data.sources import load_prompt_records

        kind = "alpaca_eval" if fmt is PromptFormat.alpaca_eval else None
        records = load_prompt_records(source, split=split, fmt=kind, limit=limit)
        return [Prompt(i, [r["prompt"]]) for i, r in enumerate(records)]
    if Path(source).expanduser().is_file():
        rows = judge_formats.load_mt_bench_questions(Path(source).expanduser())
    else:
        import datasets

        rows = [
            {"question_id": r.get("question_id", r.get("prompt_id")), **r}
            for r in datasets.load_dataset(source, split=split)
        ]
    prompts = []
    for r in rows[:limit]:
        turns = r.get("turns") or r.get("prompt")
        if not isinstance(r["question_id"], int) or not isinstance(turns, list) or not turns:
            raise ValueError(f"{source}: row {r!r:.80} has no integer question_id and turns list")
        prompts.append(Prompt(r["question_id"], list(turns)))
    return prompts


def evaluation_prompts(cfg: EvaluateJobConfig) -> list[Prompt]:
    """The configured prompts: ``data``'s held-out RL prompts, or a prompt set read from a file."""
    if cfg.prompt_source == "held_out":
        _, held_out = stage_records("prompts", cfg.data)
        return [Prompt(i, [r["prompt"]]) for i, r in enumerate(held_out[: cfg.num_prompts])]
    return load_prompt_set(
        cfg.prompt_source, cfg.prompt_format, split=cfg.prompt_split, limit=cfg.num_prompts
    )


# --------------------------------------------------------------------------- generation


class Turn(NamedTuple):
    """One turn of a batch: the batch ``rows`` that have it, their model input ``texts`` (template
    applied), the decoded ``rollout`` and the answers as text."""

    rows: list[int]
    texts: list[str]
    rollout: Rollout
    answers: list[str]


@torch.no_grad()
def answer_turns(
    model,
    tokenizer,
    prompts: list[Prompt],
    *,
    template: str,
    sampling: SamplingConfig,
    greedy: bool,
    max_prompt_len: int,
    special_tokens: bool = True,
    engine=None,
) -> list[Turn]:
    """Answer every turn of every prompt; turn k sees the conversation with the earlier answers.

    ``engine``: the rollout engine decoding ``model``'s answers (``remax.rollout``);
    None: ``model`` decodes them itself (``hf``)."""
    device = next(model.parameters()).device
    engine = engine or HFEngine(as_actor(model), tokenizer)
    history: list[list[dict[str, str]]] = [[] for _ in prompts]
    turns = []
    for k in range(max(len(p.turns) for p in prompts)):
        rows = [i for i, p in enumerate(prompts) if k < len(p.turns)]
        for i in rows:
            history[i].append({"role": "user", "content": prompts[i].turns[k]})
        # Turn 1 goes through format_prompt exactly as the RL stage templated its prompts.
        texts = [
            format_prompt(history[i][0]["content"], template, tokenizer)
            if k == 0
            else format_conversation(history[i], template, tokenizer)
            for i in rows
        ]
        batch = collate_prompts(
            tokenizer, texts, max_prompt_len, device, special_tokens=special_tokens
        )
        rollout = engine.generate(batch.input_ids, batch.attention_mask, sampling, greedy=greedy)
        answers = decode_answers(tokenizer, rollout)
        for i, answer in zip(rows, answers):
            history[i].append({"role": "assistant", "content": answer})
        turns.append(Turn(rows, texts, rollout, answers))
    return turns


# --------------------------------------------------------------------------- scoring


class Scorer:
    """Scores decoded answers: reward (``remax.rewards.RewardScorer``, or gold), gold, KL to the
    reference, length.

    The reward is the RL stages' own scorer: a reward model of the policy's vocabulary reads the
    policy's token ids (exactly what the RL stage scored); any other model reads the decoded text
    rendered in its own format; a reward function reads the text.
    """

    def __init__(
        self,
        reward: RewardScorer | None = None,
        reference=None,
        reference_tokenizer=None,
        *,
        gold: bool,
    ):
        self.reward = reward
        self.reference, self.reference_tokenizer = reference, reference_tokenizer
        self.gold = gold

    @torch.no_grad()
    def __call__(self, policy, tokenizer, turn: Turn, raw: list[str]) -> dict[str, list[float]]:
        """Per-row ``reward``, ``gold``, the four KLs (``remax.answer_metrics``; None where not
        computed) and ``length``: the RL stages' evaluation code, on the raw softmax."""
        gold = functools.partial(answer_metrics.gold_scores, tokenizer)  # (rollout, raw prompts)
        reward = gold if self.reward is None else self.reward.for_policy(tokenizer)
        scores = answer_metrics.measure(
            turn.rollout,
            raw,
            reward=reward,
            gold=gold if self.gold else None,
            policy=policy,
            reference=self.reference,
            micro=KL_ROWS,
        )
        return {key: _floats(scores.get(key)) for key in SCORES}


def _floats(values) -> list[float] | None:
    if values is None:
        return None
    if isinstance(values, torch.Tensor):
        return values.float().cpu().tolist()
    return [float(v) for v in values]


def answer_rows(
    policy, tokenizer, prompts: list[Prompt], scorer: Scorer, *, name: str, **decoding
) -> list[dict[str, Any]]:
    """``answers.jsonl`` rows of one batch: each prompt's answer(s) and scores (turns averaged)."""
    turns = answer_turns(policy, tokenizer, prompts, **decoding)
    per_row: list[list[tuple[str, dict[str, float | None]]]] = [[] for _ in prompts]
    for turn in turns:
        raw = [prompts[i].turns[len(per_row[i])] for i in turn.rows]
        scores = scorer(policy, tokenizer, turn, raw)
        for j, i in enumerate(turn.rows):
            values = {k: (v[j] if v is not None else None) for k, v in scores.items()}
            per_row[i].append((turn.answers[j], values))
    rows = []
    for prompt, answered in zip(prompts, per_row):
        single = len(prompt.turns) == 1
        row = {
            "policy": name,
            "id": prompt.id,
            "prompt": prompt.turns[0] if single else prompt.turns,
            "response": answered[0][0] if single else [a for a, _ in answered],
        }
        for key in SCORES:
            values = [v[key] for _, v in answered]
            row[key] = None if values[0] is None else sum(values) / len(values)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- the job


def _batch_seed(seed: int, batch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{batch}".encode()).digest()[:7], "little")


def _done_batches(path: Path, sizes: list[int]) -> dict[int, list[dict]]:
    """Complete batches of a partial answer file (a batch torn by a kill is decoded again)."""
    batches: dict[int, list[dict]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            batches.setdefault(row.pop("batch"), []).append(row)
    return {b: rows for b, rows in batches.items() if b < len(sizes) and len(rows) == sizes[b]}


def _policy_rows(cfg, path, name, prompts, scorer, device, partial: Path, stop) -> list[dict]:
    chunks = [prompts[i : i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
    done = _done_batches(partial, [len(c) for c in chunks])
    if len(done) < len(chunks):
        model, tokenizer = load_policy(
            ModelConfig(path=path, dtype=cfg.dtype), seed=cfg.seed, device=device
        )
        ref_tok = scorer.reference_tokenizer
        if ref_tok is not None and tokenizer.get_vocab() != ref_tok.get_vocab():
            raise ValueError(
                f"policy {path} and reference {cfg.reference.path} use different tokenizers: "
                "the KL needs both to score the same tokens; drop reference.path"
            )
        sampling = cfg.sampling(cfg.response_len)
        engine = build_rollout_engine(  # hf, or vllm on this policy's weights
            cfg.rollout,
            as_actor(model),
            tokenizer,
            max_model_len=cfg.data.max_prompt_len + cfg.response_len + 1,
            seed=cfg.seed,
        )
        partial.write_text(
            "".join(json.dumps({"batch": b, **r}) + "\n" for b in done for r in done[b])
        )
        devices = [device] if device.type == "cuda" else []
        todo = [b for b in range(len(chunks)) if b not in done]
        for b in tqdm(todo, desc=f"evaluate {name}", disable=not cfg.log.progress):
            stop.check()  # a stop unwinds to the job, which requeues; done batches stay
            watchdog.beat("eval")
            chunk = chunks[b]
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(_batch_seed(cfg.seed, b))
                rows = answer_rows(
                    model,
                    tokenizer,
                    chunk,
                    scorer,
                    name=name,
                    template=cfg.template,
                    sampling=sampling,
                    greedy=cfg.decoding == EvalDecoding.greedy,
                    max_prompt_len=cfg.data.max_prompt_len,
                    special_tokens=cfg.data.special_tokens,
                    engine=engine,
                )
            with open(partial, "a") as f:  # one write per batch: a kill tears at most this one
                f.write("".join(json.dumps({"batch": b, **r}) + "\n" for r in rows))
            done[b] = rows
            ledger.note_answered()  # the no-progress stop counts batches, not checkpoints
        engine.close()
        del model
    return [r for b in range(len(chunks)) for r in done[b]]


def _stats(rows: list[dict]) -> dict[str, dict]:
    out = {}
    for key in SCORES:
        if rows and rows[0][key] is not None:
            out[key] = mean_stderr(torch.tensor([r[key] for r in rows], dtype=torch.float64))
    return out


def _compare(a: list[dict], b: list[dict], key: str) -> dict[str, float]:
    # The same answer is a tie, whatever float noise different batch padding adds to its score.
    b_scores = [ra[key] if ra["response"] == rb["response"] else rb[key] for ra, rb in zip(a, b)]
    return win_rate([r[key] for r in a], b_scores)


def _answer_files(cfg, run_dir: Path, rows: dict[str, list[dict]]) -> dict[str, str]:
    files = {}
    for name, answers in rows.items():
        if cfg.answer_format == AnswerFormat.alpaca_eval:
            path = run_dir / "alpaca_eval" / f"{name}.json"
            judge_formats.write_alpaca_eval(
                path, [{"instruction": r["prompt"], "output": r["response"]} for r in answers], name
            )
            judge_formats.validate_alpaca_eval(path)
        elif cfg.answer_format == AnswerFormat.mt_bench:
            path = run_dir / "mt_bench" / "model_answer" / f"{name}.jsonl"
            turns = [{"question_id": r["id"], "turns": r["response"]} for r in answers]
            judge_formats.write_mt_bench_answers(path, turns, model_id=name)
            questions = cfg.prompt_source if Path(cfg.prompt_source).is_file() else None
            judge_formats.validate_mt_bench_answers(
                path, questions, require_all=cfg.num_prompts is None
            )
        else:
            continue
        files[name] = str(path)
    return files


def _scorer(cfg: EvaluateJobConfig, device, gold: bool) -> Scorer:
    """The frozen reward model and reference, each loaded once for every policy."""
    models: dict[str, Any] = {}
    if cfg.reward_model.has_reward:
        # Bound to each policy's tokenizer when it scores (Scorer.__call__).
        models["reward"] = RewardScorer.load(
            cfg.reward_model,
            ModelConfig(dtype=cfg.dtype),
            None,
            max_prompt_len=cfg.data.max_prompt_len,
            special_tokens=cfg.data.special_tokens,
            seed=cfg.seed,
            device=device,
        )
    if cfg.reference.path is not None:
        model_cfg = ModelConfig(path=cfg.reference.path, dtype=cfg.dtype)
        ref, models["reference_tokenizer"] = load_policy(model_cfg, seed=cfg.seed, device=device)
        models["reference"] = ref.eval().requires_grad_(False)
    return Scorer(**models, gold=gold)


def _summary(cfg: EvaluateJobConfig, rows: dict[str, list[dict]], reward_source, gold) -> dict:
    ev: dict[str, Any] = {
        "policies": cfg.labels,
        "prompts": len(next(iter(rows.values()))),
        "decoding": cfg.decoding.value,
        "reward_source": reward_source,
        "by_policy": {name: _stats(answers) for name, answers in rows.items()},
    }
    if len(rows) >= 2 and reward_source is not None:
        a, b = (rows[name] for name in cfg.labels[:2])
        for key, prefix in (("reward", ""), ("gold", "gold_")) if gold else (("reward", ""),):
            w = _compare(a, b, key)
            ev[f"{prefix}win_rate"] = w["win_rate"]
            ev[f"{prefix}win_rate_ci"] = [w["ci_low"], w["ci_high"]]
            ev[f"{prefix}win_counts"] = {k: w[k] for k in ("wins", "ties", "losses", "n")}
        ev["interval"] = "wilson_95"
    return ev


def run(cfg: EvaluateJobConfig, run_dir: Path, stop: StopRequest | None = None) -> dict:
    """Answer, score and compare; write ``answers.jsonl``, answer files and ``summary.json``.
    ``stop`` interrupts it between answer batches (:class:`remax.preemption.Stopped`)."""
    stop = stop if stop is not None else StopRequest()
    summary_file = run_dir / "summary.json"
    if summary_file.exists():
        log.info("evaluate already complete: %s", summary_file)
        return json.loads(summary_file.read_text())
    device = select_device(cfg.cluster.device)
    prompts = evaluation_prompts(cfg)
    gold = cfg.prompt_source == "held_out" and cfg.data.source == "synthetic"
    scorer = _scorer(cfg, device, gold)
    (run_dir / "partial").mkdir(exist_ok=True)
    rows = {
        name: _policy_rows(
            cfg, path, name, prompts, scorer, device, run_dir / "partial" / f"{name}.jsonl", stop
        )
        for path, name in zip(cfg.policies, cfg.labels)
    }
    lines = [json.dumps(r) for answers in rows.values() for r in answers]
    atomic_write_text(run_dir / "answers.jsonl", "".join(line + "\n" for line in lines))
    reward_source = scorer.reward.source if scorer.reward is not None else None
    ev = _summary(cfg, rows, reward_source or ("gold" if gold else None), gold)
    ev["answer_files"] = _answer_files(cfg, run_dir, rows)
    summary = {"stage": "evaluate", "run_dir": str(run_dir), "eval": ev}
    writer = MetricWriter(  # W&B gets the summary only: an evaluation has no steps
        run_dir,
        run_id=wandb_id(run_dir, "evaluate"),
        stage="evaluate",
        config=to_plain(cfg),
        wandb_mode=cfg.log.wandb_mode,
        project=cfg.log.wandb_project,
        entity=cfg.log.wandb_entity,
        group=cfg.log.wandb_group or cfg.run.name,
    )
    writer.summary({"eval": ev})
    writer.close()
    stop.check()  # before the summary: a requeued segment redoes only the cheap summary
    write_json(summary_file, summary)
    shutil.rmtree(run_dir / "partial", ignore_errors=True)
    return summary
