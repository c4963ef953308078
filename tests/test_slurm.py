"""Stages as Slurm jobs, against the real local Slurm (scripts/local_slurm.sh), never mocks.

Skipped only when ``sbatch`` is absent and REMAX_REQUIRE_SLURM is not 1; CI sets it, so there the
absence of Slurm fails these tests instead of skipping them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_job
from safetensors.torch import load_file

pytestmark = pytest.mark.slurm

if shutil.which("sbatch") is None:
    if os.environ.get("REMAX_REQUIRE_SLURM") == "1":
        raise RuntimeError(
            "sbatch not found but REMAX_REQUIRE_SLURM=1: run scripts/local_slurm.sh up"
        )
    pytest.skip(
        "no Slurm here (sbatch not on PATH); CI runs scripts/local_slurm.sh up",
        allow_module_level=True,
    )

# A tiny ReMax run long enough to interrupt: ~4 s of steps, periodic checkpoints every 10 steps.
JOB = [
    "cluster=local_slurm",
    "train.batch_size=8",
    "train.micro_batch_size=8",
    "train.max_steps=80",
    "train.log_every=1",
    "checkpoint.every_steps=10",
    "data.num_train=1024",
    "data.num_eval=64",
    "eval_prompts=64",
    "log.progress=false",
]


def _submit(root: Path, *extra: str, module: str = "jobs.remax") -> dict:
    out = run_job(module, "--json", f"run.root={root}", *JOB, *extra)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _sacct(job: str) -> list[tuple[str, str]]:
    out = subprocess.run(
        ["sacct", "-j", job, "-D", "-X", "-n", "--parsable2", "-o", "State,ExitCode"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [tuple(line.split("|")) for line in out.stdout.splitlines()]


# Waits are generous: on a loaded 2-core machine a job's steps take several times their idle time
# (measured up to 5× with a second test run beside them); a hang still fails, only later.
def _wait_done(job: str, timeout: float = 900) -> list[tuple[str, str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = _sacct(job)
        active = {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING"}
        settled = states and not any(s in active for s, _ in states) and states[-1][0] != "REQUEUED"
        queued = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True)
        if settled and not queued.stdout.strip():
            return states
        time.sleep(1)
    raise AssertionError(f"job {job} not done after {timeout} s: {_sacct(job)}")


def _wait_for(path_glob: Path, pattern: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(path_glob.glob(pattern)):
            return
        time.sleep(0.2)
    raise AssertionError(f"{pattern} never appeared under {path_glob}")


def _weights(run_dir: Path) -> dict:
    return load_file(Path(run_dir) / "export" / "model.safetensors")


def _assert_same_export(a: str, b: str) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _status(root: Path) -> list[dict]:
    return json.loads(run_job("jobs.status", str(root), "--json").stdout)


def exports_job(root: Path) -> tuple[str, ...]:
    """The real path's inputs (SFT and RM exports, a seed) of the single-task requeue tests: one
    uninterrupted run of them (``conftest.slurm_reference``) is what each must equal. The actor
    trains LoRA adapters (its checkpoints hold only them); the 2×2 tests train every weight."""
    from tiny_exports import save_tiny_exports

    sft, rm = save_tiny_exports(root)
    return (
        f"model.path={sft}",
        f"reward_model.path={rm}",
        "seed=7",
        "log.wandb_mode=disabled",
        "model.lora.rank=8",
        "optim.lr=1e-3",
    )


def test_scontrol_requeue_resumes_from_the_last_periodic_checkpoint(tmp_path, slurm_reference):
    ref, inputs = slurm_reference
    rec = _submit(tmp_path / "rq", *inputs)
    run_dir = Path(rec["run_dir"])
    _wait_for(run_dir, "checkpoints/step_20")
    subprocess.run(["scontrol", "requeue", rec["job_id"]], check=True)
    states = _wait_done(rec["job_id"])
    assert [s for s, _ in states] == ["REQUEUED", "COMPLETED"], states
    log = "".join(p.read_text() for p in (run_dir / "slurm").glob("*_log.err"))
    assert "resumed remax from" in log, "the second segment must resume, not restart from scratch"
    _wait_done(ref["job_id"])
    _assert_same_export(ref["run_dir"], rec["run_dir"])


def test_sweep_is_one_array_with_one_run_dir_per_element(tmp_path):
    out = run_job(
        "jobs.remax",
        "-m",
        "--json",
        f"run.root={tmp_path}",
        *JOB,
        "train.max_steps=4",
        "log.wandb_mode=disabled",
        "algo.kl_coef=0.05,0.1",
        "optim.lr=1e-4,5e-5",
    )
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["elements"] == 4 and len(set(info["run_dirs"])) == 4
    records = [json.loads((Path(d) / "submission.json").read_text()) for d in info["run_dirs"]]
    assert {r["job_id"] for r in records} == {f"{info['array_job_id']}_{i}" for i in range(4)}
    assert {r["sweep"] for r in records} == {info["sweep"]}
    states = _wait_done(info["array_job_id"])
    assert all(s == "COMPLETED" for s, _ in states), states
    assert all((Path(d) / "summary.json").exists() for d in info["run_dirs"])
    assert not list(Path(REPO).glob("multirun*")), "Hydra must not write into the working directory"


def test_failed_stage_exits_non_zero_and_later_stages_never_run(tmp_path):
    out = run_job(
        "jobs.pipeline",
        "--json",
        f"run.root={tmp_path}",
        *[("remax." + a if a.startswith("eval_prompts") else a) for a in JOB],
        "log.wandb_mode=disabled",
        "train.max_steps=4",
        "reward_model.data.source=/nonexistent/pairs.jsonl",
    )
    records = {r["stage"]: r for r in json.loads(out.stdout[out.stdout.index("{\n") :])["jobs"]}
    rm_states = _wait_done(records["reward_model"]["job_id"])
    assert rm_states[-1][0] == "FAILED" and rm_states[-1][1] != "0:0", rm_states
    remax_states = _wait_done(records["remax"]["job_id"], timeout=60)
    assert remax_states[-1][0] in ("CANCELLED", "CANCELLED+"), remax_states  # never left pending
    assert not (Path(records["remax"]["run_dir"]) / "metrics.jsonl").exists()
    eval_states = _wait_done(records["evaluate"]["job_id"], timeout=60)
    assert eval_states[-1][0].startswith("CANCELLED"), eval_states


def test_second_live_job_and_changed_code_are_refused(tmp_path):
    # Live for the refusal: the second command comes seconds after the first (its imports alone
    # take longer), while the job is pending or starting; short, so the forced resume is quick.
    rec = _submit(tmp_path, "log.wandb_mode=disabled", "train.max_steps=20")
    again = run_job(
        "jobs.remax",
        f"run.root={tmp_path}",
        *JOB,
        "log.wandb_mode=disabled",
        "train.max_steps=20",
        check=False,
    )
    assert again.returncode == 2 and rec["job_id"] in again.stderr and "scancel" in again.stderr
    subprocess.run(["scancel", rec["job_id"]], check=True)
    _wait_done(rec["job_id"])
    record_file = Path(rec["run_dir"]) / "submission.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "code_hash": "0" * 12}))
    refused = run_job("jobs.resume", rec["run_dir"], check=False)
    assert refused.returncode == 2 and "code changed" in refused.stderr
    forced = run_job("jobs.resume", rec["run_dir"], "--force", "--json")
    new = json.loads(forced.stdout.strip().splitlines()[-1])
    assert new["job_id"] != rec["job_id"]
    assert _wait_done(new["job_id"], timeout=900)[-1][0] == "COMPLETED"
    assert (Path(rec["run_dir"]) / "summary.json").exists()


def test_dry_run_prints_script_and_estimate_and_submits_nothing(tmp_path):
    out = run_job(
        "jobs.remax",
        "--json",
        f"run.root={tmp_path}",
        *JOB,
        "cluster.dry_run=true",
        "cluster.time_min=90",
    )
    assert "#SBATCH --requeue" in out.stdout and "#SBATCH --signal=USR2@30" in out.stdout
    assert "--kill-on-bad-exit=1" in out.stdout  # a dead rank ends the step, not a timeout
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["dry_run"] and info["estimate"]["gpu_hours"] == 1.5  # 1 GPU × 90 min
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_budget_cap_refuses_and_says_by_how_much(tmp_path):
    # 2 elements × 1 GPU × 20 min × 1.0/GPU-h = 0.67 fits a budget of 1.0; 4 elements (1.33) do not.
    ok = run_job(
        "jobs.remax",
        "-m",
        "--json",
        f"run.root={tmp_path}",
        *JOB,
        "cluster.budget=1.0",
        "cluster.dry_run=true",
        "optim.lr=1e-4,5e-5",
    )
    assert json.loads(ok.stdout.strip().splitlines()[-1])["estimate"]["cost"] == 0.67
    refused = run_job(
        "jobs.remax",
        "-m",
        f"run.root={tmp_path}",
        *JOB,
        "cluster.budget=1.0",
        "optim.lr=1e-4,5e-5",
        "algo.kl_coef=0.05,0.1",
        check=False,
    )
    assert refused.returncode == 2 and "exceeds cluster.budget=1.0 by 0.33" in refused.stderr
    assert not (tmp_path / "remax").exists()


@pytest.mark.parametrize("template", ["single_node", "multi_node"])
def test_templates_render_and_pass_sbatch_test_only(tmp_path, template):
    from jobs._config import compose_stage
    from jobs._submit import render_template

    config = compose_stage("remax", [*JOB, f"run.root={tmp_path}", "cluster.nodes=1"])
    script = render_template(template, "remax", config, ["train.max_steps=4"])
    for line in (
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=USR2@30",
        "srun --unbuffered --kill-on-bad-exit=1",
    ):
        assert line in script
    assert "${SBATCH_DIRECTIVES}" not in script and "${COMMAND}" not in script
    path = tmp_path / f"{template}.sbatch"
    path.write_text(script)
    out = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True, text=True)
    assert out.returncode == 0 and "to start" in out.stderr, out.stderr


def test_wandb_key_never_lands_in_pickles_scripts_configs_or_logs(tmp_path):
    secret = "sekret-wandb-key-0123456789"
    out = run_job(
        "jobs.remax",
        "--json",
        f"run.root={tmp_path}",
        *JOB,
        "train.max_steps=4",
        "log.wandb_mode=offline",  # offline: the key must not be used, nor written anywhere
        env={"WANDB_API_KEY": secret, "WANDB_MODE": "offline"},
    )
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    assert _wait_done(rec["job_id"])[-1][0] == "COMPLETED"
    files = [p for p in Path(rec["run_dir"]).rglob("*") if p.is_file()]
    assert any(p.suffix == ".pkl" for p in files) and any(p.name.endswith(".sh") for p in files)
    leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert not leaked, f"W&B key written into {leaked}"


def test_usr2_requeue_from_exports_is_bit_identical_to_an_uninterrupted_run(
    tmp_path, slurm_reference
):
    """The real path: SFT and RM exports as inputs. Before every RNG was seeded at stage start,
    two such runs already differed, requeued or not."""
    ref, inputs = slurm_reference
    rec = _submit(tmp_path / "usr2", *inputs)
    _wait_for(Path(rec["run_dir"]), "checkpoints/step_10", timeout=600)
    subprocess.run(["scancel", "--signal=USR2", rec["job_id"]], check=True)
    states = _wait_done(rec["job_id"], timeout=900)
    assert [s for s, _ in states] == ["REQUEUED", "COMPLETED"], states
    _wait_done(ref["job_id"], timeout=900)
    _assert_same_export(ref["run_dir"], rec["run_dir"])


def test_pipeline_cap_is_cumulative_and_a_later_stage_stops_at_it(tmp_path):
    """A 3-stage pipeline on real 1-minute time limits: 1 GPU-minute costs 1.0, so each stage's
    bound is 1.0 and ``cluster.budget=3`` admits the submission. The reward model needs many
    segments (every one ends at its time limit's USR2 and requeues); once what the pipeline has
    spent plus one more segment exceeds 3, its next segment ends before running: the RM fails,
    ReMax is cancelled unrun, and sacct bills the pipeline at most its cap."""
    out = run_job(
        "jobs.pipeline",
        "--json",
        f"run.root={tmp_path}",
        *[("remax." + a if a.startswith("eval_prompts") else a) for a in JOB],
        "evaluate=false",
        "log.wandb_mode=disabled",
        "cluster.time_min=1",
        "cluster.gpu_hour_rate=60",
        "cluster.budget=3",
        "cluster.signal_delay_s=15",
        "cluster.deadline_margin_s=5",
        "train.max_steps=4",
        "reward_model.train.max_steps=100000",
        "reward_model.train.epochs=1000",  # minutes of work on any machine, not one epoch
    )
    records = {r["stage"]: r for r in json.loads(out.stdout[out.stdout.index("{\n") :])["jobs"]}
    rm = records["reward_model"]
    rm_states = [s for s, _ in _wait_done(rm["job_id"], timeout=600)]
    assert rm_states[-1] == "FAILED" and set(rm_states[:-1]) == {"REQUEUED"}, rm_states
    assert len(rm_states) >= 2, rm_states  # the cap stopped a later segment, not the first
    errors = "".join(p.read_text() for p in (Path(rm["run_dir"]) / "slurm").glob("*.err"))
    assert "would exceed cluster.budget=3" in errors, errors[-3000:]
    assert [s for s, _ in _wait_done(records["sft"]["job_id"])] == ["COMPLETED"]
    remax_states = _wait_done(records["remax"]["job_id"], timeout=60)
    assert remax_states[-1][0].startswith("CANCELLED"), remax_states
    assert not (Path(records["remax"]["run_dir"]) / "metrics.jsonl").exists()
    spent = sum(_gpu_minutes(r["job_id"]) for r in records.values())
    # Each segment ran only after "spent so far + its whole time limit <= 3" held. Slack: Slurm
    # bills whole seconds and ends a job up to KillWait (local_slurm.sh: 5 s) past its limit.
    assert spent <= 3 + 0.2, spent


def _gpu_minutes(job: str) -> float:
    """Elapsed minutes of every segment of ``job`` (1 fake GPU each), from ``sacct -D``."""
    out = subprocess.run(
        ["sacct", "-j", job, "-D", "-X", "-n", "--parsable2", "-o", "ElapsedRaw"],
        capture_output=True,
        text=True,
        check=True,
    )
    return sum(int(x) for x in out.stdout.split()) / 60
