"""``python -m jobs.plan`` on the release's Llama-2-7B setting, and the submission check."""

from __future__ import annotations

import pytest
from conftest import run_job

# The release places the actor at ZeRO-2 and the frozen models at ZeRO-3 (deepspeed=zero2).
A800 = ["model=llama2_7b", "cluster=slurm_a800", "deepspeed=zero2"]


@pytest.mark.parametrize(
    "algo,offload,verdict",
    [
        (
            "remax_official",
            "false",
            "fits",
        ),  # release README: ReMax trains 7B on 4×80 GB without offload
        ("ppo_dschat", "false", "OOM"),  # ... where PPO runs out of memory
        ("remax_official", "true", "fits"),
        ("ppo_dschat", "true", "fits"),  # with offload both fit
    ],
)
def test_plan_reproduces_the_release_outcome(algo, offload, verdict):
    out = run_job("jobs.plan", *A800, f"algo={algo}", f"plan.offload={offload}")
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == f"verdict: {verdict}"
    assert (
        any(line.startswith("actor") for line in lines)
        and "largest micro-batch that fits" in out.stdout
    )
    if algo.startswith("ppo"):
        assert any(line.startswith("critic") for line in lines)


def test_submission_refuses_a_config_that_cannot_fit_unless_overridden(tmp_path):
    args = [
        "jobs.ppo",
        *A800,
        "algo=ppo_dschat",
        "reward_model.path=x",
        f"run.root={tmp_path}",
        "cluster.dry_run=true",
    ]
    refused = run_job(*args, check=False)
    assert refused.returncode == 2 and "memory planner estimates" in refused.stderr
    assert "cluster.check_memory=false" in refused.stderr
    assert run_job(*args, "cluster.check_memory=false").returncode == 0


def test_unknown_plan_key_fails_in_one_line():
    out = run_job("jobs.plan", *A800, "plan.ofload=true", check=False)
    assert (
        out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "plan.offload" in out.stderr
    )


RELEASE_INPUTS = ["plan.micro_batch=1", "plan.prompt_len=256", "plan.response_len=256"]


@pytest.mark.parametrize(
    "algo,offload,total",
    [
        ("remax_official", "false", 53.1),
        ("ppo_dschat", "false", 87.0),
        ("ppo_dschat", "true", 29.3),
    ],
)
def test_explicit_release_inputs_keep_the_documented_totals(algo, offload, total):
    # The planner's defaults now come from the composed config; explicit plan.* keys at the release's
    # micro-batch 1 and 256 + 256 tokens reproduce the numbers documented before that change.
    out = run_job("jobs.plan", *A800, f"algo={algo}", f"plan.offload={offload}", *RELEASE_INPUTS)
    total_line = next(line for line in out.stdout.splitlines() if line.startswith("total"))
    assert float(total_line.split()[-1]) == total


def test_experiment_presets_plan_from_the_command_line():
    mistral = run_job("jobs.plan", "experiment=remax_mistral7b_card").stdout
    assert mistral.strip().splitlines()[-1] == "verdict: fits"
    assert "reward model: ultrarm-13b (reward_model.path=openbmb/UltraRM-13b)" in mistral
    assert "384+384 tokens" in mistral and "optimizer offload on" in mistral
    sft = run_job("jobs.plan", "experiment=sft_llama2_7b_official").stdout
    assert sft.startswith("sft with llama2_7b on slurm_a800: 4 GPU(s)")
    assert any(line.startswith("sft ") for line in sft.splitlines())
    assert sft.strip().splitlines()[-1] == "verdict: fits"
    oom = run_job(
        "jobs.plan",
        "experiment=remax_llama2_7b_official",
        "plan.actor_zero=0",
        "plan.offload=false",
    )
    assert oom.stdout.strip().splitlines()[-1] == "verdict: OOM"


@pytest.fixture
def vllm_importable(monkeypatch):
    """Planning needs no vLLM: the config's install check is told vLLM is there."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a)
    )


VLLM_7B = [*A800, "algo=remax_official", "rollout.engine=vllm", "rollout.kv_cache_gib=8"]


def test_vllm_on_the_a800_preset_plans_the_direct_push(vllm_importable, capsys):
    from jobs import plan as cli

    result = cli.main(VLLM_7B)
    out = capsys.readouterr().out
    assert result.inp.vllm_push.value == "direct" and result.node_push_bytes == 0
    assert "vLLM weight push: direct" in out and out.strip().endswith("verdict: fits")
    # the engine's bf16 weights (6,738,415,616 × 2 B) and its 8 GiB budget, per GPU
    assert result.bytes_of(role="actor", part=cli.planner.Part.VLLM_WEIGHTS) == 13_476_831_232


def test_a_file_push_over_the_node_memory_is_refused_in_one_line(vllm_importable, capsys):
    from jobs import plan as cli

    # 4 CPU ranks (auto: the file route) × 2 × 13.48 GB = 100.4 GiB at each push, over a 64 GiB node
    four = [*VLLM_7B, "cluster=local", "cluster.tasks_per_node=4"]
    with pytest.raises(SystemExit) as exc:
        cli.main([*four, "cluster.mem_gb=64"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert "100.4 GiB per node" in err and "64 GiB" in err and "rollout.engine=hf" in err
    # the same push on a 500 GiB node plans
    assert cli.main([*four, "cluster.mem_gb=500"]).node_push_fits
    # on CUDA the file route runs one rank only (vLLM's engine processes would share cuda:0)
    with pytest.raises(SystemExit):
        cli.main([*VLLM_7B, "rollout.push=file"])
    assert "rollout.push=file on CUDA" in capsys.readouterr().err
    # a CPU cluster with 2 ranks (auto: the file route, 2 × 25.1 GiB) is refused at submission too
    cpu = [*VLLM_7B, "cluster=local", "cluster.node_mem_gb=16"]
    config = cli._compose("remax", [*cpu, "cluster.tasks_per_node=2"])
    assert cli.push_route(config) == "file" and not config.cluster.gpus
    assert "50.2 GiB per node" in cli.check_fits("remax", config)
    # one CPU rank: auto takes the direct route, which holds no file
    one = cli._compose("remax", cpu)
    assert cli.push_route(one) == "direct" and cli.check_fits("remax", one) is None


def test_unknown_push_route_fails_in_one_line():
    out = run_job("jobs.plan", *A800, "rollout.push=shm", check=False)
    assert out.returncode == 2 and "rollout.push" in out.stderr and "shm" in out.stderr


# LoRA verdicts on one 4×A800 node at the release's micro-batch 1 and 256 + 256 tokens (README table).
LORA = ["cluster=slurm_a800", "model.lora.rank=8", *RELEASE_INPUTS]


@pytest.mark.parametrize(
    "model,algo,placement,verdict,full_verdict",
    [
        ("llama2_7b", "remax_official", ["deepspeed=zero2"], "fits", "fits"),
        ("llama2_7b", "ppo_dschat", ["deepspeed=zero2"], "fits", "OOM"),  # full PPO: OOM
        ("llama2_13b", "remax_official", ["deepspeed=zero2"], "fits", "OOM"),
        ("llama2_13b", "ppo_dschat", ["deepspeed=zero3"], "fits", "OOM"),
        ("llama2_70b", "remax_official", ["deepspeed=zero3"], "fits", "OOM"),  # no offload
        ("llama2_70b", "ppo_dschat", ["deepspeed=zero3"], "OOM", "OOM"),  # the full critic
        ("llama2_70b", "ppo_dschat", ["deepspeed=zero3", "plan.offload=true"], "fits", "fits"),
    ],
)
def test_lora_verdicts_on_the_a800_node(model, algo, placement, verdict, full_verdict, capsys):
    from jobs import plan as cli

    args = [f"model={model}", f"algo={algo}", *placement, *LORA]
    result = cli.main(args)
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"verdict: {verdict}"
    roles = [m.role for m in result.inp.models]
    assert "reference" not in roles and ("critic" in roles) == algo.startswith("ppo")
    assert "LoRA rank 8 on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in out
    assert "adapters disabled (no copy)" in out
    full = cli.main([*args, "model.lora.rank=0"])
    assert full.fits == (full_verdict == "fits") and "reference" in [
        m.role for m in full.inp.models
    ]
    assert result.total_bytes < full.total_bytes


def test_an_unknown_lora_target_fails_in_one_line(capsys):
    from jobs import plan as cli

    with pytest.raises(SystemExit) as exc:
        cli.main([*A800, "model.lora.rank=8", "model.lora.target_modules=[q_proj,wq]"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert "['wq']" in err and "q_proj, k_proj" in err
