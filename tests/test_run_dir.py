"""Run dirs: the signature names a config's result, and a dir never silently changes config."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs._config import compose_stage
from jobs.pipeline import split_overrides
from remax.config import Aggregation, RemaxJobConfig, SFTJobConfig, WandbMode
from remax.run_dir import (
    EXCLUDED_KEYS,
    RunDirError,
    flatten,
    prepare,
    result_keys,
    run_dir_for,
    signature,
    to_plain,
)

REPO = Path(__file__).resolve().parents[1]


def _with(cfg, key: str, value):
    """A copy of ``cfg`` with the dotted ``key`` set (``__post_init__`` runs again)."""
    head, _, rest = key.partition(".")
    new = _with(getattr(cfg, head), rest, value) if rest else value
    return dataclasses.replace(cfg, **{head: new})


def _config(root: Path, **keys) -> RemaxJobConfig:
    cfg = _with(RemaxJobConfig(), "run.root", str(root))
    for key, value in keys.items():
        cfg = _with(cfg, key.replace("__", "."), value)
    return cfg


def _snapshot(path: Path) -> dict:
    """Every file and dir under ``path`` with its bytes and mtime."""
    return {
        p.relative_to(path).as_posix(): None
        if p.is_dir()
        else (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
    }


def _edit_saved(run_dir: Path, edit) -> bytes:
    """Rewrite ``config.yaml`` on disk through ``edit(dict)``; return the new bytes."""
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    edit(saved)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return (run_dir / "config.yaml").read_bytes()


# ---- signature ----

SIG_SCRIPT = (
    "from jobs._config import compose_stage; from remax.run_dir import signature; "
    "print(signature(compose_stage('remax', ['seed=7', 'algo=remax_paper']), 'remax'))"
)


def test_signature_is_stable_across_calls_and_processes():
    cfg = compose_stage("remax", ["seed=7", "algo=remax_paper"])
    sig = signature(cfg, "remax")
    assert re.fullmatch(r"[0-9a-f]{8}", sig)
    assert signature(cfg, "remax") == sig
    assert signature(compose_stage("remax", ["seed=7", "algo=remax_paper"]), "remax") == sig
    # Other processes, with different str hash seeds (a set or hash() in the payload would show).
    for hash_seed in ("0", "12345"):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", SIG_SCRIPT],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=True,
        )
        assert out.stdout.strip() == sig, out.stderr


def test_excluded_keys_name_real_config_keys():
    keys = flatten(to_plain(RemaxJobConfig()))
    for excluded in EXCLUDED_KEYS:
        assert any(k == excluded or k.startswith(excluded + ".") for k in keys), excluded


def test_result_keys_drop_only_excluded_keys():
    kept = result_keys(RemaxJobConfig())
    assert not any(
        k.startswith(("run.root", "run.name", "log.", "cluster.", "checkpoint.")) for k in kept
    )
    assert "train.log_every" not in kept
    for key in ("seed", "run.attempt", "optim.lr", "algo.kl_coef", "data.seed", "train.max_steps"):
        assert key in kept, key


EXCLUDED_CHANGES = {
    "run.root": "/elsewhere",
    "run.name": "renamed",
    "run.force": True,
    "log.wandb_mode": WandbMode.disabled,
    "log.wandb_project": "other",
    "log.progress": False,
    "cluster.device": "cpu",
    "cluster.num_threads": 3,
    "checkpoint.every_steps": 7,
    "checkpoint.keep_last": 5,
    "train.log_every": 1,
}
RESULT_CHANGES = {
    "seed": 43,
    "optim.lr": 2e-3,
    "algo.kl_coef": 0.1,
    "algo.aggregation": Aggregation.token_mean,
    "run.attempt": 1,
    "data.seed": 1,
}


@pytest.mark.parametrize("key,value", EXCLUDED_CHANGES.items(), ids=list(EXCLUDED_CHANGES))
def test_signature_ignores_excluded_key(key, value, tmp_path):
    cfg = _config(tmp_path)
    assert signature(_with(cfg, key, value), "remax") == signature(cfg, "remax")


@pytest.mark.parametrize("key,value", RESULT_CHANGES.items(), ids=list(RESULT_CHANGES))
def test_signature_changes_with_result_key(key, value, tmp_path):
    cfg = _config(tmp_path)
    assert flatten(to_plain(_with(cfg, key, value)))[key] != flatten(to_plain(cfg))[key]
    assert signature(_with(cfg, key, value), "remax") != signature(cfg, "remax")


def test_signature_depends_on_stage():
    # SFT and reward-model configs share their fields: the stage must still separate them.
    cfg = SFTJobConfig()
    assert signature(cfg, "sft") != signature(cfg, "reward_model")


def test_run_dir_path(tmp_path):
    cfg = _config(tmp_path, run__name="exp1")
    path = run_dir_for(cfg, "remax")
    assert path.parent == tmp_path / "remax"
    assert re.fullmatch(r"exp1-[0-9a-f]{8}", path.name)
    assert path.name == f"exp1-{signature(cfg, 'remax')}"


# ---- prepare ----


def test_prepare_writes_config_and_reopens(tmp_path):
    cfg = _config(tmp_path)
    path = prepare(cfg, "remax")
    assert path == run_dir_for(cfg, "remax")
    assert sorted(os.listdir(path)) == ["config.yaml"]
    assert yaml.safe_load((path / "config.yaml").read_text()) == to_plain(cfg)
    # The same config again (a resume) reopens the same dir.
    assert prepare(cfg, "remax") == path
    assert sorted(os.listdir(path)) == ["config.yaml"]


def test_prepare_refuses_dir_whose_config_differs(tmp_path):
    cfg = _config(tmp_path)
    path = prepare(cfg, "remax")
    (path / "checkpoints" / "step_2").mkdir(parents=True)
    (path / "checkpoints" / "step_2" / "state.pt").write_bytes(b"weights")

    def edit(saved):
        saved["seed"] = 999
        saved["optim"]["lr"] = 0.5
        saved["log"]["wandb_mode"] = "disabled"  # excluded: must not be reported

    _edit_saved(path, edit)
    before = _snapshot(path)
    with pytest.raises(RunDirError) as exc:
        prepare(cfg, "remax")
    message = str(exc.value)
    assert "(keys: optim.lr, seed)" in message
    assert str(path) in message
    assert "run.attempt" in message and "run.force" in message  # the two ways out
    assert _snapshot(path) == before


def test_prepare_accepts_dir_differing_only_on_excluded_keys(tmp_path):
    cfg = _config(tmp_path)
    path = prepare(cfg, "remax")

    def edit(saved):
        saved["log"]["wandb_mode"] = "disabled"
        saved["cluster"]["device"] = "cuda"
        saved["checkpoint"]["every_steps"] = 1
        saved["train"]["log_every"] = 99

    _edit_saved(path, edit)
    assert prepare(cfg, "remax") == path
    assert sorted(os.listdir(path)) == ["config.yaml"]
    assert yaml.safe_load((path / "config.yaml").read_text()) == to_plain(cfg)


def test_force_reuses_dir_and_keeps_previous_config(tmp_path):
    cfg = _config(tmp_path)
    path = prepare(cfg, "remax")
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    edited = _edit_saved(path, lambda saved: saved.update(seed=999))

    forced = _with(cfg, "run.force", True)
    assert prepare(forced, "remax") == path
    assert (path / "config.previous.yaml").read_bytes() == edited
    assert yaml.safe_load((path / "config.yaml").read_text()) == to_plain(forced)
    assert (path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert sorted(os.listdir(path)) == ["config.previous.yaml", "config.yaml", "metrics.jsonl"]


def test_cli_refuses_dir_whose_config_differs(tmp_path):
    overrides = [f"run.root={tmp_path}", "experiment=smoke"]
    path = prepare(compose_stage("sft", overrides), "sft")
    _edit_saved(path, lambda saved: saved.update(seed=999))
    before = _snapshot(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.sft", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: run dir ") and "(keys: seed)" in lines[0]
    assert _snapshot(tmp_path) == before


# ---- pipeline overrides ----


def test_pipeline_split_overrides():
    assert split_overrides(["seed=1", "remax.algo.kl_coef=0.1", "sft.optim.lr=1e-3"]) == {
        "sft": ["seed=1", "optim.lr=1e-3"],
        "reward_model": ["seed=1"],
        "remax": ["seed=1", "algo.kl_coef=0.1"],
        "evaluate": ["seed=1"],
    }


def test_pipeline_split_keeps_group_selections_for_every_stage():
    # No dot, or a first part that is not a stage: every stage gets it.
    assert split_overrides(["experiment=smoke", "data.num_train=64"]) == {
        **{s: ["experiment=smoke", "data.num_train=64"] for s in ("sft", "reward_model", "remax")},
        "evaluate": [
            "data.num_train=64"
        ],  # evaluate has no experiment group, only the keys it knows
    }
