"""The evaluation stage (`remax.evaluation`, ``python -m jobs.evaluate``): win-rate arithmetic, the
job's outputs, determinism, resumption, and the judges' answer files from the in-repo samples and
the real files in ../shared/data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_job

from jobs._config import compose_stage
from jobs._stage import run_stage
from remax import ledger
from remax.data.judge_formats import validate_alpaca_eval, validate_mt_bench_answers
from remax.data.templates import format_conversation
from remax.evaluation import SCORES, Prompt, answer_turns, load_prompt_set
from remax.rollout import SamplingConfig
from remax.stats import wilson_interval, win_rate

DATA = Path(__file__).resolve().parent / "data"
MT_SAMPLE = DATA / "mt_bench_question.jsonl"
ALPACA_SAMPLE = DATA / "alpaca_eval_instructions.json"


def _shared_data() -> Path | None:
    for candidate in (
        Path(__file__).resolve().parents[1] / ".." / "shared" / "data",
        Path("/work/shared/data"),
    ):
        if (candidate / "mt_bench_question.jsonl").is_file():
            return candidate.resolve()
    return None


SHARED = _shared_data()
needs_shared = pytest.mark.skipif(
    SHARED is None, reason="shared evaluation data (../shared/data or /work/shared/data) is absent"
)


# --------------------------------------------------------------------------- win rate


def test_win_rate_counts_ties_as_half_with_a_wilson_interval():
    # prompt:   0     1     2     3
    # a:        3     2     1     1
    # b:        1     2     2     1
    #           win   tie   loss  tie   -> (1 + 2/2) / 4 = 0.5
    w = win_rate([3, 2, 1, 1], [1, 2, 2, 1])
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (1, 2, 1, 4)
    assert w["win_rate"] == 0.5
    # Wilson, z = 1.96, n = 4: z²/n = 0.9604; centre = (0.5 + 0.4802) / 1.9604 = 0.5;
    # half = 1.96 · sqrt(0.25/4 + 3.8415/64) / 1.9604 = sqrt(0.0625 + 0.060023) = 0.35003
    assert w["ci_low"] == pytest.approx(0.5 - 0.35003, abs=1e-4)
    assert w["ci_high"] == pytest.approx(0.5 + 0.35003, abs=1e-4)


def test_win_rate_edges():
    # All wins, n = 3: centre = (1 + 3.8415/6) / (1 + 3.8415/3) = 1.64025 / 2.28049 = 0.71925;
    # half = 1.96 · sqrt(3.8415/36) / 2.28049 = 0.28075 -> [0.4385, 1.0]: not a point at p = 1.
    w = win_rate([1, 1, 1], [0, 0, 0])
    assert w["win_rate"] == 1.0
    assert w["ci_low"] == pytest.approx(0.43850, abs=1e-4) and w["ci_high"] == 1.0
    ties = win_rate([0.3] * 10, [0.3] * 10)
    assert ties["win_rate"] == 0.5 and ties["ties"] == 10
    assert ties["ci_low"] < 0.5 < ties["ci_high"]
    assert win_rate([0, 0], [1, 1])["win_rate"] == 0.0
    with pytest.raises(ValueError, match="len\\(a\\)=2 but len\\(b\\)=1"):
        win_rate([1, 2], [1])


@pytest.mark.parametrize("n", [1, 7, 64, 805])
def test_wilson_interval_contains_the_estimate(n):
    for k in range(0, 2 * n + 1, max(1, n // 4)):
        p = k / (2 * n)  # every multiple of a half win
        low, high = wilson_interval(p, n)
        assert 0 <= low <= p <= high <= 1
        assert high - low > 0
    # Wider for fewer prompts.
    assert wilson_interval(0.6, 8)[0] < wilson_interval(0.6, 800)[0]


# --------------------------------------------------------------------------- tiny exports


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Two tiny random policies and a tiny reward model, saved as HF dirs like stage exports."""
    from remax.models.tiny import build_tokenizer, llama_config, tiny_policy, tiny_reward_model

    root = tmp_path_factory.mktemp("exports")
    tok = build_tokenizer()
    config = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    out = {}
    for name, seed, build in (("a", 0, tiny_policy), ("b", 1, tiny_policy)) + (
        ("rm", 2, tiny_reward_model),
    ):
        torch.manual_seed(seed)
        model = build(llama_config(len(tok), **config))
        model.save_pretrained(root / name / "export")
        tok.save_pretrained(root / name / "export")
        out[name] = str(root / name / "export")
    return out


def _evaluate(exports, root: Path, *overrides: str) -> dict:
    cfg = compose_stage(
        "evaluate",
        [
            f"policies=[{exports['a']},{exports['b']}]",
            "names=[a,b]",
            f"reward_model.path={exports['rm']}",
            f"run.root={root}",
            "num_prompts=64",
            "batch_size=16",
            "log.progress=false",
            "log.wandb_mode=disabled",
            *overrides,
        ],
    )
    return run_stage("evaluate", cfg)


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "answers.jsonl").read_text().splitlines()]


def test_evaluate_job_writes_summary_and_answers(exports, tmp_path):
    proc = run_job(
        "jobs.evaluate",
        f"policies=[{exports['a']},{exports['b']}]",
        "names=[a,b]",
        f"reward_model.path={exports['rm']}",
        f"reference.path={exports['b']}",
        f"run.root={tmp_path}",
        "num_prompts=64",
        "batch_size=16",
        "log.wandb_mode=disabled",
    )
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    run_dir = Path(line["run_dir"])
    assert run_dir.parent == tmp_path / "evaluate" and run_dir.name.startswith("default-")
    ev = json.loads((run_dir / "summary.json").read_text())["eval"]
    assert ev == line["eval"]
    assert 0.0 <= ev["win_rate"] <= 1.0
    low, high = ev["win_rate_ci"]
    assert low <= ev["win_rate"] <= high
    counts = ev["win_counts"]
    assert counts["wins"] + counts["ties"] + counts["losses"] == counts["n"] == 64
    assert ev["win_rate"] == (counts["wins"] + counts["ties"] / 2) / 64
    assert ev["reward_source"] == "reward_model" and ev["policies"] == ["a", "b"]
    for name in ("a", "b"):
        assert set(ev["by_policy"][name]) == set(SCORES)  # the RL stages' eval keys
        assert ev["by_policy"][name]["reward"]["n"] == 64
    for kl in ("kl", "kl_token", "kl_sampled", "kl_sampled_token"):
        assert ev["by_policy"]["b"][kl]["mean"] == 0.0  # B is its own reference
        assert ev["by_policy"]["a"][kl]["mean"] != 0.0
    assert 0.0 <= ev["gold_win_rate"] <= 1.0
    rows = _rows(run_dir)
    assert len(rows) == 2 * 64
    assert [r["policy"] for r in rows] == ["a"] * 64 + ["b"] * 64
    assert [r["id"] for r in rows[:64]] == list(range(64))
    assert [r["prompt"] for r in rows[:64]] == [r["prompt"] for r in rows[64:]]  # same prompts
    row = rows[0]
    assert set(row) == {"policy", "id", "prompt", "response", *SCORES}
    assert row["prompt"].endswith("=") and isinstance(row["response"], str)
    assert not (run_dir / "partial").exists()


def test_same_seed_same_answers_and_another_seed_differs(exports, tmp_path):
    first = _evaluate(exports, tmp_path / "one")
    again = _evaluate(exports, tmp_path / "two")
    other = _evaluate(exports, tmp_path / "three", "seed=7")
    assert first["run_dir"] != again["run_dir"]  # run.root differs; the signature does not
    assert Path(first["run_dir"]).name == Path(again["run_dir"]).name
    assert _rows(first["run_dir"]) == _rows(again["run_dir"])
    assert first["eval"] == again["eval"]
    responses = [r["response"] for r in _rows(first["run_dir"])]
    assert responses != [r["response"] for r in _rows(other["run_dir"])]
    # Greedy decoding ignores the seed.
    greedy = [
        _evaluate(exports, tmp_path / f"g{s}", "decoding=greedy", f"seed={s}") for s in (1, 2)
    ]
    assert _rows(greedy[0]["run_dir"]) == _rows(greedy[1]["run_dir"])


def test_finished_evaluation_is_not_redone_and_a_killed_one_resumes(exports, tmp_path):
    done = _evaluate(exports, tmp_path)
    run_dir = Path(done["run_dir"])
    summary = run_dir / "summary.json"
    mtime = summary.stat().st_mtime_ns
    assert _evaluate(exports, tmp_path) == done
    assert summary.stat().st_mtime_ns == mtime

    # A kill during policy A's third batch: batches 0-1 complete, batch 2 half written and torn.
    rows = _rows(run_dir)
    a_rows = [{"batch": i // 16, **r} for i, r in enumerate(rows[:64])]
    a_rows[0]["response"] = "kept"  # proves batch 0 is reused, not decoded again
    partial = run_dir / "partial"
    partial.mkdir()
    lines = [json.dumps(r) for r in a_rows[:40]] + ['{"batch": 2, "policy": "a", "id']
    (partial / "a.jsonl").write_text("\n".join(lines) + "\n")
    for f in ("summary.json", "answers.jsonl"):
        (run_dir / f).unlink()
    resumed = _evaluate(exports, tmp_path)
    assert resumed["run_dir"] == str(run_dir)
    new_rows = _rows(run_dir)
    assert new_rows[0]["response"] == "kept"
    assert new_rows[1:] == rows[1:]
    # The segment's progress for the no-progress stop: A's batches 2-3 and B's four, not the kept.
    assert ledger.read(run_dir)[-1]["answered"] == 6


def test_answer_turns_feed_the_models_own_first_answer_into_turn_two(policy, tokenizer):
    prompts = [Prompt(1, ["abc=", "def="]), Prompt(2, ["ghij="]), Prompt(3, ["kl=", "mn=", "op="])]
    torch.manual_seed(0)
    turns = answer_turns(
        policy,
        tokenizer,
        prompts,
        template="plain",
        sampling=SamplingConfig(max_new_tokens=5),
        greedy=False,
        max_prompt_len=64,
    )
    assert [t.rows for t in turns] == [[0, 1, 2], [0, 2], [2]]
    first = dict(zip(turns[0].rows, turns[0].answers))
    second = dict(zip(turns[1].rows, turns[1].answers))
    conversation = [
        {"role": "user", "content": "abc="},
        {"role": "assistant", "content": first[0]},
        {"role": "user", "content": "def="},
    ]
    assert (
        turns[1].texts[0]
        == format_conversation(conversation, "plain")
        == f"abc=\n\n{first[0]}\n\ndef="
    )
    assert turns[2].texts[0] == f"kl=\n\n{first[2]}\n\nmn=\n\n{second[2]}\n\nop="


# --------------------------------------------------------------------------- judge answer files


def test_mt_bench_answer_file_from_the_in_repo_questions(exports, tmp_path):
    out = _evaluate(
        exports,
        tmp_path,
        f"prompt_source={MT_SAMPLE}",
        "prompt_format=mt_bench",
        "answer_format=mt_bench",
        "num_prompts=null",
        "max_new_tokens=6",
        "data.max_prompt_len=64",
    )
    run_dir, ev = Path(out["run_dir"]), out["eval"]
    for name in ("a", "b"):
        path = run_dir / "mt_bench" / "model_answer" / f"{name}.jsonl"
        assert ev["answer_files"][name] == str(path)
        assert validate_mt_bench_answers(path, MT_SAMPLE, require_all=True) == 3
        answers = [json.loads(line) for line in path.read_text().splitlines()]
        assert [a["question_id"] for a in answers] == [81, 101, 121]
        assert all(a["model_id"] == name and len(a["choices"][0]["turns"]) == 2 for a in answers)
    rows = _rows(run_dir)
    assert [r["id"] for r in rows] == [81, 101, 121] * 2
    assert all(len(r["prompt"]) == len(r["response"]) == 2 for r in rows)
    assert "gold" not in ev["by_policy"]["a"] and "gold_win_rate" not in ev
    assert 0.0 <= ev["win_rate"] <= 1.0  # the reward model judges the two-turn conversations


def test_alpaca_eval_answer_file_from_the_in_repo_instructions(exports, tmp_path):
    out = _evaluate(
        exports,
        tmp_path,
        f"prompt_source={ALPACA_SAMPLE}",
        "prompt_format=alpaca_eval",
        "answer_format=alpaca_eval",
        "num_prompts=null",
        "reward_model.path=null",
    )
    path = Path(out["eval"]["answer_files"]["a"])
    assert path == Path(out["run_dir"]) / "alpaca_eval" / "a.json"
    assert validate_alpaca_eval(path) == 3
    written = json.loads(path.read_text())
    instructions = [r["instruction"] for r in json.loads(ALPACA_SAMPLE.read_text())]
    assert [r["instruction"] for r in written] == instructions
    assert {r["generator"] for r in written} == {"a"}
    # No reward model and no gold score off the synthetic task: answer files only, no win rate.
    assert out["eval"]["reward_source"] is None and "win_rate" not in out["eval"]


@needs_shared
def test_real_mt_bench_questions_load_and_get_a_complete_answer_file(exports, tmp_path):
    questions = SHARED / "mt_bench_question.jsonl"
    prompts = load_prompt_set(str(questions), "mt_bench")
    assert len(prompts) == 80 and len({p.id for p in prompts}) == 80
    assert all(len(p.turns) == 2 for p in prompts)
    out = _evaluate(
        exports,
        tmp_path,
        f"policies=[{exports['a']}]",
        "names=[a]",
        f"prompt_source={questions}",
        "prompt_format=mt_bench",
        "answer_format=mt_bench",
        "num_prompts=null",
        "max_new_tokens=3",
        "batch_size=40",
    )
    path = out["eval"]["answer_files"]["a"]
    assert validate_mt_bench_answers(path, questions, require_all=True) == 80


@needs_shared
def test_real_alpaca_eval_release_outputs_load_as_a_prompt_set(exports, tmp_path):
    release = SHARED / "alpaca_eval_remax_release.json"
    assert validate_alpaca_eval(release) == 805
    prompts = load_prompt_set(str(release), "alpaca_eval")
    assert len(prompts) == 805 and all(len(p.turns) == 1 for p in prompts)
    assert prompts[0].turns[0] == json.loads(release.read_text())[0]["instruction"]
    out = _evaluate(
        exports,
        tmp_path,
        f"policies=[{exports['a']}]",
        "names=[a]",
        f"prompt_source={release}",
        "prompt_format=alpaca_eval",
        "answer_format=alpaca_eval",
        "num_prompts=null",
        "max_new_tokens=2",
        "batch_size=128",
        "reward_model.path=null",
    )
    assert validate_alpaca_eval(out["eval"]["answer_files"]["a"]) == 805


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides,message",
    [
        ([], "policies=[]: give one or more export/ dirs or HF names"),
        (["policies=[x/export]", "names=[a,b]"], "names=['a', 'b']: give one name per policy (1)"),
        (["policies=[x,y/x]"], "names=['x', 'x']: labels must be distinct plain names"),
        (["policies=[x]", "answer_format=mt_bench"], "set prompt_format=mt_bench"),
        (["policies=[x]", "num_prompts=300"], "must not exceed data.num_eval=256"),
        (["policies=[x]", "prompt_source=synthetic"], "use held_out"),
        (["policies=[x]", "top_p=0"], "top_p=0.0: use a value in (0, 1]"),
    ],
)
def test_bad_config_fails_in_one_line(overrides, message, capsys):
    with pytest.raises(SystemExit) as exc:
        compose_stage("evaluate", overrides)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: invalid config: "), err
    assert message in err[0]


def test_labels_derive_from_export_paths():
    from remax.config import EvaluateJobConfig

    cfg = EvaluateJobConfig(policies=["runs/remax/default-1a2b/export/", "org/model-7b"])
    assert cfg.labels == ["remax-default-1a2b", "model-7b"]
    assert math.isclose(cfg.response_len, cfg.data.max_response_len)


def test_reward_model_with_another_vocabulary_scores_the_same_text(policy, tokenizer, reward_model):
    """Re-tokenizing for a reward model with another vocabulary gives the scores of the direct path
    when the text round-trips (here: a superset vocabulary with the same character ids)."""
    from remax.config import RewardSourceConfig
    from remax.data.batching import encode
    from remax.evaluation import Scorer
    from remax.models.tiny import build_tokenizer
    from remax.rewards import RewardScorer

    other = build_tokenizer()
    other.add_tokens(["<extra>"])
    assert other.get_vocab() != tokenizer.get_vocab()
    raw = ["abc=", "ponmlk=", "hh=", "aiaia="]
    torch.manual_seed(0)
    [turn] = answer_turns(
        policy,
        tokenizer,
        [Prompt(i, [p]) for i, p in enumerate(raw)],
        template="plain",
        sampling=SamplingConfig(max_new_tokens=6),
        greedy=False,
        max_prompt_len=12,
    )

    def scorer(rm_tokenizer):
        reward = RewardScorer(
            RewardSourceConfig(path="rm"),
            None,
            max_prompt_len=12,
            model=reward_model,
            tokenizer=rm_tokenizer,
        )
        return Scorer(reward, gold=False)

    direct, retokenized = scorer(tokenizer), scorer(other)
    a = direct(policy, tokenizer, turn, raw)["reward"]
    b = retokenized(policy, tokenizer, turn, raw)["reward"]
    ro = turn.rollout
    compared = 0
    for i, answer in enumerate(turn.answers):
        ids = ro.response[i, : int(ro.lengths[i])].tolist()
        if encode(tokenizer, answer) == [t for t in ids if t != tokenizer.eos_token_id]:
            assert b[i] == pytest.approx(a[i], abs=1e-5), (i, answer)
            compared += 1
    assert compared >= 2


# --------------------------------------------------------------------------- pipeline


def test_pipeline_evaluates_remax_against_sft_and_can_skip_it(monkeypatch):
    from jobs import pipeline

    calls = []

    def fake_run_stage(stage, config):
        calls.append((stage, config))
        return {"stage": stage, "run_dir": f"/r/{stage}", "eval": {}}

    monkeypatch.setattr(pipeline, "run_stage", fake_run_stage)
    monkeypatch.setattr(pipeline, "_print_table", lambda summary: None)
    # train.* has no meaning for evaluate: an unprefixed override reaches only stages that have it.
    pipeline.main(["seed=3", "train.max_steps=2", "log.progress=false", "evaluate.num_prompts=64"])
    assert [s for s, _ in calls] == ["sft", "reward_model", "remax", "evaluate"]
    remax, ev = calls[2][1], calls[3][1]
    assert ev.policies == ["/r/remax/export", "/r/sft/export"] and ev.labels == ["remax", "sft"]
    assert ev.reward_model.path == "/r/reward_model/export"
    assert ev.reference.path == "/r/sft/export"
    assert (ev.seed, ev.num_prompts, ev.log.progress) == (3, 64, False)
    # Decoded as the ReMax stage evaluates (remax_official: sampled, top_p 0.9).
    assert (ev.decoding, ev.temperature, ev.top_p, ev.top_k) == (
        remax.algo.eval_decoding,
        remax.algo.temperature,
        remax.algo.top_p,
        remax.algo.top_k,
    )
    calls.clear()
    pipeline.main(["evaluate=false"])
    assert [s for s, _ in calls] == ["sft", "reward_model", "remax"]


def test_pipeline_rejects_a_bad_evaluate_override_before_training(monkeypatch):
    from jobs import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "run_stage", lambda stage, config: calls.append(stage))
    with pytest.raises(SystemExit) as exc:
        pipeline.main(["evaluate.top_p=2"])
    assert exc.value.code == 2 and calls == []
