"""Answer files for the public judges, AlpacaEval and MT-bench, and their question sets.

- AlpacaEval reads a JSON list of objects with at least ``instruction``, ``output`` and
  ``generator`` (``alpaca_eval --model_outputs answers.json``); ``dataset`` is kept when given.
- MT-bench (FastChat ``fastchat/llm_judge``) reads one JSON object per line, as
  ``gen_model_answer.py`` writes it: ``question_id``, ``answer_id``, ``model_id``,
  ``choices: [{"index": 0, "turns": [answer1, answer2]}]``, ``tstamp``. ``gen_judgment.py`` takes
  the model name from the file name, so save it as ``data/mt_bench/model_answer/<model_id>.jsonl``,
  and stops with "Missing model answer" unless every question it judges has an answer.

Validators raise ValueError with one line naming the file, the first bad row and the fix, and
return the row count, so a job can check its output before a judge spends API calls on it.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from remax.fileio import atomic_write_text

ALPACA_EVAL_FIELDS = ("instruction", "output", "generator")
MT_BENCH_ANSWER_FIELDS = ("question_id", "answer_id", "model_id", "choices", "tstamp")
PathLike = str | os.PathLike


# --------------------------------------------------------------------------- AlpacaEval


def write_alpaca_eval(path: PathLike, rows: list[dict[str, Any]], generator: str) -> Path:
    """Write ``rows`` (``{"instruction", "output"}``, optional ``dataset``) for AlpacaEval.

    Every row gets ``generator``; the file is written whole or not at all (temp file + rename).
    """
    if not isinstance(generator, str) or not generator:
        raise ValueError(f"generator={generator!r}: give the model's name as a non-empty string")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(
                f"row {i}: expected an {{'instruction', 'output'}} dict, got {type(row).__name__}"
            )
        item = {k: row[k] for k in ("instruction", "output") if k in row}
        item["generator"] = generator
        if "dataset" in row:
            item["dataset"] = row["dataset"]
        _check_alpaca_row(item, f"row {i}")
        out.append(item)
    return _write_atomic(Path(path), json.dumps(out, ensure_ascii=False, indent=2) + "\n")


def validate_alpaca_eval(path: PathLike) -> int:
    """Number of rows of an AlpacaEval outputs file; ValueError on the first bad row."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: AlpacaEval expects a JSON list of objects, got a {type(data).__name__}"
        )
    for i, row in enumerate(data):
        _check_alpaca_row(row, f"{path}: row {i}")
    return len(data)


def load_alpaca_eval_instructions(path: PathLike) -> list[str]:
    """The ``instruction`` of every row of an AlpacaEval set (.json list or .jsonl), in order."""
    path = Path(path)
    if path.suffix == ".jsonl":
        data = _read_jsonl(path)
    else:
        data = _read_json(path)
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: expected a JSON list of objects with 'instruction', got a {type(data).__name__}"
        )
    out = []
    for i, row in enumerate(data):
        instruction = row.get("instruction") if isinstance(row, dict) else None
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(
                f"{path}: row {i}: no 'instruction' string; AlpacaEval sets have one per row"
            )
        out.append(instruction)
    return out


def _check_alpaca_row(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object, got a {type(row).__name__}")
    for field in ALPACA_EVAL_FIELDS:
        if field not in row:
            raise ValueError(
                f"{where}: missing field {field!r}; AlpacaEval needs {list(ALPACA_EVAL_FIELDS)}"
            )
        if not isinstance(row[field], str):
            raise ValueError(
                f"{where}: field {field!r} must be a string, got {type(row[field]).__name__}"
            )
    # An empty output is a legitimate (losing) answer; an empty instruction or generator is a bug.
    for field in ("instruction", "generator"):
        if not row[field].strip():
            raise ValueError(f"{where}: field {field!r} is empty")


# --------------------------------------------------------------------------- MT-bench


def load_mt_bench_questions(path: PathLike) -> list[dict[str, Any]]:
    """MT-bench questions (``question_id``, ``category``, ``turns``, maybe ``reference``), in order."""
    path = Path(path)
    questions = _read_jsonl(path)
    seen: set[int] = set()
    for i, q in enumerate(questions, start=1):
        where = f"{path}: question {i}"
        if not isinstance(q, dict):
            raise ValueError(f"{where}: expected an object, got a {type(q).__name__}")
        qid, turns = q.get("question_id"), q.get("turns")
        if not isinstance(qid, int):
            raise ValueError(f"{where}: 'question_id' must be an integer, got {qid!r}")
        if qid in seen:
            raise ValueError(f"{where}: duplicate question_id {qid}")
        seen.add(qid)
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise ValueError(f"{where} (id {qid}): 'turns' must be a non-empty list of strings")
    return questions


def write_mt_bench_answers(path: PathLike, answers: list[dict[str, Any]], model_id: str) -> Path:
    """Write ``answers`` (``{"question_id", "turns": [t1, t2]}``) as FastChat answer JSONL.

    Rows are sorted by question_id (as FastChat's ``reorg_answer_file`` leaves them); the file is
    replaced, not appended to.
    """
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"model_id={model_id!r}: give the model's name as a non-empty string")
    rows = []
    for i, ans in enumerate(answers):
        if not isinstance(ans, dict):
            raise ValueError(
                f"answer {i}: expected a {{'question_id', 'turns'}} dict, got {type(ans).__name__}"
            )
        row = {
            "question_id": ans.get("question_id"),
            "answer_id": uuid.uuid4().hex,
            "model_id": model_id,
            "choices": [{"index": 0, "turns": ans.get("turns")}],
            "tstamp": time.time(),
        }
        _check_mt_bench_row(row, f"answer {i}", model_id)
        rows.append(row)
    ids = [row["question_id"] for row in rows]
    if len(set(ids)) < len(ids):
        dup = next(q for q in ids if ids.count(q) > 1)
        raise ValueError(f"question_id {dup} is answered twice; give one answer per question")
    rows.sort(key=lambda row: row["question_id"])
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    return _write_atomic(Path(path), "".join(line + "\n" for line in lines))


def validate_mt_bench_answers(
    path: PathLike, questions_path: PathLike | None = None, *, require_all: bool = False
) -> int:
    """Number of answers in a FastChat MT-bench answer file; ValueError on the first bad row.

    With ``questions_path``, each answer's question must exist and its turn count must match the
    question's; ``require_all`` also demands an answer for every question (``gen_judgment.py``
    refuses to judge a model with missing answers).
    """
    path = Path(path)
    rows = _read_jsonl(path)
    if not rows:
        raise ValueError(f"{path}: no answers")
    questions = None
    if questions_path is not None:
        questions = {q["question_id"]: q for q in load_mt_bench_questions(questions_path)}
    model_id = rows[0].get("model_id") if rows and isinstance(rows[0], dict) else None
    seen: set[Any] = set()
    for lineno, row in enumerate(rows, start=1):
        where = f"{path}: line {lineno}"
        _check_mt_bench_row(row, where, model_id)
        qid = row["question_id"]
        if qid in seen:
            raise ValueError(
                f"{where}: duplicate question_id {qid}; FastChat keeps only the last one"
            )
        seen.add(qid)
        if questions is None:
            continue
        if qid not in questions:
            raise ValueError(f"{where}: question_id {qid} is not in {questions_path}")
        want, got = len(questions[qid]["turns"]), len(row["choices"][0]["turns"])
        if want != got:
            raise ValueError(f"{where}: question {qid} has {want} turns but the answer has {got}")
    if questions is not None and require_all and (missing := sorted(set(questions) - seen)):
        raise ValueError(f"{path}: no answer for {len(missing)} questions, first ids {missing[:5]}")
    return len(rows)


def _check_mt_bench_row(row: Any, where: str, model_id: str | None) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object, got a {type(row).__name__}")
    for field in MT_BENCH_ANSWER_FIELDS:
        if field not in row:
            raise ValueError(
                f"{where}: missing field {field!r}; FastChat answers need {list(MT_BENCH_ANSWER_FIELDS)}"
            )
    if not isinstance(row["question_id"], int) or isinstance(row["question_id"], bool):
        raise ValueError(f"{where}: 'question_id' must be an integer, got {row['question_id']!r}")
    if row["model_id"] != model_id:
        raise ValueError(
            f"{where}: model_id {row['model_id']!r} differs from {model_id!r}; write one file per model"
        )
    choices = row["choices"]
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError(
            f"{where}: 'choices' must be a non-empty list of {{'index', 'turns'}} objects"
        )
    turns = choices[0].get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        raise ValueError(
            f"{where}: choices[0]['turns'] must be a non-empty list of strings, got {turns!r:.80}"
        )


# --------------------------------------------------------------------------- file helpers


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path.resolve()}: no such file; check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _read_jsonl(path: Path) -> list[Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path.resolve()}: no such file; check the path")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
    return rows


_write_atomic = atomic_write_text
