"""Runtime input errors (exports, data files) end in one ``error: ...`` line, exit 2, nothing written.

These pass config validation (the values have the right type) and fail only when the stage reads
them, so they are checked before the run dir exists (``remax.inputs``, ``jobs._stage``).
"""

from __future__ import annotations

import shutil

import pytest
from conftest import run_job
from tiny_exports import save_tiny_exports
from transformers import AutoTokenizer

COMMON = ["log.wandb_mode=disabled", "log.progress=false", "train.max_steps=1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    sft, rm = save_tiny_exports(root)
    (root / "empty.jsonl").write_text("")
    (root / "malformed.jsonl").write_text('{"prompt": "a"}\n{not json\n')
    (root / "no_config").mkdir()
    other = root / "rm_other_tokenizer"  # the RM export with one token added to its tokenizer
    shutil.copytree(rm, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["zz"])
    tok.save_pretrained(other)
    return {"root": root, "sft": sft, "rm": rm}


CASES = {
    "missing model.path": (
        "remax",
        lambda f: [f"model.path={f['root']}/missing", f"reward_model.path={f['rm']}"],
        "model.path=",
    ),
    "model.path without config.json": (
        "remax",
        lambda f: [f"model.path={f['root']}/no_config", f"reward_model.path={f['rm']}"],
        "no config.json",
    ),
    "missing reward_model.path": (
        "ppo",
        lambda f: [f"model.path={f['sft']}", f"reward_model.path={f['root']}/missing"],
        "reward_model.path=",
    ),
    "hub id not cached offline": (
        "sft",
        lambda f: ["model.path=nobody/no-such-model"],
        "hf download",
    ),
    "missing data.source": (
        "remax",
        lambda f: [f"reward_model.path={f['rm']}", f"data.source={f['root']}/missing.jsonl"],
        "no such file",
    ),
    "missing evaluate prompt_source": (
        "evaluate",
        lambda f: [f"policies=[{f['sft']}]", f"prompt_source={f['root']}/missing.jsonl"],
        "prompt_source=",
    ),
    "missing evaluate policy": (
        "evaluate",
        lambda f: [f"policies=[{f['root']}/missing]"],
        "policies[0]=",
    ),
    "empty data.source": (
        "sft",
        lambda f: [f"data.source={f['root']}/empty.jsonl"],
        "no rows",
    ),
    "malformed data.source": (
        "reward_model",
        lambda f: [f"data.source={f['root']}/malformed.jsonl"],
        "not valid JSON",
    ),
    # Another tokenizer is fine (remax.rewards re-templates; tests/test_rewards.py); one with ids
    # the model cannot embed would crash at some step instead of at load.
    "reward model whose tokenizer outgrows its embeddings": (
        "remax",
        lambda f: [f"model.path={f['sft']}", f"reward_model.path={f['root']}/rm_other_tokenizer"],
        "tokens but the model embeds",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_runtime_input_is_one_line_exit_2_nothing_written(tmp_path, files, case):
    stage, args, needle = CASES[case]
    root = tmp_path / "runs"
    common = COMMON if stage != "evaluate" else COMMON[:2]  # evaluate has no train group
    proc = run_job(f"jobs.{stage}", f"run.root={root}", *common, *args(files), check=False)
    # Progress bars of a model loaded before the data may precede it; the error is one last line.
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert needle in errors[0]
    assert any(k in errors[0] for k in ("data.source=", ".path=", "prompt_source=", "policies[")), (
        "the line names the key"
    )
    assert not root.exists(), f"written: {sorted(root.rglob('*'))}"
