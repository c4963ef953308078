"""``python -m jobs.plan`` on the release's Llama-2-7B setting, and the submission check."""

from __future__ import annotations

import pytest
from conftest import run_job

A800 = ["model=llama2_7b", "cluster=slurm_a800"]


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
