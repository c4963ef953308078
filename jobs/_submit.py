"""Slurm submission through submitit: the only module that imports it.

Login node: ``submit`` / ``submit_array`` turn stage configs into one job or ONE job array, write a
submission record into each run dir, print job id, run dir, W&B id and the estimated GPU-hours and
cost, and return at once (no process waits for the jobs, unlike hydra-submitit-launcher).

Compute node: :class:`StageJob` runs the stage in the job step (srun, so USR2 reaches Python,
slurm-notes §2.4). On USR2 or SIGTERM — or when one more step and a save would not fit before the
job's end time — the training loop writes a checkpoint at the next step boundary (or between two
evaluation batches) and the job requeues itself (``remax.preemption``). The restarted job resumes
from that checkpoint.
"""

from __future__ import annotations

import json
import string
import sys
import time
from dataclasses import replace
from pathlib import Path

import submitit

from jobs._budget import check_segment
from jobs._config import fail, stage_spec
from jobs._costs import over_budget, read_scope, scope_refusal, write_scope
from jobs._lease import (
    QueueError,
    clear_stop,
    current_job_id,
    live_state,
    live_states,
    submit_lock,
)
from jobs._output import emit
from jobs._snapshot import REPO, check_running_code, code_hash, package_versions, setup_lines
from jobs._snapshot import snapshot as code_snapshot
from remax import preemption
from remax.fileio import write_json
from remax.run_dir import prepare, run_dir_for, to_plain, wandb_id

TEMPLATES = REPO / "slurm_templates"


# ------------------------------------------------------------------ parameters and records
def sbatch_params(stage: str, cluster) -> dict:
    """The executor parameters of a stage's job; the dry run and the templates use the same dict."""
    # Evaluation is one process on one GPU (its resumable answer files have one writer): asking
    # for the preset's whole node would bill GPUs it never uses, and two nodes would fail.
    one = stage_spec(stage).one_rank
    params = {
        "job_name": f"remax-{stage}",
        "time": cluster.time_min,
        "nodes": 1 if one else cluster.nodes,
        "ntasks_per_node": 1 if one else cluster.tasks_per_node,
        "cpus_per_task": cluster.cpus_per_task,
        "signal_delay_s": cluster.signal_delay_s,
        # submitit emits neither --requeue (scontrol requeue would fail where the site default is
        # JobRequeue=0) nor a kill of dependents when a dependency fails (slurm-notes §2.5, §5.4).
        "additional_parameters": {
            "requeue": True,
            "kill_on_invalid_dep": "yes",
            **_site_parameters(cluster),
        },
        # A rank that dies takes the step's other tasks with it at once, instead of leaving them
        # billed while they wait in a collective until the process group's timeout. srun does
        # not inherit --cpus-per-task from the allocation on Slurm 22.05-23.02: without it every
        # rank may get one core, starving CPU-offloaded Adam.
        "srun_args": ["--kill-on-bad-exit=1", f"--cpus-per-task={cluster.cpus_per_task}"],
    }
    gpus_per_node = min(1, cluster.gpus_per_node) if one else cluster.gpus_per_node
    if gpus_per_node:
        if cluster.gres:
            params["gres"] = f"gpu:{gpus_per_node}"
        else:
            params["gpus_per_node"] = gpus_per_node
    for key in ("partition", "account", "qos"):
        if getattr(cluster, key):
            params[key] = getattr(cluster, key)
    mem = _memory(stage, cluster, gpus_per_node)
    if mem is not None:
        params["mem"] = mem
    if cluster.setup:
        params["setup"] = list(cluster.setup)
    return params


def _memory(stage: str, cluster, gpus: int) -> str | None:
    """``--mem`` of a stage's job: ``cluster.mem_gb``, except that a stage on fewer GPUs than the
    node has gets its per-GPU share of the node (``cluster.node_mem_gb``) where ``mem_gb=0``
    would take the whole node's memory, leaving the node's other GPUs unusable by anyone."""
    if cluster.mem_gb is None:
        return None
    if cluster.mem_gb or gpus >= cluster.gpus_per_node:
        return f"{cluster.mem_gb}GB"
    if cluster.node_mem_gb is None:
        fail(
            f"cluster.mem_gb=0 asks for a whole node's memory, but {stage} runs on {gpus} of its "
            f"{cluster.gpus_per_node} GPUs: set cluster.node_mem_gb=<GB per node> ({stage} then "
            f"asks for {gpus}/{cluster.gpus_per_node} of it) or cluster.mem_gb=<GB>"
        )
    return f"{cluster.node_mem_gb * gpus // cluster.gpus_per_node}GB"


def _site_parameters(cluster) -> dict:
    """The cluster config's optional sbatch keys, spelled as submitit's additional_parameters."""
    params = {k: getattr(cluster, k) for k in SITE_KEYS if getattr(cluster, k)}
    params.update(cluster.sbatch_extra)  # free-form, e.g. {gpu_bind: closest}
    return params


SITE_KEYS = ("exclude", "constraint", "reservation", "mail_type", "mail_user")


def read_record(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "submission.json"
    return json.loads(path.read_text()) if path.exists() else None


def _write_record(run_dir: Path, record: dict) -> None:
    write_json(run_dir / "submission.json", record)
    with open(run_dir / "submissions.jsonl", "a") as f:  # history across resubmissions
        f.write(json.dumps(record, sort_keys=True) + "\n")


def owner_state(run_dir: Path) -> tuple[str, str] | None:
    """(job id, state) of the live job that owns ``run_dir``, if any; an unanswered squeue exits."""
    record = read_record(run_dir)
    if record is None or not record.get("job_id"):
        return None
    try:
        state = live_state(record["job_id"])
    except QueueError as exc:
        fail(
            f"{exc}: cannot tell whether job {record['job_id']} still owns {run_dir}, so nothing "
            "was submitted; retry when squeue answers"
        )
    return (record["job_id"], state) if state else None


# ------------------------------------------------------------------ login node
def check_resubmission(stage: str, config, run_dir: Path) -> None:
    """Refuse a second live job on a run dir, and a resubmission onto changed code unless forced."""
    record = read_record(run_dir)
    if record is None:
        return
    owner = owner_state(run_dir)
    if owner:
        state = owner[1]
        fail(
            f"run dir {run_dir} already has job {record['job_id']} ({state}): "
            f"wait for it or `scancel {record['job_id']}` first"
        )
    check_code(config, run_dir, record)


def check_code(config, run_dir: Path, record: dict | None) -> None:
    """Refuse to continue a run on other code than its last job ran, unless ``run.force``
    (a job started by hand records no code hash: nothing to compare)."""
    if not record or not record.get("code_hash"):
        return
    if record["code_hash"] != code_hash() and not config.run.force:
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


def billed_gpus(stage: str, cluster) -> int:
    """GPUs a stage's job allocates (evaluation asks for one, whatever the preset)."""
    params = sbatch_params(stage, cluster)
    per_node = params.get("gpus_per_node") or int(params.get("gres", "gpu:0").split(":")[-1])
    return params["nodes"] * per_node


def estimate(stage: str, cluster, n_jobs: int = 1) -> dict:
    """Upper bound for ``n_jobs`` job segments: every allocated GPU for the whole time limit."""
    gpu_hours = n_jobs * billed_gpus(stage, cluster) * cluster.time_min / 60
    return {
        "gpu_hours": round(gpu_hours, 3),
        "cost": round(gpu_hours * cluster.gpu_hour_rate, 2),
        "currency": cluster.currency,
    }


def _check_budget(cluster, n_jobs: int, stage: str = "remax") -> dict:
    total = estimate(stage, cluster, n_jobs)
    if cluster.budget is not None and total["cost"] > cluster.budget:
        fail(
            f"estimated cost {total['cost']} {total['currency']} ({n_jobs} job(s) × {cluster.time_min} min × "
            f"{billed_gpus(stage, cluster)} GPUs × {cluster.gpu_hour_rate}/GPU-h) exceeds cluster.budget={cluster.budget} "
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


def _with_snapshot(params: dict, snapshot_dir: Path) -> dict:
    return {**params, "setup": [*params.get("setup", []), *setup_lines(snapshot_dir)]}


def submit(
    stage: str,
    config,
    *,
    dependency: str | None = None,
    quiet: bool = False,
    budget_scope: Path | None = None,
) -> dict:
    """Submit one stage; returns the submission record (``job_id``, ``run_dir``, …).
    ``budget_scope``: the scope file (:func:`jobs._costs.write_scope`) of the pipeline whose
    cap this run shares with the other stages."""
    cluster = config.cluster
    run_dir = run_dir_for(config, stage)
    _check_memory(stage, config)
    if cluster.dry_run:
        cost = _check_budget(cluster, 1, stage)
        print(dry_run_script(stage, config))
        emit({"dry_run": True, "stage": stage, "run_dir": str(run_dir), "estimate": cost})
        return {"dry_run": True, "run_dir": str(run_dir), "job_id": None}
    cost = _check_budget(cluster, 1, stage)
    run_dir = prepare(config, stage)
    if (run_dir / "summary.json").exists():
        if not quiet:
            emit({"stage": stage, "run_dir": str(run_dir), "complete": True})
        return {"run_dir": str(run_dir), "job_id": None, "complete": True}
    snap = code_snapshot(Path(config.run.root))
    with submit_lock([run_dir]):  # check → sbatch → record: a concurrent submission waits here
        check_resubmission(stage, config, run_dir)
        clear_stop(run_dir)  # a graceful cancel of an earlier job must not stop this one
        reason = over_budget(run_dir, cluster, cost["cost"])
        if reason:
            fail(reason)
        params = _with_snapshot(sbatch_params(stage, cluster), snap)
        executor = _executor(run_dir / "slurm", cluster, params, dependency)
        job = executor.submit(StageJob(stage, config))
        record = _record(stage, config, run_dir, job.job_id, cost, dependency=dependency)
        record["code_dir"] = str(snap)
        record["budget_scope"] = str(budget_scope) if budget_scope else None
        _write_record(run_dir, record)
    if not quiet:
        emit(record)
    return record


def _split_sweep(stage: str, configs: list, run_dirs: list[Path]):
    """(to submit, live, complete): a resubmitted sweep submits only what is neither."""
    records = {d: read_record(d) for d in run_dirs}
    ids = [r["job_id"] for r in records.values() if r and r.get("job_id")]
    try:
        states = live_states(ids)  # one squeue for the whole sweep, not one per element
    except QueueError as exc:
        fail(f"{exc}: cannot tell which sweep elements are still live, so nothing was submitted")
    todo, live, complete = [], [], []
    for c, d in zip(configs, run_dirs):
        job = (records[d] or {}).get("job_id")
        if (d / "summary.json").exists():
            complete.append(d)
        elif job in states:
            live.append((d, job, states[job]))
        else:
            check_code(c, d, records[d])
            clear_stop(d)
            todo.append((c, d))
    return todo, live, complete


def submit_array(stage: str, configs: list, *, sweep_id: str) -> list[dict]:
    """One Slurm job array for a ``-m`` sweep: one element per config, one run dir each."""
    clusters = {json.dumps(to_plain(c.cluster), sort_keys=True) for c in configs}
    if len(clusters) != 1:
        fail(
            "a sweep over cluster.* keys cannot be one job array: sweep other keys, or submit separately"
        )
    cluster = configs[0].cluster
    for c in configs:  # arithmetic only: microseconds per element
        _check_memory(stage, c)
    total = _check_budget(cluster, len(configs), stage)
    configs = [
        replace(c, log=replace(c.log, wandb_group=c.log.wandb_group or sweep_id)) for c in configs
    ]
    if cluster.dry_run:
        print(dry_run_script(stage, configs[0]))
        emit({"dry_run": True, "stage": stage, "elements": len(configs), "estimate": total})
        return []
    run_dirs = [prepare(c, stage) for c in configs]
    if len(set(run_dirs)) != len(run_dirs):
        fail(f"sweep {sweep_id} has duplicate configs (same run dir): remove the repeated values")
    snap = code_snapshot(Path(configs[0].run.root))
    folder = Path(configs[0].run.root) / "sweeps" / sweep_id
    with submit_lock(run_dirs):
        todo, live, complete = _split_sweep(stage, configs, run_dirs)
        scope = _sweep_scope(stage, configs[0], sweep_id, run_dirs, len(todo))
        params = _with_snapshot(sbatch_params(stage, cluster), snap)
        executor = _executor(folder, cluster, params)
        jobs = executor.submit_array([StageJob(stage, c) for c, _ in todo]) if todo else []
        records = []
        for (c, d), job in zip(todo, jobs):
            record = _record(stage, c, d, job.job_id, estimate(stage, cluster), sweep=sweep_id)
            record["code_dir"] = str(snap)
            record["budget_scope"] = str(scope)
            _write_record(d, record)
            records.append(record)
    summary = {
        "sweep": sweep_id,
        "stage": stage,
        "array_job_id": jobs[0].job_id.split("_")[0] if jobs else None,
        "elements": len(jobs),
        "already_live": [{"run_dir": str(d), "job_id": j, "state": st} for d, j, st in live],
        "already_complete": len(complete),
        "run_dirs": [str(d) for d in run_dirs],
        "submitted_run_dirs": [str(d) for _, d in todo],
        "estimate": total,
    }
    emit(summary)
    return records


def _sweep_scope(stage: str, config, sweep_id: str, run_dirs: list[Path], n_todo: int) -> Path:
    """Write the sweep's budget scope (every element, complete ones included: the cap is
    cumulative) and refuse a resubmission whose elements would exceed it on their first segment."""
    cluster = config.cluster
    scope = write_scope(Path(config.run.root), sweep_id, cluster.budget, run_dirs)
    next_cost = n_todo * estimate(stage, cluster)["cost"]
    reason = scope_refusal(read_scope(scope), next_cost, cluster.currency) if n_todo else None
    if reason:
        fail(f"{reason}; nothing was submitted")
    return scope


def _record(stage, config, run_dir, job_id, cost, *, dependency=None, sweep=None) -> dict:
    return {
        "stage": stage,
        "job_id": str(job_id),
        "run_dir": str(run_dir),
        "wandb_id": wandb_id(run_dir, stage),
        "cluster": config.cluster.name,
        "gpus": billed_gpus(stage, config.cluster),
        "billing_granularity_s": config.cluster.billing_granularity_s,
        "time_min": config.cluster.time_min,
        "gpu_hour_rate": config.cluster.gpu_hour_rate,
        "currency": config.cluster.currency,
        "estimate": cost,
        "code_hash": code_hash(),
        "packages": package_versions(),
        "dependency": dependency,
        "sweep": sweep,
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "log_folder": str(run_dir / "slurm") if sweep is None else None,
    }


# ------------------------------------------------------------------ compute node
class StageJob(submitit.helpers.Checkpointable):
    """The pickled callable of a stage's Slurm job. Holds only the config, never tensors, so a
    requeue needs no new pickle: ``remax.preemption`` requeues with ``scontrol`` (retried)."""

    def __init__(self, stage: str, config) -> None:
        self.stage, self.config = stage, config
        # What the job must run with: checked on every (re)start against the running tree.
        self.code_hash, self.packages = code_hash(), package_versions()

    def __call__(self):
        # submitit's own USR2 handler (one unretried requeue) replaced ours after the unpickling.
        preemption.note_early_signals()
        from jobs._stage import run_stage

        reason = check_running_code(self.code_hash, self.packages)
        if reason:
            raise RuntimeError(reason)
        print(f"remax: running code {self.code_hash} from {REPO}", file=sys.stderr, flush=True)
        segment = estimate(self.stage, self.config.cluster)["cost"]
        run_dir = run_dir_for(self.config, self.stage)
        check_segment(run_dir, self.config.cluster, segment, job_id=current_job_id())
        # run_stage replaces submitit's USR2 handler (checkpoint + one unretried requeue) and its
        # SIGTERM bypass: both signals take the one stop path of remax.preemption, and a stopped
        # segment ends in jobs._stage.SegmentEnd (requeued: the process exits there).
        return run_stage(self.stage, self.config)


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
    for key, value in params["additional_parameters"].items():
        if key not in ("requeue", "kill_on_invalid_dep"):
            lines.append(f"#SBATCH --{key.replace('_', '-')}={value}")
    command = " ".join(["python", "-u", "-m", f"jobs.{stage}", "cluster.backend=local", *overrides])
    values = {
        "SBATCH_DIRECTIVES": "\n".join(lines),
        "SETUP": "\n".join(config.cluster.setup),
        "STAGE": stage,
        "COMMAND": command,
        "CPUS_PER_TASK": str(params["cpus_per_task"]),
        # The script runs a snapshot of this checkout (jobs/_snapshot.py), like a submitted job.
        "REPO": str(code_snapshot(Path(config.run.root))),
    }
    return string.Template((TEMPLATES / f"{name}.sbatch").read_text()).safe_substitute(values)
