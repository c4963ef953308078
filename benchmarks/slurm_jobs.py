"""Slurm job-suite benchmark on a real Slurm (``scripts/local_slurm.sh up``).

Prints side by side: the time to submit a 100-element sweep (``python -m jobs.remax -m ...``, one
array, the command returns without waiting), and the optimizer steps redone after an interruption
— USR2 (checkpoint at the next step boundary, then requeue; goal 0) versus ``scontrol requeue``
with no warning (resumes from the last periodic checkpoint).

    python -m benchmarks.slurm_jobs [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
    "train.max_steps=400",
    "train.log_every=1",
    "checkpoint.every_steps=25",
    "data.num_train=1024",
    "data.num_eval=64",
    "eval_prompts=64",
    "log.progress=false",
    "log.wandb_mode=disabled",
]


def _run(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, check=True
    )
    return out.stdout


def _wait(job: str) -> None:
    while subprocess.run(
        ["squeue", "-h", "-j", job], capture_output=True, text=True
    ).stdout.strip():
        time.sleep(1)


def submit_sweep(root: Path, n: int) -> dict:
    lrs = ",".join(f"{1e-4 * (1 + i / n):.8g}" for i in range(n))
    t0 = time.perf_counter()
    out = _run("-m", "jobs.remax", "-m", "--json", f"run.root={root}", *JOB, f"optim.lr={lrs}")
    seconds = time.perf_counter() - t0
    info = json.loads(out.strip().splitlines()[-1])
    subprocess.run(["scancel", info["array_job_id"]], check=True)
    return {
        "elements": info["elements"],
        "array_job_id": info["array_job_id"],
        "submit_s": round(seconds, 2),
    }


def resubmit_sweep(root: Path, n: int) -> dict:
    """The same sweep again after its array was cancelled: every element is resubmitted (none
    is live or complete); the time shows the cost of the ownership checks (one squeue each)."""
    lrs = ",".join(f"{1e-4 * (1 + i / n):.8g}" for i in range(n))
    t0 = time.perf_counter()
    out = _run("-m", "jobs.remax", "-m", "--json", f"run.root={root}", *JOB, f"optim.lr={lrs}")
    seconds = time.perf_counter() - t0
    info = json.loads(out.strip().splitlines()[-1])
    if info["array_job_id"]:
        subprocess.run(["scancel", info["array_job_id"]], check=True)
    return {"elements": info["elements"], "submit_s": round(seconds, 2)}


def steps_redone(root: Path, how: str) -> dict:
    rec = json.loads(
        _run("-m", "jobs.remax", "--json", f"run.root={root}", *JOB).strip().splitlines()[-1]
    )
    run_dir = Path(rec["run_dir"])
    while not (run_dir / "checkpoints" / "step_50").exists():
        time.sleep(0.1)
    time.sleep(0.5)  # land between periodic checkpoints
    if how == "usr2":
        subprocess.run(["scancel", "--signal=USR2", rec["job_id"]], check=True)
    else:
        subprocess.run(["scontrol", "requeue", rec["job_id"]], check=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "summary.json").exists() and time.monotonic() < deadline:
        time.sleep(1)
    _wait(rec["job_id"])
    log = "".join(p.read_text() for p in sorted((run_dir / "slurm").glob("*_log.err")))
    m = re.search(r"resuming at step (\d+): (\d+) logged step\(s\) after it are redone", log)
    resumed = re.search(r"resumed remax from \S+ \(step (\d+)\)", log)
    return {
        "interrupt": how,
        "resumed_at_step": int(resumed.group(1)) if resumed else None,
        "steps_redone": int(m.group(2)) if m else 0,
        "finished": (run_dir / "summary.json").exists(),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--elements", type=int, default=100)
    parser.add_argument(
        "--sweep-only", action="store_true", help="time the sweep submission, skip interruptions"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sweep = submit_sweep(root / "sweep", args.elements)
        resubmit = resubmit_sweep(root / "sweep", args.elements)
        if args.sweep_only:
            print(json.dumps({"sweep": sweep, "resubmit": resubmit}, indent=2))
            return
        usr2 = steps_redone(root / "usr2", "usr2")
        requeue = steps_redone(root / "requeue", "scontrol_requeue")
    result = {"sweep": sweep, "resubmit": resubmit, "interruptions": [usr2, requeue]}
    print(json.dumps(result, indent=2))
    print()
    print(f"| submit a {sweep['elements']}-element sweep (one array) | {sweep['submit_s']} s |")
    print("| interruption | resumed at step | steps redone |")
    print("|---|---|---|")
    for r in (usr2, requeue):
        print(f"| {r['interrupt']} | {r['resumed_at_step']} | {r['steps_redone']} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "slurm_jobs.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
