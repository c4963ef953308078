"""Loaders (`remax.data.sources`) on every sample format, and chat templates (`remax.data.templates`).

Offline only: the hub is switched off in-process (env and the already-imported config flags), so a
hub name fails at once instead of retrying for ~48 s.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pytest

from remax.data.sources import (
    DataFormat,
    load_preference_records,
    load_prompt_records,
    load_sft_records,
    split_fractions,
    split_indices,
)
from remax.data.templates import ChatTemplate, format_conversation, format_prompt

DATA = Path(__file__).resolve().parent / "data"
HH = DATA / "hh_sample.jsonl"
UF = DATA / "ultrafeedback_sample.jsonl"
MT = DATA / "mt_bench_question.jsonl"
ALPACA = DATA / "alpaca_eval_instructions.json"
TXT = DATA / "prompts.txt"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    # Parquet files and hub-repo folders are prepared into the datasets cache: keep it per test.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read the env at import time; the flags below are what they check per call.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _variants(sample: Path, tmp_path: Path) -> dict[str, Path]:
    """The same rows as .jsonl, .json (list), .parquet and a save_to_disk directory."""
    rows = _jsonl(sample)
    as_json = tmp_path / f"{sample.stem}.json"
    as_json.write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    as_parquet = tmp_path / f"{sample.stem}.parquet"
    ds.to_parquet(str(as_parquet))
    as_disk = tmp_path / f"{sample.stem}_disk"
    ds.save_to_disk(str(as_disk))
    return {"jsonl": sample, "json": as_json, "parquet": as_parquet, "disk": as_disk}


# --------------------------------------------------------------------------- hh (Dahoas)

HH_ROWS = _jsonl(HH)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "disk"])
def test_hh_all_kinds_every_file_type(tmp_path, kind):
    path = _variants(HH, tmp_path)[kind]
    sft = load_sft_records(path)
    pref = load_preference_records(path)
    prompts = load_prompt_records(path)
    assert len(sft) == len(pref) == len(prompts) == 6
    assert sft[0] == {"prompt": HH_ROWS[0]["prompt"], "response": HH_ROWS[0]["chosen"]}
    assert pref[1] == {k: HH_ROWS[1][k] for k in ("prompt", "chosen", "rejected")}
    assert [p["prompt"] for p in prompts] == [r["prompt"] for r in HH_ROWS]


def test_hh_sft_falls_back_to_response_without_chosen(tmp_path):
    path = tmp_path / "sft_only.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n" for r in HH_ROWS
        )
    )
    assert load_sft_records(path)[2]["response"] == HH_ROWS[2]["response"]
    with pytest.raises(
        ValueError, match=r"need column chosen, rejected; columns seen \['prompt', 'response'\]"
    ):
        load_preference_records(path)


def test_save_to_disk_dataset_dict_picks_split(tmp_path):
    ds = datasets.Dataset.from_list(HH_ROWS)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert len(load_preference_records(tmp_path / "dd")) == 6
    assert len(load_preference_records(tmp_path / "dd", split="test")) == 2
    with pytest.raises(ValueError, match=r"has no split 'validation'; splits: \['test', 'train'\]"):
        load_preference_records(tmp_path / "dd", split="validation")


def test_hub_repo_folder_as_hf_download_writes_it(tmp_path):
    # `hf download --repo-type dataset NAME --local-dir DIR` leaves data/<split>-*.parquet.
    (tmp_path / "repo" / "data").mkdir(parents=True)
    ds = datasets.Dataset.from_list(HH_ROWS)
    ds.to_parquet(str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"))
    ds.select(range(3)).to_parquet(str(tmp_path / "repo" / "data" / "test-00000-of-00001.parquet"))
    assert len(load_sft_records(tmp_path / "repo")) == 6
    assert len(load_sft_records(tmp_path / "repo", split="test")) == 3


def test_in_memory_sources_and_limit():
    assert len(load_preference_records(datasets.Dataset.from_list(HH_ROWS), limit=4)) == 4
    assert load_prompt_records(["a", "b"]) == [{"prompt": "a"}, {"prompt": "b"}]
    assert load_sft_records(HH, limit=1) == load_sft_records(HH)[:1]
    with pytest.raises(ValueError, match="limit=0"):
        load_sft_records(HH, limit=0)


def test_rows_with_empty_fields_are_skipped(tmp_path, caplog):
    rows = [dict(HH_ROWS[0], rejected=""), dict(HH_ROWS[1], chosen=None), HH_ROWS[2]]
    path = tmp_path / "holes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_preference_records(path) == [
        {k: HH_ROWS[2][k] for k in ("prompt", "chosen", "rejected")}
    ]
    assert "skipped 2 of 3 rows" in caplog.text


# --------------------------------------------------------------------------- ultrafeedback

UF_ROWS = _jsonl(UF)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "disk"])
def test_ultrafeedback_all_kinds_every_file_type(tmp_path, kind):
    path = _variants(UF, tmp_path)[kind]
    sft = load_sft_records(path, split="train_sft")  # split is ignored for single files
    pref = load_preference_records(path)
    prompts = load_prompt_records(path)
    assert len(sft) == len(pref) == len(prompts) == 4
    row = UF_ROWS[3]
    assert sft[3] == {"prompt": row["prompt"], "response": row["chosen"][-1]["content"]}
    assert pref[3] == {
        "prompt": row["prompt"],
        "chosen": row["chosen"][-1]["content"],
        "rejected": row["rejected"][-1]["content"],
    }
    assert prompts[0] == {"prompt": UF_ROWS[0]["prompt"]}


def test_ultrafeedback_without_prompt_column_uses_last_user_message():
    rows = [{"messages": r["messages"]} for r in UF_ROWS]
    sft = load_sft_records(rows)
    assert sft[1] == {
        "prompt": UF_ROWS[1]["prompt"],
        "response": UF_ROWS[1]["chosen"][1]["content"],
    }


def test_ultrafeedback_split_names_from_disk(tmp_path):
    ds = datasets.Dataset.from_list(UF_ROWS)
    datasets.DatasetDict({"train_prefs": ds, "test_prefs": ds.select([0])}).save_to_disk(
        str(tmp_path / "uf")
    )
    assert len(load_preference_records(tmp_path / "uf", split="test_prefs")) == 1
    with pytest.raises(
        ValueError, match=r"no split 'train'; splits: \['test_prefs', 'train_prefs'\]"
    ):
        load_preference_records(tmp_path / "uf")


# --------------------------------------------------------------------------- prompt lists


def test_prompt_lists_txt_json_strings_alpaca_mt_bench(tmp_path):
    assert load_prompt_records(TXT) == [
        {"prompt": "What is the tallest mountain in Europe?"},
        {"prompt": "How do I make cold brew coffee?"},
        {"prompt": "Name three uses for baking soda."},
    ]
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps(["first prompt", "second prompt"]))
    assert load_prompt_records(strings) == [{"prompt": "first prompt"}, {"prompt": "second prompt"}]
    alpaca = load_prompt_records(ALPACA)
    assert [p["prompt"] for p in alpaca] == [
        r["instruction"] for r in json.loads(ALPACA.read_text())
    ]
    mt = load_prompt_records(MT)
    assert [p["prompt"] for p in mt] == [q["turns"][0] for q in _jsonl(MT)]
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"prompt": "p1", "id": 1}\n{"prompt": "p2", "id": 2}\n')
    assert load_prompt_records(plain) == [{"prompt": "p1"}, {"prompt": "p2"}]


@pytest.mark.parametrize("kind", ["json", "parquet", "disk"])
def test_mt_bench_prompts_every_file_type(tmp_path, kind):
    path = _variants(MT, tmp_path)[kind]
    assert len(load_prompt_records(path)) == 3


def test_prompt_only_sources_refuse_sft_and_preference():
    with pytest.raises(
        ValueError,
        match=r"format alpaca_eval has no sft data; sft records need one of \['hh', 'ultrafeedback'\]",
    ):
        load_sft_records(ALPACA)
    with pytest.raises(ValueError, match="format prompts has no preference data"):
        load_preference_records(TXT)


# --------------------------------------------------------------------------- detection and override


@pytest.mark.parametrize(
    ("path", "fmt"),
    [
        (HH, "hh"),
        (UF, "ultrafeedback"),
        (MT, "mt_bench"),
        (ALPACA, "alpaca_eval"),
        (TXT, "prompts"),
    ],
)
def test_override_agrees_with_autodetect(path, fmt):
    assert load_prompt_records(path, fmt=fmt) == load_prompt_records(path)
    assert load_prompt_records(path, fmt=DataFormat(fmt)) == load_prompt_records(path)


def test_override_changes_the_reading():
    # An hh file read as a plain prompt list: same prompts, the answers are ignored.
    assert load_prompt_records(HH, fmt="prompts") == load_prompt_records(HH)
    # Forcing hh on ultrafeedback rows: chosen/rejected are lists, so no row is usable.
    with pytest.raises(
        ValueError, match=r"none of 4 rows gave a preference record as format hh; columns seen \["
    ):
        load_preference_records(UF, fmt="hh")
    with pytest.raises(
        ValueError,
        match="unknown data format 'dahoas'; valid: hh, ultrafeedback, prompts, alpaca_eval, mt_bench",
    ):
        load_prompt_records(HH, fmt="dahoas")


# --------------------------------------------------------------------------- errors


def test_missing_file_names_the_path_and_the_fix(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=f"data source not found: {missing}.*fix the path"):
        load_sft_records(missing)
    with pytest.raises(FileNotFoundError, match="data source not found"):
        load_sft_records("no/such/dir/train")  # not owner/name: never sent to the hub


def test_unknown_columns_lists_seen_and_accepted(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(ValueError) as err:
        load_prompt_records(path)
    msg = str(err.value)
    assert "columns ['answer', 'question']" in msg
    for fmt in DataFormat:
        assert fmt.value in msg
    assert "\n" not in msg


def test_unsupported_suffix_and_bad_json(tmp_path):
    (tmp_path / "d.csv").write_text("prompt\nx\n")
    with pytest.raises(ValueError, match=r"unsupported file type '.csv'"):
        load_prompt_records(tmp_path / "d.csv")
    (tmp_path / "obj.json").write_text('{"train": []}')
    with pytest.raises(
        ValueError, match=r"expected a JSON list of objects or strings, got \['train'\]"
    ):
        load_prompt_records(tmp_path / "obj.json")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        load_prompt_records(tmp_path / "broken.jsonl")


def test_hub_name_offline_fails_fast_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    start = time.monotonic()
    with pytest.raises(ConnectionError) as err:
        load_preference_records("Dahoas/rm-static", split="train")
    assert time.monotonic() - start < 5.0
    msg = str(err.value)
    assert "Dahoas/rm-static" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "huggingface-cli download" in msg and "local" in msg
    assert "\n" not in msg


# --------------------------------------------------------------------------- DeepSpeed-Chat data split


def test_split_2_4_4_is_disjoint_complete_and_deterministic():
    n, seed = 1000, 1234
    parts = [split_indices(n, (2, 4, 4), stage_index=i, seed=seed) for i in range(3)]
    assert [len(p) for p in parts] == [200, 400, 400]
    assert sorted(sum(parts, [])) == list(range(n))
    # The stages are consecutive slices of one RandomState(seed) permutation, as in DeepSpeed-Chat.
    assert sum(parts, []) == np.random.RandomState(seed).permutation(n).tolist()
    assert parts == [split_indices(n, "2,4,4", stage_index=i, seed=seed) for i in range(3)]
    assert split_indices(n, stage_index=0, seed=seed + 1) != parts[0]


@pytest.mark.parametrize(
    ("n", "sizes"),
    [
        (10, [2, 4, 4]),
        (7, [1, 3, 3]),  # round(1.4)=1, 1+round(2.8)=4, 4+round(2.8)=7
        (4, [0, 2, 2]),  # 1, 3, 5 overshoot by 1: every cut moves left, so SFT gets nothing
        (1, [1, 0, 0]),  # 0, 0, 0 undershoot by 1: every cut moves right
    ],
)
def test_split_rounding_matches_deepspeed_chat(n, sizes):
    assert [len(split_indices(n, (2, 4, 4), stage_index=i, seed=0)) for i in range(3)] == sizes


def test_split_fractions_on_records_and_datasets():
    records = load_preference_records(HH)
    sft = split_fractions(records, (1, 1, 1), stage_index=0, seed=3)
    rm = split_fractions(records, (1, 1, 1), stage_index=1, seed=3)
    rl = split_fractions(records, (1, 1, 1), stage_index=2, seed=3)
    assert len(sft) == len(rm) == len(rl) == 2
    prompts = [r["prompt"] for r in sft + rm + rl]
    assert sorted(prompts) == sorted(r["prompt"] for r in records)
    assert split_fractions(records, (1, 1, 1), stage_index=1, seed=3) == rm
    ds = split_fractions(datasets.Dataset.from_list(records), (1, 1, 1), stage_index=1, seed=3)
    assert isinstance(ds, datasets.Dataset) and ds.to_list() == rm
    # A zero weight turns a stage off (e.g. "10,0,0": all data to SFT).
    assert len(split_fractions(records, (10, 0, 0), stage_index=0, seed=3)) == 6


def test_split_rejects_bad_arguments():
    with pytest.raises(ValueError, match="stage_index=3 is out of range for 3 split weights"):
        split_indices(10, (2, 4, 4), stage_index=3, seed=0)
    with pytest.raises(ValueError, match="non-negative numbers with a positive sum"):
        split_indices(10, (2, -1, 4), stage_index=0, seed=0)
    with pytest.raises(ValueError, match="non-negative numbers with a positive sum"):
        split_indices(10, "2,x,4", stage_index=0, seed=0)


# --------------------------------------------------------------------------- chat templates


def test_plain_template_is_identity():
    assert format_prompt("  Hi there\n", "plain") == "  Hi there\n"


def test_hh_template_wraps_raw_prompts_and_keeps_dahoas_prompts():
    assert format_prompt("How are you?", ChatTemplate.hh) == "\n\nHuman: How are you?\n\nAssistant:"
    for row in HH_ROWS:  # Dahoas prompts end in "Assistant:" already, multi-turn ones included
        assert format_prompt(row["prompt"], "hh") == row["prompt"]
    once = format_prompt("Name a colour.", "hh")
    assert format_prompt(once, "hh") == once


def test_hh_conversation_for_an_mt_bench_second_turn():
    turns = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    assert (
        format_conversation(turns, "hh")
        == "\n\nHuman: Q1\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant:"
    )
    assert format_conversation(turns, "plain") == "Q1\n\nA1\n\nQ2"
    # Same shape as the Dahoas multi-turn prompts: prompt + " " + response continues the dialogue.
    assert format_conversation(
        turns[:1], "hh"
    ) + " A1" + "\n\nHuman: Q2\n\nAssistant:" == format_conversation(turns, "hh")


def _chat_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<eos>",
        pad_token="<eos>",
        chat_template=(
            "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}"
        ),
    )


def test_tokenizer_template_uses_the_chat_template():
    tok = _chat_tokenizer()
    assert format_prompt("Hi", "tokenizer", tok) == "<|user|>Hi\n<|assistant|>"
    turns = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    assert (
        format_conversation(turns, "tokenizer", tok)
        == "<|user|>Q1\n<|assistant|>A1\n<|user|>Q2\n<|assistant|>"
    )


def test_template_errors():
    with pytest.raises(
        ValueError, match="unknown chat template 'chatml'; valid: plain, hh, tokenizer"
    ):
        format_prompt("x", "chatml")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        format_prompt("x", "tokenizer")
    tok = _chat_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat_template; use template 'hh' or 'plain'"):
        format_prompt("x", "tokenizer", tok)
    with pytest.raises(ValueError, match="the last turn must be the user's"):
        format_conversation(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "hh"
        )
    with pytest.raises(ValueError, match="turn 0: expected"):
        format_conversation([{"role": "human", "content": "q"}], "hh")
