"""Real-path reproducibility: exports as ``model.path`` / ``reward_model.path``, one command, the
same export bit for bit, fresh or restarted after ``kill -9`` (the USR2 requeue: test_slurm.py).

Every RNG is seeded from ``seed`` when a stage starts (``remax.seeding``); before that only a tiny
model built from config seeded the generator, so a run from an export sampled from an unseeded one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file
from tiny_exports import save_tiny_exports


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return save_tiny_exports(tmp_path_factory.mktemp("exports"))


def _cmd(stage: str, root: Path, exports, steps: int) -> list[str]:
    sft, rm = exports
    return [
        sys.executable,
        "-m",
        f"jobs.{stage}",
        f"run.root={root}",
        f"model.path={sft}",
        f"reward_model.path={rm}",
        "seed=7",
        f"train.max_steps={steps}",
        "train.batch_size=8",
        "train.micro_batch_size=8",
        "train.log_every=1",
        "checkpoint.every_steps=2",
        "data.num_train=256",
        "data.num_eval=64",
        "eval_prompts=64",
        "log.wandb_mode=disabled",
        "log.progress=false",
    ]


def _run(stage: str, root: Path, exports, steps: int) -> Path:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        _cmd(stage, root, exports, steps), cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next((root / stage).iterdir())


def _assert_same_export(a: Path, b: Path) -> None:
    wa, wb = (load_file(d / "export" / "model.safetensors") for d in (a, b))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("stage", ["remax", "ppo"])
def test_two_fresh_runs_from_exports_give_the_same_export(tmp_path, exports, stage):
    a = _run(stage, tmp_path / "a", exports, steps=3)
    b = _run(stage, tmp_path / "b", exports, steps=3)
    _assert_same_export(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["remax", "ppo"])
def test_repeated_kill_9_restarts_from_exports_give_the_same_export(tmp_path, exports, stage):
    steps = 8
    ref = _run(stage, tmp_path / "ref", exports, steps)
    root = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for ckpt in ("step_2", "step_4"):  # killed twice, each time after a later checkpoint
        proc = subprocess.Popen(
            _cmd(stage, root, exports, steps), cwd=REPO, env=env, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 300
        while not list(root.glob(f"{stage}/*/checkpoints/{ckpt}")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, f"{ckpt} never appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    run_dir = next((root / stage).iterdir())
    assert not (run_dir / "summary.json").exists(), "killed too late to test anything"
    _run(stage, root, exports, steps)
    _assert_same_export(ref, run_dir)
