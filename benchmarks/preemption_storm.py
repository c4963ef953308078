"""A ReMax job hit N times at random on a real Slurm (``scripts/local_slurm.sh up``).

Interruption kinds, drawn at random each time the job has made some progress:

- ``usr2``: ``scancel --signal=USR2`` (the warning before a time limit or a preemption);
- ``requeue``: ``scontrol requeue`` (SIGTERM, then the kill after KillWait: no warning);
- ``time_limit``: ``scontrol update TimeLimit=`` to a minute after now: Slurm's own USR2 at
  ``signal_delay_s`` before the new limit, then the limit itself;
- ``preempt``: a whole-node job on the ``high`` partition preempts the storm's ``low`` job
  (PreemptMode=REQUEUE, GraceTime=20).

The first interruptions draw every kind once (in a random order), the rest at random. With
``--nodes 2 --tasks-per-node 2`` the job is four ranks on the two-node local Slurm
(``LOCAL_SLURM_NODES=2 scripts/local_slurm.sh up``).

Reports whether the final export is identical to an uninterrupted run's, the steps redone per
interruption kind (last logged step before the interruption minus the step the next segment
resumed from) and billed vs productive GPU-seconds (``sacct`` joined with ``segments.jsonl``).

    python -m benchmarks.preemption_storm [--n 4] [--seed 0] [--nodes 2 --tasks-per-node 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
JOB = [
    "cluster=local_slurm",
    "train.batch_size=8",
    "train.micro_batch_size=8",
    "train.max_steps=60",
    "train.log_every=1",
    "checkpoint.every_steps=10",
    "data.num_train=1024",
    "data.num_eval=64",
    "eval_prompts=64",
    "log.progress=false",
    "log.wandb_mode=disabled",
]
KINDS = ("usr2", "requeue", "time_limit", "preempt")


def _shape(nodes: int, tasks: int) -> list[str]:
    """The job's ranks: ``nodes`` × ``tasks`` (one fake GPU each), on the preemptible partition."""
    return [
        f"cluster.nodes={nodes}",
        f"cluster.tasks_per_node={tasks}",
        f"cluster.gpus_per_node={tasks}",
        "cluster.partition=low",
    ]


def _submit(root: Path, shape: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "jobs.remax", "--json", f"run.root={root}", *JOB, *shape],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _squeue(job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip()


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError):
            continue
    return 0


def _interrupt(kind: str, job: str, nodes: int) -> None:
    if kind == "usr2":
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
    elif kind == "requeue":
        subprocess.run(["scontrol", "requeue", job], check=True)
    elif kind == "preempt":  # whole nodes on the high partition: the low job must give way
        cmd = ["sbatch", "-p", "high", f"-N{nodes}", "--exclusive", "-o", "/dev/null"]
        subprocess.run([*cmd, "--wrap", "sleep 2"], check=True, capture_output=True)
    else:  # a limit one minute past the elapsed time: Slurm's own warning and kill
        out = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%M"], capture_output=True, text=True
        )
        parts = [int(p) for p in out.stdout.strip().replace("-", ":").split(":")]
        minutes = (parts[-2] if len(parts) > 1 else 0) + 60 * (parts[-3] if len(parts) > 2 else 0)
        limit = minutes + 2  # >= 1 min of notice after the 30 s tick
        subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={limit}"], check=True)


def _storm(rec: dict, n: int, rng: random.Random, nodes: int) -> list[dict]:
    run_dir, job = Path(rec["run_dir"]), rec["job_id"]
    hits = []
    kinds = rng.sample(KINDS, len(KINDS)) + [rng.choice(KINDS) for _ in range(n - len(KINDS))]
    for kind in kinds[:n]:
        target = _last_step(run_dir) + rng.randint(3, 15)
        while _last_step(run_dir) < target or _squeue(job) != "RUNNING":
            if (run_dir / "summary.json").exists():
                return hits
            time.sleep(0.2)
        hits.append({"kind": kind, "at_step": _last_step(run_dir), "time": time.time()})
        _interrupt(kind, job, nodes)
        while _squeue(job) == "RUNNING":  # wait for this segment to end before the next draw
            time.sleep(0.5)
        if kind == "time_limit":  # the next segment gets the preset's limit again
            subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=20"], check=False)
    return hits


def _sacct_elapsed(job: str) -> float:
    out = subprocess.run(
        ["sacct", "-j", job, "-D", "-X", "-n", "--parsable2", "-o", "ElapsedRaw"],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(sum(int(x) for x in out.stdout.split() if x.strip()))


def _redone(hits: list[dict], run_dir: Path) -> dict[str, list[int]]:
    """Per kind, steps redone: the step logged at the hit minus the next segment's resume step."""
    segments = [
        json.loads(line) for line in (run_dir / "segments.jsonl").read_text().splitlines() if line
    ]
    out: dict[str, list[int]] = {k: [] for k in KINDS}
    for hit in hits:
        later = [s for s in segments if (s.get("start") or 0) > hit["time"]]
        if later:
            resumed = later[0].get("resume_step") or 0
            out[hit["kind"]].append(max(0, hit["at_step"] - resumed))
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.preemption_storm")
    parser.add_argument("--n", type=int, default=4, help="interruptions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--tasks-per-node", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    shape = _shape(args.nodes, args.tasks_per_node)
    sys.path.insert(0, str(REPO))
    from safetensors.torch import load_file

    from jobs._waste import waste

    root = Path(tempfile.mkdtemp(prefix="preemption_storm_"))
    ref, rec = _submit(root / "ref", shape), _submit(root / "storm", shape)
    hits = _storm(rec, args.n, random.Random(args.seed), args.nodes)
    for job in (rec["job_id"], ref["job_id"]):
        while _squeue(job):
            time.sleep(1)
    a = load_file(Path(ref["run_dir"]) / "export" / "model.safetensors")
    b = load_file(Path(rec["run_dir"]) / "export" / "model.safetensors")
    identical = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    billed = _sacct_elapsed(rec["job_id"])
    gpus = args.nodes * args.tasks_per_node
    health = waste(Path(rec["run_dir"]), billed, gpus=gpus)
    result = {
        "interruptions": hits,
        "export_identical": identical,
        "steps_redone": _redone(hits, Path(rec["run_dir"])),
        "billed_gpu_s": round(health["billed_gpu_h"] * 3600, 1),
        "productive_gpu_s": round(health["productive_gpu_h"] * 3600, 1),
        "waste_by_reason_gpu_s": {
            k: round(v * 3600, 1) for k, v in health["waste_by_reason_gpu_h"].items()
        },
        "uninterrupted_billed_gpu_s": _sacct_elapsed(ref["job_id"]) * gpus,
        "steps": 60,
        "ranks": {"nodes": args.nodes, "tasks_per_node": args.tasks_per_node},
    }
    print(json.dumps(result, indent=2))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = "preemption_storm" + (f"_{args.nodes}x{args.tasks_per_node}" if gpus > 1 else "")
    (Path(args.out) / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
