"""AlpacaEval and MT-bench answer files (`remax.data.judge_formats`): round trips, validation, and
the real question sets and release outputs in ../shared/data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from remax.data.judge_formats import (
    load_alpaca_eval_instructions,
    load_mt_bench_questions,
    validate_alpaca_eval,
    validate_mt_bench_answers,
    write_alpaca_eval,
    write_mt_bench_answers,
)

DATA = Path(__file__).resolve().parent / "data"
MT_SAMPLE = DATA / "mt_bench_question.jsonl"
ALPACA_SAMPLE = DATA / "alpaca_eval_instructions.json"


def _shared_data() -> Path | None:
    """../shared/data relative to the repo root (CI), else /work/shared/data; None if neither."""
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


# --------------------------------------------------------------------------- AlpacaEval


def test_alpaca_eval_round_trip(tmp_path):
    instructions = load_alpaca_eval_instructions(ALPACA_SAMPLE)
    assert len(instructions) == 3
    rows = [
        {"instruction": ins, "output": f"answer {i}", "dataset": "remax_tests"}
        for i, ins in enumerate(instructions)
    ]
    rows[2].pop("dataset")
    path = write_alpaca_eval(tmp_path / "out" / "answers.json", rows, generator="remax-tiny")
    assert validate_alpaca_eval(path) == 3
    written = json.loads(path.read_text())
    assert written[0] == {
        "instruction": instructions[0],
        "output": "answer 0",
        "generator": "remax-tiny",
        "dataset": "remax_tests",
    }
    assert "dataset" not in written[2]
    assert load_alpaca_eval_instructions(path) == instructions


def test_alpaca_eval_empty_output_is_valid(tmp_path):
    path = write_alpaca_eval(
        tmp_path / "a.json", [{"instruction": "x", "output": ""}], generator="g"
    )
    assert validate_alpaca_eval(path) == 1


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_alpaca_eval_validation_names_the_first_bad_row(tmp_path):
    good = {"instruction": "i", "output": "o", "generator": "g"}
    no_output = _write(tmp_path / "a.json", [good, {"instruction": "i", "generator": "g"}, {}])
    with pytest.raises(
        ValueError,
        match=r"row 1: missing field 'output'; AlpacaEval needs \['instruction', 'output', 'generator'\]",
    ):
        validate_alpaca_eval(no_output)
    bad_type = _write(tmp_path / "b.json", [dict(good, output=None)])
    with pytest.raises(ValueError, match="row 0: field 'output' must be a string, got NoneType"):
        validate_alpaca_eval(bad_type)
    not_list = _write(tmp_path / "c.json", {"instruction": "i"})
    with pytest.raises(ValueError, match="expects a JSON list of objects, got a dict"):
        validate_alpaca_eval(not_list)
    with pytest.raises(ValueError, match="generator=''"):
        write_alpaca_eval(tmp_path / "d.json", [good], generator="")
    with pytest.raises(ValueError, match="row 0: missing field 'output'"):
        write_alpaca_eval(tmp_path / "e.json", [{"instruction": "i"}], generator="g")
    assert not (tmp_path / "e.json").exists()
    with pytest.raises(FileNotFoundError, match="no such file"):
        validate_alpaca_eval(tmp_path / "missing.json")


# --------------------------------------------------------------------------- MT-bench


def test_mt_bench_round_trip(tmp_path):
    questions = load_mt_bench_questions(MT_SAMPLE)
    assert [q["question_id"] for q in questions] == [81, 101, 121]
    answers = [
        {
            "question_id": q["question_id"],
            "turns": [f"a{q['question_id']}.{t}" for t in range(len(q["turns"]))],
        }
        for q in reversed(questions)
    ]
    path = write_mt_bench_answers(
        tmp_path / "model_answer" / "tiny.jsonl", answers, model_id="tiny"
    )
    assert validate_mt_bench_answers(path, MT_SAMPLE, require_all=True) == 3
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [81, 101, 121]  # sorted, as FastChat reorganises
    assert list(rows[0]) == ["question_id", "answer_id", "model_id", "choices", "tstamp"]
    assert rows[0]["model_id"] == "tiny"
    assert rows[0]["choices"] == [{"index": 0, "turns": ["a81.0", "a81.1"]}]
    assert isinstance(rows[0]["tstamp"], float) and len({r["answer_id"] for r in rows}) == 3


def test_mt_bench_validation_catches_wrong_turns_missing_fields_and_ids(tmp_path):
    path = write_mt_bench_answers(
        tmp_path / "m.jsonl", [{"question_id": 81, "turns": ["only one"]}], model_id="m"
    )
    assert validate_mt_bench_answers(path) == 1  # structurally fine without the questions
    with pytest.raises(ValueError, match="line 1: question 81 has 2 turns but the answer has 1"):
        validate_mt_bench_answers(path, MT_SAMPLE)

    row = json.loads(path.read_text())
    del row["tstamp"]
    (tmp_path / "n.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="line 1: missing field 'tstamp'"):
        validate_mt_bench_answers(tmp_path / "n.jsonl")

    ok = write_mt_bench_answers(
        tmp_path / "o.jsonl", [{"question_id": 999, "turns": ["a", "b"]}], model_id="m"
    )
    with pytest.raises(ValueError, match="question_id 999 is not in"):
        validate_mt_bench_answers(ok, MT_SAMPLE)

    partial = write_mt_bench_answers(
        tmp_path / "p.jsonl", [{"question_id": 81, "turns": ["a", "b"]}], model_id="m"
    )
    assert validate_mt_bench_answers(partial, MT_SAMPLE) == 1
    with pytest.raises(ValueError, match=r"no answer for 2 questions, first ids \[101, 121\]"):
        validate_mt_bench_answers(partial, MT_SAMPLE, require_all=True)


def test_mt_bench_write_refuses_bad_answers(tmp_path):
    with pytest.raises(ValueError, match="question_id 81 is answered twice"):
        write_mt_bench_answers(
            tmp_path / "a.jsonl", [{"question_id": 81, "turns": ["a"]}] * 2, model_id="m"
        )
    with pytest.raises(
        ValueError, match=r"answer 0: choices\[0\]\['turns'\] must be a non-empty list of strings"
    ):
        write_mt_bench_answers(
            tmp_path / "a.jsonl", [{"question_id": 81, "turns": "a"}], model_id="m"
        )
    with pytest.raises(ValueError, match="'question_id' must be an integer"):
        write_mt_bench_answers(
            tmp_path / "a.jsonl", [{"question_id": "81", "turns": ["a"]}], model_id="m"
        )
    assert not (tmp_path / "a.jsonl").exists()


def test_mt_bench_mixed_models_and_duplicates(tmp_path):
    a = write_mt_bench_answers(
        tmp_path / "a.jsonl", [{"question_id": 81, "turns": ["x", "y"]}], model_id="a"
    )
    b = write_mt_bench_answers(
        tmp_path / "b.jsonl", [{"question_id": 101, "turns": ["x", "y"]}], model_id="b"
    )
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(a.read_text() + b.read_text())
    with pytest.raises(
        ValueError, match="line 2: model_id 'b' differs from 'a'; write one file per model"
    ):
        validate_mt_bench_answers(mixed)
    dup = tmp_path / "dup.jsonl"
    dup.write_text(a.read_text() * 2)
    with pytest.raises(ValueError, match="line 2: duplicate question_id 81"):
        validate_mt_bench_answers(dup)


def test_mt_bench_question_errors(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "turns": ["a", "b"]}\n{"question_id": 2, "category": "x"}\n')
    with pytest.raises(
        ValueError, match=r"question 2 \(id 2\): 'turns' must be a non-empty list of strings"
    ):
        load_mt_bench_questions(bad)


# --------------------------------------------------------------------------- real data in ../shared/data


@needs_shared
def test_real_mt_bench_questions():
    questions = load_mt_bench_questions(SHARED / "mt_bench_question.jsonl")
    assert len(questions) == 80
    assert sum(len(q["turns"]) == 2 for q in questions) == 80
    assert [q["question_id"] for q in questions] == list(range(81, 161))
    # Our excerpt is a verbatim copy of three of them.
    by_id = {q["question_id"]: q for q in questions}
    assert all(by_id[q["question_id"]] == q for q in load_mt_bench_questions(MT_SAMPLE))


@needs_shared
@pytest.mark.parametrize("name", ["alpaca_eval_remax_release.json", "alpaca_eval_sft_release.json"])
def test_real_alpaca_eval_release_outputs(name):
    path = SHARED / name
    assert validate_alpaca_eval(path) == 805
    instructions = load_alpaca_eval_instructions(path)
    assert len(instructions) == 805 and all(instructions)


@needs_shared
def test_real_release_outputs_share_instructions():
    remax = load_alpaca_eval_instructions(SHARED / "alpaca_eval_remax_release.json")
    sft = load_alpaca_eval_instructions(SHARED / "alpaca_eval_sft_release.json")
    assert remax == sft
