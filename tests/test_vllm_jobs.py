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


@pytest.fixture(autouse=True)
def _vllm():
    require_vllm()


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_remax_with_vllm_rollouts_learns_the_synthetic_task(tmp_path):
    """On the default tiny model (head_dim 32): reward (= gold here) up by more than 3 standard
    errors over the held-out prompts, with the actor's and vLLM's log-probs of the sampled
    tokens equal to fp32 precision at every step."""
    proc = run_job(
        "jobs.remax",
        "rollout.engine=vllm",
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
        trainer.setup.rollout_engine.close()


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
    proc = run_job(
        "jobs.ppo",
        "experiment=smoke",
        "rollout.engine=vllm",
        f"run.root={tmp_path}",
        "train.max_steps=2",
        "log.progress=false",
    )
    # The run log names the weight-push route: one CPU rank, in-process.
    route = "rollout.engine=vllm: weight push route direct (auto: CPU build, one rank"
    assert route in proc.stderr + proc.stdout, proc.stderr[-2000:]
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


# ---------------------------------------------------------------- refusals


def _save_head_dim_16(root: Path) -> Path:
    """A tiny Llama export with head_dim 16 (64 / 4 heads), which the CPU kernels lack."""
    from remax.models.tiny import build_tokenizer, llama_config, tiny_policy

    tok = build_tokenizer()
    config = llama_config(
        len(tok), hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=128
    )
    export = root / "hd16" / "export"
    tiny_policy(config).save_pretrained(export)
    tok.save_pretrained(export)
    return export


REFUSALS = {
    "tiny model with head_dim 16": (
        "remax",
        lambda tmp: ["model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2"],
        ["head_dim 16", "model.num_heads=4", "rollout.engine=hf"],
    ),
    "evaluated export with head_dim 16": (
        "evaluate",
        lambda tmp: [f"policies=[{_save_head_dim_16(tmp)}]"],
        ["head_dim 16", "policies[0]=", "rollout.engine=hf"],
    ),
    "ZeRO-3 without gathering for generation": (
        "ppo",
        lambda tmp: ["deepspeed=zero3", "deepspeed.gather_for_generation=false"],
        ["deepspeed.gather_for_generation=False", "gather_for_generation=true"],
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_vllm_refusal_is_one_line_exit_2_nothing_written(tmp_path, case):
    """Refused before vLLM starts and before the run dir exists (it used to be a ValueError
    traceback, exit 1, from vLLM's start; or, under ZeRO-3, empty partitioned tensors pushed)."""
    stage, args, needles = REFUSALS[case]
    root = tmp_path / "runs"
    common = ["log.wandb_mode=disabled", "log.progress=false"]
    if stage != "evaluate":
        common.append("train.max_steps=1")
    proc = run_job(
        f"jobs.{stage}",
        "rollout.engine=vllm",
        f"run.root={root}",
        *common,
        *args(tmp_path),
        check=False,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert not root.exists(), f"written: {sorted(root.rglob('*'))}"


# ---------------------------------------------------------------- the best actor


def _spy_engine(engine, calls: list) -> None:
    """Record every decode of ``engine``: (ids, mask, sampling, rollout)."""
    generate = engine.generate

    def spy(ids, mask, sampling, *, greedy):
        out = generate(ids, mask, sampling, greedy=greedy)
        calls.append((ids, mask, sampling, out))
        return out

    engine.generate = spy


def test_final_evaluation_with_vllm_decodes_the_exported_best_actor(tmp_path, monkeypatch):
    """``export_policy=best_eval_reward``: ``BestActor.load_into`` puts an older actor back into the model,
    so vLLM must be pushed it again. The selection is forced onto step 1 of 2 (reward −step), and
    every greedy answer of the final evaluation (decoded by vLLM after ``load_into``) equals the
    ``hf`` engine's greedy answer of ``export/``; the final actor answers differently (else the
    test could not tell the two apart)."""
    from transformers import AutoModelForCausalLM

    from jobs._stage import _trainer
    from remax.rollout import HFEngine, as_actor
    from remax.run_dir import prepare
    from remax.trainers import best_actor, loop

    kept = best_actor.BestActor
    consider, load_into = kept.consider, kept.load_into
    monkeypatch.setattr(
        kept, "consider", lambda b, step, reward, actor: consider(b, step, -float(step), actor)
    )
    calls, final = [], {}

    def spy_load_into(b, model, engine, device):
        final["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
        final["calls"] = len(calls)  # the decodes after this one are the final evaluation's
        load_into(b, model, engine, device)

    monkeypatch.setattr(kept, "load_into", spy_load_into)
    cfg = compose_stage(
        "remax",
        [
            "experiment=smoke",
            "rollout.engine=vllm",
            f"run.root={tmp_path}",
            "export_policy=best_eval_reward",
            "eval_prompts=64",
            "train.max_steps=2",
            "train.eval_every=1",
            "checkpoint.every_steps=0",
            "algo.eval_decoding=greedy",
            "optim.lr=1e-2",  # one step moves the greedy answers
            "log.progress=false",
        ],
    )
    run_dir = prepare(cfg, "remax")
    trainer = _trainer("remax", cfg)
    _spy_engine(trainer.setup.rollout_engine, calls)
    try:
        summary = loop.run(trainer, cfg, run_dir, "remax")
    finally:
        trainer.setup.rollout_engine.close()
    assert summary["export"]["step"] == 1 and summary["step"] == 2
    best = AutoModelForCausalLM.from_pretrained(run_dir / "export").eval()
    last = AutoModelForCausalLM.from_pretrained(run_dir / "export").eval()
    last.load_state_dict(final["weights"])
    evaluated = calls[final["calls"] :]
    assert sum(len(c[0]) for c in evaluated) == 64  # the final evaluation, all greedy
    differs = False
    for ids, mask, sampling, out in evaluated:
        hf = HFEngine(as_actor(best), trainer.tokenizer).generate(ids, mask, sampling, greedy=True)
        assert torch.equal(out.response_mask, hf.response_mask)
        assert torch.equal(out.response[out.response_mask], hf.response[hf.response_mask])
        old = HFEngine(as_actor(last), trainer.tokenizer).generate(ids, mask, sampling, greedy=True)
        differs |= not torch.equal(old.response, hf.response)
    assert differs, "the final actor answers as the best one: raise optim.lr"
