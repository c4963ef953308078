"""Slurm submission through submitit: the only module that imports it.

Login node: ``submit`` / ``submit_array`` turn stage configs into one job or ONE job array, write a
submission record into each run dir, print job id, run dir, W&B id and the estimated GPU-hours and
cost, and return at once (no process waits for the jobs, unlike hydra-submitit-launcher).

Compute node: :class:`StageJob` runs the stage in the job step (srun, so USR2 reaches Python,
slurm-notes §2.4). On USR2 — or when one more step would not fit before the job's end time — the
training loop writes a checkpoint at the next step boundary; then submitit's own handler pickles the
job again and runs ``scontrol requeue``. The restarted job resumes from that checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import string
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import submitit

from jobs._config import fail
from remax.fileio import write_json
from remax.run_dir import prepare, run_dir_for, signature, to_plain

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "slurm_templates"
LIVE_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
}


# ------------------------------------------------------------------ parameters and records
def sbatch_params(stage: str, cluster) -> dict:
    """The executor parameters of a stage's job; the dry run and the templates use the same dict."""
    params = {
        "job_name": f"remax-{stage}",
        "time": cluster.time_min,
        "nodes": cluster.nodes,
        # Evaluation is one process (its resumable answer files have one writer).
        "ntasks_per_node": 1 if stage == "evaluate" else cluster.tasks_per_node,
        "cpus_per_task": cluster.cpus_per_task,
        "signal_delay_s": cluster.signal_delay_s,
        # submitit emits neither --requeue (scontrol requeue would fail where the site default is
        # JobRequeue=0) nor a kill of dependents when a dependency fails (slurm-notes §2.5, §5.4).
        "additional_parameters": {"requeue": True, "kill_on_invalid_dep": "yes"},
        # A rank that dies takes the step's other tasks with it at once, instead of leaving them
        # billed while they wait in a collective until the process group's timeout.
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    if cluster.gpus_per_node:
        if cluster.gres:
            params["gres"] = f"gpu:{cluster.gpus_per_node}"
        else:
            params["gpus_per_node"] = cluster.gpus_per_node
    for key in ("partition", "account", "qos"):
        if getattr(cluster, key):
            params[key] = getattr(cluster, key)
    if cluster.mem_gb is not None:
        params["mem"] = f"{cluster.mem_gb}GB"
    if cluster.setup:
        params["setup"] = list(cluster.setup)
    return params


def code_hash() -> str:
    """Hash of the code and configs a job runs: a resubmission on changed code is refused."""
    h = hashlib.sha1()
    for folder, pattern in (("remax", "*.py"), ("jobs", "*.py"), ("hydra_conf", "*.yaml")):
        for path in sorted((REPO / folder).rglob(pattern)):
            h.update(str(path.relative_to(REPO)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def wandb_id(stage: str, config) -> str:
    return f"{stage}-{signature(config, stage)}"


def read_record(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "submission.json"
    return json.loads(path.read_text()) if path.exists() else None


def _write_record(run_dir: Path, record: dict) -> None:
    write_json(run_dir / "submission.json", record)
    with open(run_dir / "submissions.jsonl", "a") as f:  # history across resubmissions
        f.write(json.dumps(record, sort_keys=True) + "\n")


def live_state(job_id: str) -> str | None:
    """The job's state if Slurm still holds it (pending, running, requeued…), else None."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    states = {s.strip() for s in out.stdout.split()} & LIVE_STATES
    return sorted(states)[0] if out.returncode == 0 and states else None


# ------------------------------------------------------------------ login node
def check_resubmission(stage: str, config, run_dir: Path) -> None:
    """Refuse a second live job on a run dir, and a resubmission onto changed code unless forced."""
    record = read_record(run_dir)
    if record is None:
        return
    state = live_state(record["job_id"])
    if state:
        fail(
            f"run dir {run_dir} already has job {record['job_id']} ({state}): "
            f"wait for it or `scancel {record['job_id']}` first"
        )
    if record.get("code_hash") != code_hash() and not config.run.force:
        fail(
            f"code changed since job {record['job_id']} started {run_dir} (code hash "
            f"{record.get('code_hash')} -> {code_hash()}): resuming would mix code versions; "
            "add run.force=true to resume anyway, or run.attempt=<n> for a fresh run"
        )


def _executor(folder: Path, cluster, params: dict, dependency: str | None = None):
    executor = submitit.AutoExecutor(
        folder=folder, cluster="slurm", slurm_max_num_timeout=cluster.max_num_timeout
    )
    executor.update_parameters(
        **{f"slurm_{k}": v for k, v in params.items()},
        slurm_array_parallelism=cluster.array_parallelism,
        **({"slurm_dependency": dependency} if dependency else {}),
    )
    return executor


def _check_budget(cluster, n_jobs: int) -> dict:
    total = cluster.estimate(n_jobs)
    if cluster.budget is not None and total["cost"] > cluster.budget:
        fail(
            f"estimated cost {total['cost']} {total['currency']} ({n_jobs} job(s) × {cluster.time_min} min × "
            f"{cluster.gpus} GPUs × {cluster.gpu_hour_rate}/GPU-h) exceeds cluster.budget={cluster.budget} "
            f"by {round(total['cost'] - cluster.budget, 2)}: lower cluster.time_min or raise the budget"
        )
    return total


def _check_memory(stage: str, config) -> None:
    if config.cluster.check_memory:
        from jobs.plan import check_fits

        reason = check_fits(stage, config)
        if reason:
            fail(reason)


def dry_run_script(stage: str, config) -> str:
    from submitit.slurm.slurm import _make_sbatch_string

    folder = run_dir_for(config, stage) / "slurm"
    command = f"{sys.executable} -u -m submitit.core._submit {folder}"
    return _make_sbatch_string(
        command=command, folder=folder, **sbatch_params(stage, config.cluster)
    )


def submit(stage: str, config, *, dependency: str | None = None, quiet: bool = False) -> dict:
    """Submit one stage; returns the submission record (``job_id``, ``run_dir``, …)."""
    cluster = config.cluster
    run_dir = run_dir_for(config, stage)
    _check_memory(stage, config)
    if cluster.dry_run:
        estimate = _check_budget(cluster, 1)
        print(dry_run_script(stage, config))
        print(
            json.dumps(
                {"dry_run": True, "stage": stage, "run_dir": str(run_dir), "estimate": estimate}
            )
        )
        return {"dry_run": True, "run_dir": str(run_dir), "job_id": None}
    estimate = _check_budget(cluster, 1)
    run_dir = prepare(config, stage)
    if (run_dir / "summary.json").exists():
        print(json.dumps({"stage": stage, "run_dir": str(run_dir), "complete": True}))
        return {"run_dir": str(run_dir), "job_id": None, "complete": True}
    check_resubmission(stage, config, run_dir)
    executor = _executor(run_dir / "slurm", cluster, sbatch_params(stage, cluster), dependency)
    job = executor.submit(StageJob(stage, config))
    record = _record(stage, config, run_dir, job.job_id, estimate, dependency=dependency)
    _write_record(run_dir, record)
    if not quiet:
        print(json.dumps(record))
    return record


def submit_array(stage: str, configs: list, *, sweep_id: str) -> list[dict]:
    """One Slurm job array for a ``-m`` sweep: one element per config, one run dir each."""
    clusters = {json.dumps(to_plain(c.cluster), sort_keys=True) for c in configs}
    if len(clusters) != 1:
        fail(
            "a sweep over cluster.* keys cannot be one job array: sweep other keys, or submit separately"
        )
    cluster = configs[0].cluster
    for c in configs:
        _check_memory(stage, c)
    estimate = _check_budget(cluster, len(configs))
    configs = [
        replace(c, log=replace(c.log, wandb_group=c.log.wandb_group or sweep_id)) for c in configs
    ]
    if cluster.dry_run:
        print(dry_run_script(stage, configs[0]))
        print(
            json.dumps(
                {"dry_run": True, "stage": stage, "elements": len(configs), "estimate": estimate}
            )
        )
        return []
    run_dirs = [prepare(c, stage) for c in configs]
    if len(set(run_dirs)) != len(run_dirs):
        fail(f"sweep {sweep_id} has duplicate configs (same run dir): remove the repeated values")
    todo = [(c, d) for c, d in zip(configs, run_dirs) if not (d / "summary.json").exists()]
    for c, d in todo:
        check_resubmission(stage, c, d)
    folder = Path(configs[0].run.root) / "sweeps" / sweep_id
    executor = _executor(folder, cluster, sbatch_params(stage, cluster))
    jobs = executor.submit_array([StageJob(stage, c) for c, _ in todo]) if todo else []
    records = []
    for (c, d), job in zip(todo, jobs):
        record = _record(stage, c, d, job.job_id, cluster.estimate(), sweep=sweep_id)
        _write_record(d, record)
        records.append(record)
    array_id = jobs[0].job_id.split("_")[0] if jobs else None
    print(
        json.dumps(
            {
                "sweep": sweep_id,
                "array_job_id": array_id,
                "elements": len(jobs),
                "already_complete": len(configs) - len(todo),
                "run_dirs": [str(d) for d in run_dirs],
                "estimate": estimate,
            }
        )
    )
    return records


def _record(stage, config, run_dir, job_id, estimate, *, dependency=None, sweep=None) -> dict:
    return {
        "stage": stage,
        "job_id": str(job_id),
        "run_dir": str(run_dir),
        "wandb_id": wandb_id(stage, config),
        "cluster": config.cluster.name,
        "gpus": config.cluster.gpus,
        "time_min": config.cluster.time_min,
        "gpu_hour_rate": config.cluster.gpu_hour_rate,
        "currency": config.cluster.currency,
        "estimate": estimate,
        "code_hash": code_hash(),
        "dependency": dependency,
        "sweep": sweep,
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "log_folder": str(run_dir / "slurm") if sweep is None else None,
    }


# ------------------------------------------------------------------ compute node
def job_end_time() -> float | None:
    """The job's projected end (Unix time): SLURM_JOB_END_TIME (Slurm >= 23.02) or squeue."""
    if os.environ.get("SLURM_JOB_END_TIME"):
        return float(os.environ["SLURM_JOB_END_TIME"])
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True, text=True)
    try:
        return time.mktime(time.strptime(out.stdout.strip(), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:  # "N/A", "Unknown" or no squeue: only the signal will stop us
        return None


class SlurmStop:
    """Stop request for the training loop: USR2 arrived, or one more step would not fit."""

    def __init__(self, end_time: float | None, margin_s: float) -> None:
        self.end_time, self.margin_s = end_time, margin_s
        self.signalled = False
        self.step_s = 0.0

    def on_signal(self, *_args) -> None:
        self.signalled = True  # only a flag: the save happens at the next step boundary

    def observe(self, step_s: float) -> None:
        self.step_s = max(step_s, 0.9 * self.step_s)  # slow decay: steps vary in length

    @property
    def requested(self) -> bool:
        if self.signalled:
            return True
        return (
            self.end_time is not None and time.time() + self.step_s + self.margin_s >= self.end_time
        )


class StageJob(submitit.helpers.Checkpointable):
    """The pickled callable of a stage's Slurm job. Holds only the config, never tensors."""

    def __init__(self, stage: str, config) -> None:
        self.stage, self.config = stage, config

    def __call__(self):
        from jobs._stage import run_stage

        cluster = self.config.cluster
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if restarts > cluster.max_restarts:
            raise RuntimeError(
                f"job restarted {restarts} times, more than cluster.max_restarts={cluster.max_restarts}"
            )
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue handler
        stop = SlurmStop(job_end_time(), cluster.deadline_margin_s)
        signal.signal(signal.SIGUSR2, stop.on_signal)
        summary = run_stage(self.stage, self.config, stop=stop)
        if summary is None:  # checkpoint written: let submitit pickle us again and requeue
            if not callable(requeue):
                raise RuntimeError(
                    "stopped for a requeue but no submitit signal handler is installed"
                )
            requeue(signal.SIGUSR2, None)
        return summary


# ------------------------------------------------------------------ templates
def render_template(name: str, stage: str, config, overrides: list[str]) -> str:
    """``slurm_templates/<name>.sbatch`` with the same directives as the submitit job."""
    params = sbatch_params(stage, config.cluster)
    lines = [
        f"#SBATCH --job-name={params['job_name']}",
        f"#SBATCH --time={params['time']}",
        f"#SBATCH --nodes={params['nodes']}",
        f"#SBATCH --ntasks-per-node={params['ntasks_per_node']}",
        f"#SBATCH --cpus-per-task={params['cpus_per_task']}",
        f"#SBATCH --signal=USR2@{params['signal_delay_s']}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --kill-on-invalid-dep=yes",
    ]
    if "gpus_per_node" in params:
        lines.append(f"#SBATCH --gpus-per-node={params['gpus_per_node']}")
    if "gres" in params:
        lines.append(f"#SBATCH --gres={params['gres']}")
    for key in ("partition", "account", "qos", "mem"):
        if key in params:
            lines.append(f"#SBATCH --{key}={params[key]}")
    command = " ".join(["python", "-u", "-m", f"jobs.{stage}", "cluster.backend=local", *overrides])
    values = {
        "SBATCH_DIRECTIVES": "\n".join(lines),
        "SETUP": "\n".join(config.cluster.setup),
        "STAGE": stage,
        "COMMAND": command,
        "REPO": str(REPO),
    }
    return string.Template((TEMPLATES / f"{name}.sbatch").read_text()).safe_substitute(values)
