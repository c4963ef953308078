"""Exact resume (spec test 25): an interrupted run finishes bit-identical to an uninterrupted one.

Interruptions covered: a clean stop at a step boundary (what the Slurm USR2 path does), a crash in
the middle of writing a checkpoint (the rename never happens), and a real ``kill -9`` of the job
process at an arbitrary moment, with leftovers of half-written checkpoints on disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from remax.config import (
    Aggregation,
    Baseline,
    CheckpointConfig,
    DataConfig,
    EmptyResponse,
    KLEstimator,
    LogConfig,
    ModelConfig,
    RemaxAlgoConfig,
    RemaxJobConfig,
    RewardModelJobConfig,
    RolloutConfig,
    RunConfig,
    SFTJobConfig,
    TrainConfig,
    WandbMode,
)
from remax.preemption import StopRequest
from remax.run_dir import prepare
from remax.trainers import loop

STEPS = 6


def _config(stage: str, root: Path):
    common = dict(
        run=RunConfig(root=str(root)),
        model=ModelConfig(hidden_size=32, intermediate_size=64),
        data=DataConfig(num_train=64, num_eval=64, max_response_len=8),
        train=TrainConfig(batch_size=8, micro_batch_size=4, max_steps=STEPS, log_every=1),
        checkpoint=CheckpointConfig(every_steps=2, keep_last=2),
        log=LogConfig(wandb_mode=WandbMode.disabled, progress=False),
    )
    if stage == "sft":
        return SFTJobConfig(**common)
    if stage == "reward_model":
        return RewardModelJobConfig(**common)
    # The release's conventions, so KL, clip, discount and the empty-answer path are all exercised.
    algo = RemaxAlgoConfig(
        kl_coef=0.05,
        gamma=0.99,
        reward_clip=5.0,
        aggregation=Aggregation.token_mean,
        top_p=0.9,
        empty_response=EmptyResponse.space_token,
    )
    return RemaxJobConfig(**common, algo=algo, eval_prompts=64)


def _trainer(stage: str, cfg):
    from jobs._stage import _trainer

    return _trainer(stage, cfg)


def _run(stage: str, cfg, stop=None):
    run_dir = prepare(cfg, stage)
    trainer = _trainer(stage, cfg)
    if stop is not None:
        stop.trainer = trainer
    return run_dir, loop.run(trainer, cfg, run_dir, stage, stop=stop)


class StopAt(StopRequest):
    """Requests a stop once the trainer has done ``k`` steps, as the USR2 handler would."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k, self.trainer = k, None

    @property
    def requested(self) -> bool:
        return self.trainer.step >= self.k


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "export" / "model.safetensors")


def _assert_identical(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after resume"
    ea = json.loads((a / "summary.json").read_text())["eval"]
    eb = json.loads((b / "summary.json").read_text())["eval"]
    assert ea == eb


def _steps_logged(run_dir: Path) -> list[int]:
    return [
        json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.parametrize("stage", ["sft", "reward_model", "remax"])
def test_stop_and_resume_is_bit_identical(tmp_path, stage):
    ref_dir, _ = _run(stage, _config(stage, tmp_path / "a"))
    cfg = _config(stage, tmp_path / "b")
    run_dir, summary = _run(stage, cfg, stop=StopAt(3))
    assert summary is None and (run_dir / "checkpoints" / "step_3").is_dir()
    assert not (run_dir / "export").exists()
    _, summary = _run(stage, cfg)  # a new trainer, as a restarted process would build
    assert summary["step"] == STEPS
    _assert_identical(ref_dir, run_dir)
    assert _steps_logged(run_dir) == list(range(1, STEPS + 1))  # continuous, no step twice


# hydra_conf/algo/rloo.yaml and grpo.yaml on the release's conventions of _config.
VARIANTS = {
    "rloo": (dict(baseline=Baseline.leave_one_out), 2),
    "grpo": (
        dict(
            baseline=Baseline.group_norm,
            group_std_norm=True,
            clip_ratio=0.2,
            kl_coef=0.0,
            kl_loss_coef=0.04,
            kl_estimator=KLEstimator.k3,
        ),
        4,
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rloo_and_grpo_stop_and_resume_bit_identical(tmp_path, variant):
    """The USR2 path (a stop at a step boundary, a new trainer resuming) for the k-sample
    baselines: their group of samples per prompt, sampler position and RNG resume exactly."""
    changes, k = VARIANTS[variant]

    def config(root: Path):
        cfg = _config("remax", root)
        algo = dataclasses.replace(cfg.algo, **changes)
        return dataclasses.replace(cfg, algo=algo, rollout=RolloutConfig(samples_per_prompt=k))

    ref_dir, _ = _run("remax", config(tmp_path / "a"))
    cfg = config(tmp_path / "b")
    run_dir, summary = _run("remax", cfg, stop=StopAt(3))
    assert summary is None and (run_dir / "checkpoints" / "step_3").is_dir()
    _, summary = _run("remax", cfg)
    assert summary["step"] == STEPS
    _assert_identical(ref_dir, run_dir)
    assert _steps_logged(run_dir) == list(range(1, STEPS + 1))


def test_crash_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path, monkeypatch):
    stage = "remax"
    ref_dir, _ = _run(stage, _config(stage, tmp_path / "a"))
    cfg = _config(stage, tmp_path / "b")

    class Killed(Exception):
        pass

    real_replace = os.replace

    def dying_replace(src, dst):
        if Path(dst).name == "step_4":  # all files of step 4 written, the rename never happens
            raise Killed
        return real_replace(src, dst)

    monkeypatch.setattr("remax.checkpoint.os.replace", dying_replace)
    with pytest.raises(Killed):
        _run(stage, cfg)
    monkeypatch.setattr("remax.checkpoint.os.replace", real_replace)
    ckpts = tmp_path / "b" / stage
    run_dir = next(ckpts.iterdir())
    assert (run_dir / "checkpoints" / "step_2").is_dir()
    assert list((run_dir / "checkpoints").glob(".tmp_step_4_*")), (
        "the half-written dir should remain"
    )
    _, summary = _run(stage, cfg)
    assert summary["step"] == STEPS
    _assert_identical(ref_dir, run_dir)
    assert not list((run_dir / "checkpoints").glob(".tmp_step_*")), "leftovers are cleaned up"
