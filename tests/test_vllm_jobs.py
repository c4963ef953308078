"""ReMax, PPO and evaluation with ``rollout.engine=vllm`` on the CPU build: learning, exact resume,
and evaluation answers equal to the ``hf`` engine's.

Every test starts its own vLLM engine(s) (~30 s each on an idle 2-core machine). The tiny model
has head_dim 32 (``model.num_heads=2``): the CPU attention kernels support 32, 64, 80, … only.
Skipped without vLLM, failed instead under REMAX_REQUIRE_VLLM=1 (``make test-vllm``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_job
from safetensors.torch import load_file
from test_resume import StopAt
from test_rollout_vllm import require_vllm

from jobs._config import compose_stage
from jobs._stage import run_stage

pytestmark = pytest.mark.vllm
TINY_32 = ("model.num_heads=2", "model.num_kv_heads=2")  # head_dim 64 / 2 = 32


@pytest.fixture(autouse=True)
def _vllm():
    require_vllm()


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_remax_with_vllm_rollouts_learns_the_synthetic_task(tmp_path):
    """Reward (= gold here) up by more than 3 standard errors over the held-out prompts, with the
    actor's and vLLM's log-probs of the sampled tokens equal to fp32 precision at every step."""
    proc = run_job(
        "jobs.remax",
        "rollout.engine=vllm",
        *TINY_32,
        f"run.root={tmp_path}",
        "train.max_steps=40",
        "optim.lr=1e-3",  # from random init: +9.8 SE in 40 steps under empty_response=mask
        "log.wandb_mode=disabled",
        "log.progress=false",
        "train.log_every=1",
        timeout=1800,
    )
    assert proc.returncode == 0
    run_dir = next((tmp_path / "remax").iterdir())
    ev = json.loads((run_dir / "summary.json").read_text())["eval"]
    for key in ("reward", "gold"):
        before, after = ev[f"{key}_before"], ev[f"{key}_after"]
        se = (before["stderr"] ** 2 + after["stderr"] ** 2) ** 0.5
        assert after["mean"] - before["mean"] > 3 * se, (key, before, after)
    rows = _metrics(run_dir)
    gaps = [r["rollout/offpolicy_gap_max"] for r in rows]
    assert len(gaps) == 40
    # fp32 log-softmax of the same weights: the engines differ only in summation order.
    assert max(gaps) < 1e-4, max(gaps)


# ---------------------------------------------------------------- exact resume


def _remax(root: Path, stop=None):
    from remax.run_dir import prepare
    from remax.trainers import loop

    cfg = compose_stage(
        "remax",
        [
            "experiment=smoke",
            "rollout.engine=vllm",
            *TINY_32,
            f"run.root={root}",
            "data.num_eval=64",
            "eval_prompts=64",
            "algo.top_p=0.9",  # filtered sampling: vLLM's top-p on the sampled rows
            "log.progress=false",
        ],
    )
    from jobs._stage import _trainer

    run_dir = prepare(cfg, "remax")
    trainer = _trainer("remax", cfg)
    if stop is not None:
        stop.trainer = trainer
    try:
        return run_dir, loop.run(trainer, cfg, run_dir, "remax", stop=stop)
    finally:
        trainer.engine.close()


def test_stop_and_resume_with_vllm_rollouts_is_bit_identical(tmp_path):
    """Each request's seed comes from the run's RNG (checkpointed): a run stopped after step 2 and
    resumed by a new trainer (and a new vLLM engine, pushed the resumed weights) exports the same
    weights and evaluation as an uninterrupted one."""
    ref_dir, ref = _remax(tmp_path / "a")
    run_dir, summary = _remax(tmp_path / "b", stop=StopAt(2))
    assert summary is None and (run_dir / "checkpoints" / "step_2").is_dir()
    _, summary = _remax(tmp_path / "b")
    assert summary["step"] == ref["step"] == 4
    wa = load_file(ref_dir / "export" / "model.safetensors")
    wb = load_file(run_dir / "export" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after resume"
    assert summary["eval"] == ref["eval"]
    untimed = [
        [{k: v for k, v in row.items() if not k.startswith("time/")} for row in _metrics(d)]
        for d in (ref_dir, run_dir)
    ]
    assert untimed[0] == untimed[1]  # every step's metrics, the off-policy gap included


# ---------------------------------------------------------------- PPO and evaluation


def test_ppo_with_vllm_rollouts_runs_and_reports_the_offpolicy_gap(tmp_path):
    run_job(
        "jobs.ppo",
        "experiment=smoke",
        "rollout.engine=vllm",
        *TINY_32,
        f"run.root={tmp_path}",
        "train.max_steps=2",
        "log.progress=false",
    )
    run_dir = next((tmp_path / "ppo").iterdir())
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        # PPO's ratio is exactly 1 on the first minibatch; vLLM's log-probs agree to fp32.
        assert r["rollout/offpolicy_gap_max"] < 1e-4, r


def test_evaluate_with_vllm_gives_the_hf_engines_greedy_answers(tmp_path):
    from remax.models.tiny import build_tokenizer, llama_config, tiny_policy

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = tiny_policy(
        llama_config(
            len(tok),
            hidden_size=64,
            num_layers=2,
            num_heads=2,
            num_kv_heads=2,
            intermediate_size=128,
        )
    )
    export = tmp_path / "policy" / "export"
    model.save_pretrained(export)
    tok.save_pretrained(export)
    answers = {}
    for engine in ("hf", "vllm"):
        cfg = compose_stage(
            "evaluate",
            [
                f"policies=[{export}]",
                "names=[p]",
                f"run.root={tmp_path / engine}",
                "num_prompts=32",
                "batch_size=16",
                "decoding=greedy",
                f"rollout.engine={engine}",
                "log.progress=false",
                "log.wandb_mode=disabled",
            ],
        )
        run_dir = Path(run_stage("evaluate", cfg)["run_dir"])
        lines = (run_dir / "answers.jsonl").read_text().splitlines()
        answers[engine] = [json.loads(line)["response"] for line in lines]
    assert len(answers["hf"]) == 32
    assert answers["vllm"] == answers["hf"]
