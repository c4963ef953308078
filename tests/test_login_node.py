"""Login-node logic without a cluster: ownership, sweeps, snapshots, W&B ids, help, sbatch keys.

``squeue`` and ``scontrol`` are replaced by shims on PATH where a test needs a particular answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from jobs import _lease
from jobs._config import compose_stage
from jobs._snapshot import check_running_code, code_hash, setup_lines, snapshot
from jobs._submit import sbatch_params
from jobs._sweep import expand, sweep_configs
from remax.run_dir import prepare, wandb_id


def _shim(tmp_path: Path, monkeypatch, name: str, script: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.parametrize("state", ["REQUEUE_HOLD", "SPECIAL_EXIT", "STOPPED", "PENDING"])
def test_every_non_terminal_state_is_live(tmp_path, monkeypatch, state):
    _shim(tmp_path, monkeypatch, "squeue", f"echo {state}")
    assert _lease.live_state("17") == state


def test_terminal_and_unknown_jobs_are_not_live(tmp_path, monkeypatch):
    _shim(tmp_path, monkeypatch, "squeue", "echo COMPLETED")
    assert _lease.live_state("17") is None
    _shim(
        tmp_path,
        monkeypatch,
        "squeue",
        "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1",
    )
    assert _lease.live_state("17") is None  # left the queue: an answer, not a failure


def test_failing_squeue_is_retried_then_raises(tmp_path, monkeypatch):
    count = tmp_path / "calls"
    _shim(
        tmp_path, monkeypatch, "squeue", f"echo x >> {count}; echo 'Socket timed out' >&2; exit 1"
    )
    with pytest.raises(_lease.QueueError, match="Socket timed out"):
        _lease.live_state("17", tries=3, backoff_s=0)
    assert len(count.read_text().splitlines()) == 3


def test_lease_refuses_a_second_live_job_and_passes_on_a_dead_one(tmp_path, monkeypatch):
    _shim(tmp_path, monkeypatch, "squeue", "echo RUNNING")
    run_dir = tmp_path / "run"
    assert _lease.take_lease(run_dir, "100") is None
    before = (run_dir / "lease.json").read_text()
    assert _lease.take_lease(run_dir, "100") is None  # another task of the same job, a requeue
    assert _lease.take_lease(run_dir, "200") == "100"  # a second job: told who owns the dir
    assert (run_dir / "lease.json").read_text() == before  # and the lease is untouched
    _shim(tmp_path, monkeypatch, "squeue", "echo CANCELLED")
    assert _lease.take_lease(run_dir, "200") is None
    assert json.loads((run_dir / "lease.json").read_text())["job_id"] == "200"


def test_array_elements_are_named_as_in_the_records():
    env = {"SLURM_JOB_ID": "905", "SLURM_ARRAY_JOB_ID": "900", "SLURM_ARRAY_TASK_ID": "5"}
    assert _lease.current_job_id(env) == "900_5"
    assert _lease.current_job_id({"SLURM_JOB_ID": "42"}) == "42"
    assert _lease.current_job_id({}) is None


def test_sweep_elements_equal_full_compositions():
    args = ["algo=remax_paper,remax_official", "algo.kl_coef=0.1,0.2", "run.name='a,b'"]
    elements = expand(args)
    configs = sweep_configs("remax", args)
    assert len(configs) == 4  # 2 group choices × 2 values; the quoted comma is no sweep
    for element, config in zip(elements, configs):
        assert config == compose_stage("remax", [text for text, *_ in element])
    assert {c.algo.kl_coef for c in configs} == {0.1, 0.2} and configs[0].run.name == "a,b"


def test_wandb_ids_differ_across_run_roots_and_stay_put(tmp_path):
    a = compose_stage("sft", [f"run.root={tmp_path / 'a'}"])
    b = compose_stage("sft", [f"run.root={tmp_path / 'b'}"])
    dir_a, dir_b = prepare(a, "sft"), prepare(b, "sft")
    assert dir_a.name == dir_b.name  # same config, same signature
    ids = wandb_id(dir_a, "sft"), wandb_id(dir_b, "sft")
    assert ids[0] != ids[1] and ids[0].startswith(f"sft-{dir_a.name.rsplit('-', 1)[-1]}-")
    assert wandb_id(dir_a, "sft") == ids[0]  # a requeue or resubmission keeps it


def test_snapshot_is_content_addressed_and_checked(tmp_path):
    snap = snapshot(tmp_path)
    assert snap.name == code_hash() and snapshot(tmp_path) == snap
    assert (snap / "jobs" / "_snapshot.py").read_bytes() == (
        REPO / "jobs" / "_snapshot.py"
    ).read_bytes()
    assert (snap / "hydra_conf" / "remax.yaml").exists()
    assert setup_lines(snap)[0] == f"cd {snap}"
    assert check_running_code(code_hash(), None) is None
    assert "mix code versions" in check_running_code("0" * 12, None)
    assert "torch" in check_running_code(None, {"torch": "0.0.1"})


def test_evaluate_asks_for_one_gpu_and_srun_gets_cpus_per_task():
    site = [
        "cluster=slurm_a800",
        "cluster.nodes=2",
        "cluster.constraint=ib",
        "+cluster.sbatch_extra.gpu_bind=closest",
    ]
    cfg = compose_stage("remax", site)
    p = sbatch_params("evaluate", cfg.cluster)
    assert (p["nodes"], p["ntasks_per_node"], p["gpus_per_node"]) == (1, 1, 1)
    train = sbatch_params("remax", cfg.cluster)
    assert (train["nodes"], train["gpus_per_node"]) == (2, 4)
    assert "--cpus-per-task=8" in train["srun_args"]
    assert train["additional_parameters"]["constraint"] == "ib"
    assert train["additional_parameters"]["gpu_bind"] == "closest"


def test_mail_user_without_mail_type_is_refused():
    out = subprocess.run(
        [sys.executable, "-m", "jobs.remax", "cluster.mail_user=a@b.c", "cluster.dry_run=true"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "cluster.mail_type" in out.stderr


def test_node_list_parsing_keeps_suffixes():
    from remax import distributed

    assert distributed._first_host_fallback("gpu[01-02]-ib,cpu1") == "gpu01-ib"
    assert distributed.first_host("gpu[01-02]-ib") == "gpu01-ib"  # scontrol when on PATH
    env = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": "n[1-2]",
    }
    # An exported MASTER_ADDR is the submitting shell's (sbatch exports it): ignored.
    assert distributed.env_from_environ({**env, "MASTER_ADDR": "head-ib"}).master_addr == "n1"


@pytest.mark.parametrize(
    "module",
    [
        "jobs.remax",
        "jobs.plan",
        "jobs.pipeline",
        "jobs.status",
        "jobs.resume",
        "jobs.cancel",
        "jobs.logs",
    ],
)
def test_every_entry_point_has_help(module):
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()
    if module == "jobs.remax":
        assert "algo.kl_coef" in out.stdout and "cluster.exclude" in out.stdout


def test_login_node_sweep_does_not_import_torch(tmp_path):
    code = (
        "import sys; from jobs._main import stage_main; "
        f"stage_main('remax', ['-m', 'run.root={tmp_path}', 'cluster=local_slurm', "
        "'cluster.dry_run=true', 'optim.lr=1e-4,2e-4', '--json']); "
        "assert 'torch' not in sys.modules, 'torch imported on the login node'"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["elements"] == 2


def test_sweep_resubmission_submits_only_what_is_neither_live_nor_complete(tmp_path, monkeypatch):
    from jobs._submit import _split_sweep

    configs = sweep_configs("remax", [f"run.root={tmp_path}", "optim.lr=1e-4,2e-4,3e-4"])
    run_dirs = [prepare(c, "remax") for c in configs]
    for i, d in enumerate(run_dirs):
        (d / "submission.json").write_text(json.dumps({"job_id": f"500_{i}"}))
    (run_dirs[2] / "summary.json").write_text("{}")
    # One squeue call for the whole sweep; element 1 is still running.
    _shim(tmp_path, monkeypatch, "squeue", "echo '500_1|RUNNING'; echo '500_0|CANCELLED'")
    todo, live, complete = _split_sweep("remax", configs, run_dirs)
    assert [d for _, d in todo] == [run_dirs[0]]
    assert live == [(run_dirs[1], "500_1", "RUNNING")] and complete == [run_dirs[2]]


def test_costs_come_from_alloc_tres_with_billing_granularity():
    from jobs._costs import allocated_gpus, billed_hours, run_cost

    assert allocated_gpus("billing=4,cpu=32,gres/gpu=4,node=1") == 4
    assert allocated_gpus("cpu=8,gres/gpu:a800=2,node=1") == 2
    assert allocated_gpus("cpu=1,node=1") is None  # GPUs not accounted: unknown, not 0
    # 2 segments: 100 s on 4 GPUs, then 3000 s on 2 GPUs (a requeue landed on a smaller
    # allocation). Per started hour: 1 h × 4 + 1 h × 2 = 6 GPU-h; per second: (400 + 6000)/3600.
    segs = [{"elapsed_s": 100, "gpus": 4}, {"elapsed_s": 3000, "gpus": 2}]
    assert billed_hours(segs, 3600) == 6
    assert billed_hours(segs, 1) == pytest.approx(6400 / 3600)
    records = [{"job_id": "7", "gpu_hour_rate": 2.0, "billing_granularity_s": 3600}]
    assert run_cost(records, {"7": segs}) == (6, 12.0)


def test_sacct_failure_is_loud_and_the_budget_cap_fails_closed(tmp_path, monkeypatch):
    from jobs._costs import SacctError, over_budget, sacct_segments

    _shim(tmp_path, monkeypatch, "sacct", "echo 'Slurm accounting storage is disabled' >&2; exit 1")
    with pytest.raises(SacctError, match="accounting storage is disabled"):
        sacct_segments(["7"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "submissions.jsonl").write_text(
        json.dumps({"job_id": "7", "gpu_hour_rate": 1.0}) + "\n"
    )
    cluster = compose_stage("remax", ["cluster=local_slurm", "cluster.budget=5"]).cluster
    assert "cannot check cluster.budget=5" in over_budget(run_dir, cluster, 0.3)
    # Spent 2 segments × 1 GPU × 2 h = 4.0 so far (every requeue counts): one more 1.5 does not fit.
    _shim(
        tmp_path,
        monkeypatch,
        "sacct",
        "echo '7|REQUEUED|7200|gres/gpu=1'; echo '7|RUNNING|7200|gres/gpu=1'",
    )
    assert over_budget(run_dir, cluster, 0.9) is None
    assert "exceed cluster.budget=5" in over_budget(run_dir, cluster, 1.5)
    assert over_budget(run_dir, cluster, 1.5, job_id="7") is None  # its own running segment


def test_status_filters_pending_elements_sweep_totals_and_80_columns(tmp_path, monkeypatch):
    from rich.console import Console

    from jobs import status

    configs = sweep_configs(
        "remax",
        [f"run.root={tmp_path}", "run.name=a-long-run-name-for-columns", "optim.lr=1e-4,2e-4"],
    )
    run_dirs = [prepare(c, "remax") for c in configs]
    for i, d in enumerate(run_dirs):
        record = {"job_id": f"600_{i}", "sweep": "remax-sweep-x", "gpu_hour_rate": 2.0}
        (d / "submissions.jsonl").write_text(json.dumps(record) + "\n")
        (d / "metrics.jsonl").write_text(
            json.dumps({"step": 3, "reward/mean": 0.1 * (i + 1)}) + "\n"
        )
    # Element 0 ran 1800 s on 2 GPUs and runs again; element 1 never started (no sacct row).
    _shim(
        tmp_path,
        monkeypatch,
        "sacct",
        "echo '600_0|REQUEUED|1800|gres/gpu=2'; echo '600_0|RUNNING|0|gres/gpu=2'",
    )
    _shim(tmp_path, monkeypatch, "squeue", "echo '600_0|RUNNING'; echo '600_1|PENDING'")
    rows, error = status.collect(tmp_path)
    assert error is None
    by_job = {r["job_id"]: r for r in rows}
    assert by_job["600_1"]["state"] == "PENDING" and by_job["600_0"]["state"] == "RUNNING"
    assert by_job["600_0"]["gpu_hours"] == 1.0 and by_job["600_0"]["cost"] == 2.0
    assert [r["job_id"] for r in status.select(rows, states="pending")] == ["600_1"]
    assert status.select(rows, sweep="other") == [] and len(status.select(rows, stage="remax")) == 2
    [sweep] = status.sweeps(rows, "reward/mean")
    assert sweep["cost"] == 2.0 and sweep["best"]["run_dir"] == str(run_dirs[1])
    assert status.sweeps(rows, "-reward/mean")[0]["best"]["run_dir"] == str(run_dirs[0])
    console = Console(width=80, record=True)
    console.print(*status.render(rows, status.sweeps(rows, "reward/mean")))
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    # sacct down: costs unknown, and the command says so and exits non-zero.
    _shim(tmp_path, monkeypatch, "sacct", "echo 'Slurm accounting storage is disabled' >&2; exit 1")
    rows, error = status.collect(tmp_path)
    assert "accounting storage is disabled" in error and all(r["cost"] is None for r in rows)
    assert status.main([str(tmp_path), "--json"]) == 1


def _status_run(root: Path, name: str, job: str, rows: list[dict], age_s: float) -> Path:
    run_dir = root / "remax" / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("train:\n  max_steps: 100\n")
    (run_dir / "submissions.jsonl").write_text(json.dumps({"job_id": job}) + "\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    old = time.time() - age_s
    os.utime(run_dir / "metrics.jsonl", (old, old))
    return run_dir


def test_stalled_scales_with_the_runs_own_step_time(tmp_path, monkeypatch):
    from jobs import status

    slow = [{"step": s, "time/step_s": 600.0} for s in (1, 2, 3)]  # 10 min per step, every step
    fast = [{"step": s, "time/step_s": 2.0} for s in (10, 20, 30)]  # 2 s steps, every 10th logged
    sparse = [{"step": s, "time/step_s": 200.0} for s in (5, 10)]  # 5 steps of 200 s per row
    _status_run(tmp_path, "slow-20min", "1", slow, age_s=20 * 60)  # under 3 × 10 min: working
    _status_run(tmp_path, "slow-40min", "2", slow, age_s=40 * 60)  # over 3 × 10 min: stalled
    _status_run(tmp_path, "fast-20min", "3", fast, age_s=20 * 60)  # the 15-min floor: stalled
    _status_run(tmp_path, "sparse-45min", "4", sparse, age_s=45 * 60)  # under 3 × 5 × 200 s
    _shim(tmp_path, monkeypatch, "sacct", 'for j in 1 2 3 4; do echo "$j|RUNNING|60|"; done')
    _shim(tmp_path, monkeypatch, "squeue", 'for j in 1 2 3 4; do echo "$j|RUNNING"; done')
    rows, error = status.collect(tmp_path)
    assert error is None
    assert {r["run"]: r["stalled"] for r in rows} == {
        "slow-20min": False,
        "slow-40min": True,
        "fast-20min": True,
        "sparse-45min": False,
    }
    assert status.stall_after_s([]) == status.STALL_S  # no step time yet: the floor


def test_failing_squeue_is_one_line_not_a_silent_unknown(tmp_path, monkeypatch, capsys):
    from jobs import status

    _status_run(tmp_path, "pending", "9_1", [], age_s=0)  # an array element not yet started
    _shim(tmp_path, monkeypatch, "sacct", "true")  # no accounting row before it starts
    _shim(tmp_path, monkeypatch, "squeue", "echo 'Unable to contact slurm controller' >&2; exit 1")
    rows, error = status.collect(tmp_path)
    assert rows[0]["state"] == "UNKNOWN"
    assert error.startswith("squeue failed (rc 1: Unable to contact slurm controller)")
    assert status.main([str(tmp_path), "--json"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("error:")] == [f"error: {error}"]
    # Every listed job already left the controller: squeue says so and exits 1; no failure.
    _shim(tmp_path, monkeypatch, "squeue", "echo 'error: Invalid job id specified' >&2; exit 1")
    assert status.collect(tmp_path)[1] is None


def test_logs_and_cancel_find_a_runs_files_and_jobs(tmp_path, monkeypatch, capsys):
    from jobs import cancel, logs

    run_dir = tmp_path / "remax" / "default-abc"
    (run_dir / "slurm").mkdir(parents=True)
    record = {"job_id": "700", "log_folder": str(run_dir / "slurm"), "sweep": None}
    (run_dir / "submission.json").write_text(json.dumps(record))
    (run_dir / "submissions.jsonl").write_text(json.dumps(record) + "\n")
    (run_dir / "slurm" / "700_1_log.err").write_text("rank one says hi\n")
    assert logs.main([str(run_dir), "--rank", "1"]) == 0
    assert "rank one says hi" in capsys.readouterr().out
    assert logs.main([str(tmp_path)]) == 2  # not a submitted run dir: one clear line
    # --graceful on a running job: the stop file first, then USR2 (never a plain scancel).
    calls = tmp_path / "scancel_calls"
    _shim(tmp_path, monkeypatch, "squeue", "echo RUNNING")
    _shim(tmp_path, monkeypatch, "scancel", f'echo "$@" >> {calls}')
    assert cancel.main([str(run_dir), "--graceful", "--json"]) == 0
    assert calls.read_text().split() == ["--signal=USR2", "700"]
    assert (run_dir / "stop_requested").exists()
    _shim(tmp_path, monkeypatch, "squeue", "echo PENDING")
    assert cancel.main([str(run_dir), "--graceful"]) == 0  # pending: nothing to save
    assert calls.read_text().splitlines()[-1] == "700"
