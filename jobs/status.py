"""``python -m jobs.status [run.root] [--watch] [--json]``: every run at a glance.

One row per run dir: stage, job id, Slurm state, step/total, restarts, latest reward, billed
GPU-hours summed over every requeue segment (``sacct -D``: without it only the last segment shows),
and cost. One ``sacct`` call for all jobs, so polling stays cheap for the controller.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml


def _sacct(job_ids: list[str]) -> dict[str, list[dict]]:
    """``{job_id: [segment, ...]}`` for the given ids (array elements as ``<array>_<task>``)."""
    if not job_ids:
        return {}
    cmd = ["sacct", "-j", ",".join(job_ids), "-D", "-X", "-n", "--parsable2", "-S", "2000-01-01"]
    cmd += ["-o", "JobID,State,ElapsedRaw"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return {}
    segments: dict[str, list[dict]] = {}
    for line in out.stdout.splitlines():
        parts = line.split("|")
        if len(parts) != 3:
            continue
        job, state, elapsed = parts
        segments.setdefault(job, []).append(
            {"state": state.split()[0], "elapsed_s": int(elapsed or 0)}
        )
    return segments


def _last_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return {}


def collect(root: Path) -> list[dict]:
    rows = []
    run_dirs = sorted(p.parent for p in Path(root).glob("*/*/config.yaml"))
    records = {}
    for d in run_dirs:
        history = d / "submissions.jsonl"
        if history.exists():
            records[d] = [
                json.loads(line) for line in history.read_text().splitlines() if line.strip()
            ]
    all_ids = sorted({r["job_id"] for recs in records.values() for r in recs})
    segments = _sacct(all_ids)
    for d in run_dirs:
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        last = _last_metrics(d)
        recs = records.get(d, [])
        done = (d / "summary.json").exists()
        segs = [s for r in recs for s in segments.get(r["job_id"], [])]
        gpus = recs[-1]["gpus"] if recs else 0
        rate = recs[-1]["gpu_hour_rate"] if recs else 0.0
        gpu_hours = sum(s["elapsed_s"] for s in segs) * gpus / 3600
        state = segments.get(recs[-1]["job_id"], [{}])[-1].get("state", "UNKNOWN") if recs else None
        rows.append(
            {
                "run": d.name,
                "stage": d.parent.name,
                "run_dir": str(d),
                "job_id": recs[-1]["job_id"] if recs else None,
                "state": state or ("DONE" if done else "LOCAL"),
                "step": int(last.get("step", 0)),
                "total": cfg.get("train", {}).get("max_steps"),
                "restarts": sum(max(0, len(segments.get(r["job_id"], [])) - 1) for r in recs),
                "submissions": len(recs),
                "reward": last.get("reward/mean"),
                "gpu_hours": round(gpu_hours, 4),
                "cost": round(
                    gpu_hours * rate, 4
                ),  # JSON keeps small costs; the table shows 2 decimals
                "currency": recs[-1]["currency"] if recs else "",
                "complete": done,
            }
        )
    return rows


def render(rows: list[dict]):
    from rich.table import Table

    table = Table(title=f"remax runs ({len(rows)})")
    for col in ("run", "stage", "job", "state", "step", "restarts", "reward", "GPU-h", "cost"):
        table.add_column(
            col,
            justify="right" if col in ("step", "restarts", "reward", "GPU-h", "cost") else "left",
        )
    for r in rows:
        reward = "" if r["reward"] is None else f"{r['reward']:.3f}"
        table.add_row(
            r["run"],
            r["stage"],
            r["job_id"] or "-",
            r["state"],
            f"{r['step']}/{r['total']}",
            str(r["restarts"]),
            reward,
            f"{r['gpu_hours']:.2f}",
            f"{r['cost']:.2f} {r['currency']}".strip(),
        )
    return table


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.status", description=__doc__.splitlines()[0]
    )
    parser.add_argument("root", nargs="?", default="runs", help="run.root to scan (default: runs)")
    parser.add_argument("--json", action="store_true", help="print rows as JSON for scripts")
    parser.add_argument(
        "--watch", type=float, nargs="?", const=30.0, help="refresh every N s (default 30)"
    )
    args = parser.parse_args(argv)
    if not Path(args.root).is_dir():
        print(
            f"error: run root {args.root!r} does not exist: pass the run.root of your runs",
            file=sys.stderr,
        )
        return 2
    if args.json:
        print(json.dumps(collect(Path(args.root)), indent=2))
        return 0
    from rich.console import Console
    from rich.live import Live

    if not args.watch:
        Console().print(render(collect(Path(args.root))))
        return 0
    with Live(render(collect(Path(args.root))), refresh_per_second=1) as live:
        while True:
            time.sleep(args.watch)
            live.update(render(collect(Path(args.root))))


def cli() -> None:
    """Console-script entry point (``remax-status``)."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
