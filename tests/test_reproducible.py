"""Real-path reproducibility: exports as ``model.path`` / ``reward_model.path``, one command, the
same export bit for bit, fresh or restarted after ``kill -9`` (the USR2 requeue: test_slurm.py).
The reference and each restart are separate processes, so equal exports also show two fresh runs
agree.

Every RNG is seeded from ``seed`` when a stage starts (``remax.seeding``); before that only a tiny
model built from config seeded the generator, so a run from an export sampled from an unseeded one.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import run_job, start_job
from safetensors.torch import load_file
from tiny_exports import save_tiny_exports


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return save_tiny_exports(tmp_path_factory.mktemp("exports"))


def _cmd(stage: str, root: Path, exports, steps: int) -> list[str]:
    """``stage`` is a job (``remax``, ``ppo``) with options: ``+lora`` (rank-8 adapters on the
    actor and PPO's critic: checkpoints hold only them), ``+grpo`` (``algo=grpo``: 4 samples a
    prompt, group-normalised)."""
    sft, rm = exports
    job, *options = stage.split("+")
    lora = "lora" in options
    return [
        f"jobs.{job}",
        *(["model.lora.rank=8", "optim.lr=1e-3"] if lora else []),
        *(["algo.critic_lora=true"] if lora and job == "ppo" else []),
        *(["algo=grpo"] if "grpo" in options else []),
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
    run_job(*_cmd(stage, root, exports, steps))
    return next((root / stage.split("+")[0]).iterdir())


def _assert_same_export(a: Path, b: Path) -> None:
    wa, wb = (load_file(d / "export" / "model.safetensors") for d in (a, b))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    summary_a, summary_b = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert summary_a["eval"] == summary_b["eval"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["remax", "remax+grpo", "ppo", "ppo+lora"])
def test_repeated_kill_9_restarts_from_exports_give_the_same_export(tmp_path, exports, stage):
    """Killed at any moment, twice, a run loses only the steps since its last checkpoint: the
    restart equals the uninterrupted run bit for bit and logs every step once."""
    steps, job = 8, stage.split("+")[0]
    ref = _run(stage, tmp_path / "ref", exports, steps)
    root = tmp_path / "killed"
    for ckpt in ("step_2", "step_4"):  # killed twice, each time after a later checkpoint
        proc = start_job(*_cmd(stage, root, exports, steps))
        deadline = time.monotonic() + 300
        while not list(root.glob(f"{job}/*/checkpoints/{ckpt}")):
            assert proc.poll() is None, proc.stderr()[-2000:]
            assert time.monotonic() < deadline, f"{ckpt} never appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run_dir = next((root / job).iterdir())
    assert not (run_dir / "summary.json").exists(), "killed too late to test anything"
    # Leftovers a kill during a save can leave: a temp dir and a step dir without its marker.
    (run_dir / "checkpoints" / ".tmp_step_99_1").mkdir()
    (run_dir / "checkpoints" / ".tmp_step_99_1" / "model.safetensors").write_bytes(b"torn")
    (run_dir / "checkpoints" / "step_98").mkdir()
    _run(stage, root, exports, steps)
    _assert_same_export(ref, run_dir)
    logged = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1)), "continuous, no step logged twice"
