"""Config contract: every YAML composes, the presets hold the spec's values, bad input fails at start.

Which stages a group file must compose with (the rule of ``test_group_file_composes``):
- a file whose name starts with a stage's prefix (``remax_``, ``ppo_``, ``sft_``,
  ``reward_model_``, ``rm_``; ``rloo``, ``grpo`` for the ReMax stage) belongs to that stage and must compose and validate with it;
- any other file must compose (keys and types) with every stage whose root selects its group, and
  validate (``__post_init__``) with at least one: a data set without a built-in reward, say, is
  valid for SFT but needs ``reward_model.path`` for RL;
- every file composes and validates with at least one stage, so an orphan fails.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from jobs import pipeline
from jobs._config import CONF_DIR, SCHEMAS, to_config
from remax.config import Aggregation, Baseline, KLEstimator

REPO = Path(__file__).resolve().parents[1]
CONF = Path(CONF_DIR)
STAGES = sorted(p.stem for p in CONF.glob("*.yaml"))
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
# (group, name) for every file under every group dir; nested files select as "dir/name".
GROUP_FILES = sorted(
    (group, path.relative_to(CONF / group).with_suffix("").as_posix())
    for group in GROUPS
    for path in (CONF / group).rglob("*.yaml")
)
PREFIXES = {stage: (f"{stage}_",) for stage in STAGES}
if "reward_model" in PREFIXES:
    PREFIXES["reward_model"] += ("rm_",)
if "remax" in PREFIXES:  # the critic-free RL stage runs RLOO and GRPO too
    PREFIXES["remax"] += ("rloo", "grpo")


def _compose(stage: str, overrides: list[str]):
    """(composed config without the hydra node, runtime choices) for ``hydra_conf/<stage>.yaml``."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name=stage, overrides=overrides, return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def _convert(cfg):
    """(dataclass, "") or (None, the one-line error ``to_config`` printed before exiting)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return to_config(cfg), ""
        except SystemExit:
            return None, err.getvalue().strip()


def _load(stage: str, *overrides: str):
    cfg, _ = _compose(stage, list(overrides))
    obj, error = _convert(cfg)
    assert obj is not None, f"{stage} {' '.join(overrides)}: {error}"
    return obj


@functools.cache
def _selections(stage: str, group: str) -> list[str]:
    """Defaults-list keys of ``stage`` that select from ``group`` (``optim``, ``optim@critic_optim``)."""
    _, choices = _compose(stage, [])
    return [key for key in choices if key.split("@")[0] == group]


# ---- 1. every file composes ----


def test_glob_finds_every_stage_and_group_file():
    assert set(STAGES) >= {"sft", "reward_model", "remax"}
    assert set(STAGES) == set(SCHEMAS), "each stage root needs a schema in jobs._config.SCHEMAS"
    assert set(GROUPS) >= {"model", "data", "algo", "optim", "cluster", "experiment"}
    for group in GROUPS:
        files = [name for g, name in GROUP_FILES if g == group]
        assert len(files) > 0, f"hydra_conf/{group}/ holds no yaml file"
    selected = {key.split("@")[0] for s in STAGES for key in _compose(s, [])[1]}
    unused = set(GROUPS) - selected
    assert not unused, f"group dirs no stage root selects: {sorted(unused)}"


@pytest.mark.parametrize("group,name", GROUP_FILES, ids=[f"{g}/{n}" for g, n in GROUP_FILES])
def test_group_file_composes(group, name):
    owners = [s for s in STAGES if name.startswith(PREFIXES[s])]
    in_scope = owners or STAGES
    validated, problems, checked = [], [], 0
    for stage in in_scope:
        for key in _selections(stage, group):
            checked += 1
            override = f"{key}={name}"
            try:
                cfg, choices = _compose(stage, [override])
            except (HydraException, OmegaConfBaseException) as exc:
                problems.append(f"{stage} {override}: {' '.join(str(exc).split())}")
                continue
            assert choices[key] == name, f"{stage} {override} selected {choices[key]!r}"
            obj, error = _convert(cfg)
            if obj is None:
                # Valid structure, cross-field check failed: only an owned file must validate.
                if owners:
                    problems.append(f"{stage} {override}: {error}")
                continue
            assert isinstance(obj, SCHEMAS[stage])
            validated.append(stage)
    assert checked > 0, f"{group}/{name}: no stage selects group {group!r} (in scope: {in_scope})"
    assert not problems, "\n".join(problems)
    assert validated, f"{group}/{name} validates with no stage"


# ---- 2. defaults and presets ----


# Inputs a stage cannot default: what to evaluate.
REQUIRED = {"evaluate": ("policies=[runs/remax/default-0/export]",)}


@pytest.mark.parametrize("stage", STAGES)
def test_stage_composes_with_defaults(stage):
    cfg = _load(stage, *REQUIRED.get(stage, ()))
    assert isinstance(cfg, SCHEMAS[stage])
    # Keys other code relies on.
    assert isinstance(cfg.seed, int)
    assert cfg.run.root == "runs"
    assert cfg.run.name
    if stage != "evaluate":  # evaluation trains nothing: no train or checkpoint keys
        assert cfg.train.max_steps > 0
        assert cfg.checkpoint.every_steps >= 0


def test_remax_default_is_remax_official():
    algo = _load("remax").algo
    assert algo.kl_coef == 0.05
    assert algo.gamma == 0.99
    assert algo.reward_clip == 5.0
    assert algo.aggregation is Aggregation.rank_token_mean
    assert algo.top_p == 0.9 and algo.top_k == 50


def test_remax_paper_is_algorithm_1():
    algo = _load("remax", "algo=remax_paper").algo
    assert algo.kl_coef == 0.0
    assert algo.gamma == 1.0
    assert algo.reward_clip is None
    assert algo.aggregation is Aggregation.seq_sum


def test_rloo_and_grpo_presets_compose_in_the_remax_stage():
    default = _load("remax")
    assert default.algo.baseline is Baseline.greedy and default.rollout.samples_per_prompt == 1
    rloo = _load("remax", "algo=rloo")
    assert rloo.algo.baseline is Baseline.leave_one_out and rloo.rollout.samples_per_prompt == 2
    assert rloo.algo.clip_ratio is None and rloo.algo.kl_loss_coef == 0.0
    assert rloo.algo.kl_coef == default.algo.kl_coef  # the stage default's other conventions
    grpo = _load("remax", "algo=grpo")
    assert grpo.algo.baseline is Baseline.group_norm and grpo.rollout.samples_per_prompt == 4
    assert grpo.algo.group_std_norm is True
    # DeepSeekMath: ε 0.2, β 0.04 of k3 in the loss, no KL in the reward
    assert grpo.algo.clip_ratio == 0.2 and grpo.algo.kl_loss_coef == 0.04
    assert grpo.algo.kl_estimator is KLEstimator.k3 and grpo.algo.kl_coef == 0.0
    dr = _load("remax", "algo=grpo", "algo.group_std_norm=false", "rollout.samples_per_prompt=8")
    assert dr.algo.group_std_norm is False and dr.rollout.samples_per_prompt == 8


@pytest.mark.parametrize("preset", ["rloo", "grpo"])
def test_group_baselines_refuse_one_sample_per_prompt(preset):
    cfg, _ = _compose("remax", [f"algo={preset}", "rollout.samples_per_prompt=1"])
    obj, error = _convert(cfg)
    assert obj is None
    assert error.startswith("error: ") and "\n" not in error, error
    assert "rollout.samples_per_prompt=1" in error and "use >= 2" in error, error


@pytest.mark.parametrize("stage", ["ppo", "evaluate"])
def test_one_answer_stages_refuse_several_samples_per_prompt(stage):
    cfg, _ = _compose(stage, [*REQUIRED.get(stage, ()), "rollout.samples_per_prompt=2"])
    obj, error = _convert(cfg)
    assert obj is None and "rollout.samples_per_prompt=2" in error and "use 1" in error, error


# ---- 3. bad input fails at start: one line, exit 2, nothing written ----


def _run_cli(stage: str, override: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``python -m jobs.<stage>`` from an empty cwd with run.root inside it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", f"jobs.{stage}", f"run.root={cwd / 'runs'}", override],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    # Nothing at all, not even Hydra's outputs/ or .hydra/.
    assert sorted(os.listdir(cwd)) == [], f"{stage} {override} wrote {os.listdir(cwd)}"
    return proc


# (stage, override, "key=value" as the message prints it, part of the fix)
CONFIG_ERRORS = [
    ("remax", "optim.lr=-1", "optim.lr=-1.0", "positive"),
    ("remax", "algo.gamma=1.5", "algo.gamma=1.5", "(0, 1]"),
    ("remax", "algo.gamma=0", "algo.gamma=0.0", "(0, 1]"),
    ("remax", "algo.kl_coef=-0.1", "algo.kl_coef=-0.1", ">= 0"),
    ("remax", "algo.top_p=0", "algo.top_p=0.0", "(0, 1]"),
    ("remax", "algo.reward_clip=0", "algo.reward_clip=0.0", "null"),
    ("remax", "train.micro_batch_size=5", "train.micro_batch_size=5", "train.batch_size=32"),
    ("remax", "data.num_eval=10", "data.num_eval=10", "at least 64"),
    ("remax", "algo.baseline=leave_one_out", "rollout.samples_per_prompt=1", ">= 2"),
    ("sft", "optim.lr=-1", "optim.lr=-1.0", "positive"),
    ("reward_model", "train.micro_batch_size=5", "train.micro_batch_size=5", "batch_size=32"),
]


@pytest.mark.parametrize(
    "stage,override,key_value,fix", CONFIG_ERRORS, ids=[f"{c[0]}:{c[1]}" for c in CONFIG_ERRORS]
)
def test_invalid_value_fails_in_one_line(stage, override, key_value, fix, tmp_path):
    assert _load(stage).train.batch_size == 32  # the micro-batch case depends on it
    proc = _run_cli(stage, override, tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("error: ")
    assert key_value in line
    assert fix in line.split(key_value, 1)[1], line


# (override, what the message must name) for errors Hydra raises while composing.
COMPOSITION_ERRORS = [
    ("algo.kl_cof=0.1", ["kl_cof"]),
    ("train.max_steps=abc", ["train.max_steps", "abc"]),
    ("algo.aggregation=mean", ["algo.aggregation", "mean", "seq_sum", "token_mean"]),
]
COMPOSITION_IDS = [c[0] for c in COMPOSITION_ERRORS]


@pytest.mark.parametrize("override,named", COMPOSITION_ERRORS, ids=COMPOSITION_IDS)
def test_composition_error_names_the_key(override, named, tmp_path):
    proc = _run_cli("remax", override, tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    for word in named:
        assert word in proc.stderr, f"{word!r} not in:\n{proc.stderr}"


@pytest.mark.parametrize("override,named", COMPOSITION_ERRORS, ids=COMPOSITION_IDS)
def test_composition_error_follows_one_line_contract(override, named, tmp_path):
    proc = _run_cli("remax", override, tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


# ---- pipeline: every stage is validated before any trains ----


def _fake_run_stage(calls: list[str]):
    def run_stage(stage, config):
        calls.append(stage)
        return {"stage": stage, "run_dir": f"/nonexistent/{stage}", "eval": {}}

    return run_stage


def test_pipeline_rejects_bad_sft_override_before_training(monkeypatch, capsys):
    calls: list[str] = []
    monkeypatch.setattr(pipeline, "run_stage", _fake_run_stage(calls))
    with pytest.raises(SystemExit) as exc:
        pipeline.main(["sft.optim.lr=-1"])
    assert exc.value.code == 2
    assert calls == []
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: invalid config: optim.lr=-1.0: use a positive learning rate, e.g. 1e-6"
    ]


@pytest.mark.parametrize("override", ["remax.algo.gamma=1.5", "remax.algo.kl_cof=0.1"])
def test_pipeline_rejects_bad_remax_override_before_training(override, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(pipeline, "run_stage", _fake_run_stage(calls))
    with pytest.raises(SystemExit) as exc:
        pipeline.main([override])
    assert exc.value.code == 2
    assert calls == [], f"trained {calls} before rejecting {override}"
