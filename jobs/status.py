"""``python -m jobs.status [run.root] [--stage S] [--state S] [--sweep ID] [--metric KEY] [--json]``.

One row per run dir: stage, job id, Slurm state (PENDING for array elements that have not started,
a ``stalled`` flag for a running job whose metrics stopped moving for longer than its own pace
explains), step/total, restarts, latest
reward, billed GPU-hours and cost, and why a failed job failed. GPU-hours come from ``sacct``:
every requeue segment (``-D``), the GPUs Slurm allocated to it (``AllocTRES``), rounded up to the
billing granularity. When ``sacct`` fails the costs show as unknown, when ``squeue`` fails the
states of jobs not yet in accounting do; either way the command says so in one line and exits 1.
Then, per sweep, its totals and the best element by ``--metric`` (default ``reward/mean``; a
leading ``-`` picks the smallest). One ``sacct`` and one ``squeue`` call for all jobs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from jobs._costs import SacctError, history, run_cost, sacct_segments

STALL_S = 900
"""A RUNNING job whose metrics.jsonl has not grown for this long (at least) is flagged stalled."""
STALL_ROWS = 3
"""... or for this many of its own intervals between two metrics rows, when that is longer (a 7B
step of 10 minutes logged every step is not stalled after 15)."""


class SqueueError(RuntimeError):
    """``squeue`` did not answer: queue states are unknown."""


def _queue_states(job_ids: list[str]) -> dict[str, str]:
    """``{job_id: state}`` from one ``squeue -r`` (array elements one per line, pending too).

    Raises :class:`SqueueError` when squeue fails; jobs that left the queue are no failure."""
    bases = sorted({j.split("_")[0] for j in job_ids})
    if not bases:
        return {}
    try:
        out = subprocess.run(
            ["squeue", "-h", "-r", "-j", ",".join(bases), "-o", "%i|%T"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SqueueError(f"squeue failed ({exc})") from None
    # Every listed job already purged from the controller: squeue says so and exits 1.
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        raise SqueueError(f"squeue failed (rc {out.returncode}: {out.stderr.strip()[:200]})")
    return dict(line.split("|", 1) for line in out.stdout.splitlines() if "|" in line)


def _recent_metrics(run_dir: Path, n: int = 8) -> list[dict]:
    """The last ``n`` readable rows of metrics.jsonl, oldest first (a torn last row is skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in reversed(path.read_text().splitlines()):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
        if len(rows) == n:
            break
    return rows[::-1]


def stall_after_s(rows: list[dict]) -> float:
    """Seconds without a new metrics row after which a RUNNING job counts as stalled: STALL_S,
    or STALL_ROWS of the run's own row intervals (median ``time/step_s`` × the steps between its
    last two rows, i.e. ``train.log_every``) when that is longer."""
    times = sorted(r["time/step_s"] for r in rows if isinstance(r.get("time/step_s"), int | float))
    if not times:
        return STALL_S
    step_s = times[len(times) // 2]
    steps = [r.get("step", 0) for r in rows]
    per_row = max(1, steps[-1] - steps[-2]) if len(steps) >= 2 else 1
    return max(STALL_S, STALL_ROWS * step_s * per_row)


def _failure_reason(run_dir: Path, record: dict) -> str | None:
    """The last error line of the job's rank-0 stderr log."""
    from jobs.logs import log_files

    err = [f for f in log_files(run_dir, 0) if f.suffix == ".err" and f.exists()]
    if not err:
        return None
    lines = err[0].read_text(errors="replace").splitlines()
    for line in reversed(lines):
        if "Error" in line or "error:" in line:
            return line.strip()[:200]
    return lines[-1].strip()[:200] if lines else None


def _row(run_dir: Path, recs: list[dict], segments: dict, queue: dict, cost_known: bool) -> dict:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    recent = _recent_metrics(run_dir)
    last = recent[-1] if recent else {}
    done = (run_dir / "summary.json").exists()
    job = recs[-1]["job_id"] if recs else None
    segs = segments.get(job, []) if job else []
    if job and job in queue:
        state = queue[job]  # still queued: squeue knows best (PENDING elements have no sacct row)
    elif segs:
        state = segs[-1]["state"]
    else:
        state = "DONE" if done else ("LOCAL" if not recs else "UNKNOWN")
    gpu_hours, cost = run_cost(recs, segments)
    metrics = run_dir / "metrics.jsonl"
    stalled = (
        state == "RUNNING"
        and metrics.exists()
        and time.time() - metrics.stat().st_mtime > stall_after_s(recent)
    )
    failed = state in ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL")
    return {
        "run": run_dir.name,
        "stage": run_dir.parent.name,
        "run_dir": str(run_dir),
        "job_id": job,
        "sweep": recs[-1].get("sweep") if recs else None,
        "state": state,
        "stalled": stalled,
        "reason": _failure_reason(run_dir, recs[-1]) if failed else None,
        "step": int(last.get("step", 0)),
        "total": (cfg.get("train") or {}).get("max_steps"),
        "restarts": sum(max(0, len(segments.get(r["job_id"], [])) - 1) for r in recs),
        "submissions": len(recs),
        "reward": last.get("reward/mean"),
        "metrics": last,
        "gpu_hours": round(gpu_hours, 4) if cost_known else None,
        "cost": round(cost, 4) if cost_known else None,
        "currency": recs[-1].get("currency", "") if recs else "",
        "complete": done,
        **run_health(run_dir, _billed_s(recs, segments), recs[-1].get("gpus", 0) if recs else 0),
    }


def collect(root: Path) -> tuple[list[dict], str | None]:
    """(rows, None or what Slurm did not answer: one line per failed command)."""
    run_dirs = sorted(p.parent for p in Path(root).glob("*/*/config.yaml"))
    records = {d: [r for r in history(d) if r.get("job_id")] for d in run_dirs}
    all_ids = sorted({r["job_id"] for recs in records.values() for r in recs})
    errors, cost_known = [], True
    try:
        segments = sacct_segments(all_ids)
    except SacctError as exc:
        segments, cost_known = {}, False
        errors.append(f"{exc}: GPU-hours and costs are unknown (shown as ?)")
    try:
        queue = _queue_states(all_ids)
    except SqueueError as exc:
        queue = {}
        errors.append(f"{exc}: queued jobs not yet in accounting show as UNKNOWN")
    rows = [_row(d, records[d], segments, queue, cost_known) for d in run_dirs]
    return rows, "\n".join(errors) or None


def select(rows: list[dict], stage=None, states=None, sweep=None) -> list[dict]:
    wanted = {s.upper() for s in states.split(",")} if states else None
    return [
        r
        for r in rows
        if (stage is None or r["stage"] == stage)
        and (wanted is None or r["state"] in wanted or ("STALLED" in wanted and r["stalled"]))
        and (sweep is None or r["sweep"] == sweep)
    ]


def sweeps(rows: list[dict], metric: str) -> list[dict]:
    """Per sweep: element count by state, summed GPU-hours and cost, and the best element."""
    key, sign = metric.lstrip("-"), (-1 if metric.startswith("-") else 1)
    out = []
    for sweep in sorted({r["sweep"] for r in rows if r["sweep"]}):
        members = [r for r in rows if r["sweep"] == sweep]
        scored = [r for r in members if isinstance(r["metrics"].get(key), int | float)]
        best = max(scored, key=lambda r: sign * r["metrics"][key]) if scored else None
        known = all(r["cost"] is not None for r in members)
        states: dict[str, int] = {}
        for r in members:
            states[r["state"]] = states.get(r["state"], 0) + 1
        out.append(
            {
                "sweep": sweep,
                "elements": len(members),
                "states": states,
                "gpu_hours": round(sum(r["gpu_hours"] for r in members), 4) if known else None,
                "cost": round(sum(r["cost"] for r in members), 4) if known else None,
                "metric": key,
                "best": None
                if best is None
                else {"run_dir": best["run_dir"], "value": best["metrics"][key]},
            }
        )
    return out


def _billed_s(recs: list[dict], segments: dict) -> float:
    """Elapsed seconds of every segment of every submission of one run dir."""
    return sum(s["elapsed_s"] for r in recs for s in segments.get(r["job_id"], []))


def run_health(run_dir: Path, billed_s: float, gpus: int) -> dict:
    """Failure class and reason, billed / productive / wasted GPU-hours and the top waste reason."""
    from jobs._waste import failure_columns, waste

    return {**failure_columns(run_dir), **waste(run_dir, billed_s, gpus)}


def _money(r: dict) -> str:
    return "?" if r["cost"] is None else f"{r['cost']:.2f}"


def render(rows: list[dict], sweep_rows: list[dict]):
    """A rich table that folds (never cuts) long names, so 80 columns stay readable."""
    from rich.table import Table

    table = Table(title=f"remax runs ({len(rows)})", expand=False, pad_edge=False)
    for col in ("run", "stage", "job", "state", "step", "rq", "reward", "GPU-h", "cost", "wasted"):
        right = col in ("step", "rq", "reward", "GPU-h", "cost", "wasted")
        table.add_column(col, justify="right" if right else "left", overflow="fold")
    table.add_column("failure", overflow="fold")
    for r in rows:
        state = r["state"] + (" stalled" if r["stalled"] else "")
        if r["reason"]:
            state += f"\n{r['reason']}"
        table.add_row(
            r["run"],
            r["stage"],
            r["job_id"] or "-",
            state,
            f"{r['step']}/{r['total']}",
            str(r["restarts"]),
            "" if r["reward"] is None else f"{r['reward']:.3f}",
            "?" if r["gpu_hours"] is None else f"{r['gpu_hours']:.2f}",
            _money(r),
            *_health_cells(r),
        )
    lines = [table]
    for s in sweep_rows:
        states = ", ".join(f"{n} {k}" for k, n in sorted(s["states"].items()))
        best = s["best"]
        text = f"sweep {s['sweep']}: {s['elements']} elements ({states}), GPU-h "
        text += "?" if s["gpu_hours"] is None else f"{s['gpu_hours']:.2f}"
        text += ", cost " + ("?" if s["cost"] is None else f"{s['cost']:.2f}")
        if best:
            text += f"\n  best {s['metric']} = {best['value']:.4g}: {best['run_dir']}"
        lines.append(text)
    return lines


def _health_cells(r: dict) -> list[str]:
    wasted = f"{r['wasted_gpu_h']:.2f}" + (f" ({r['top_waste']})" if r["top_waste"] else "")
    failure = f"{r['failure_class']}: {r['failure_reason']}" if r["failure_class"] else ""
    return [wasted, failure[:60]]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.status", description=__doc__.split("\n")[0]
    )
    parser.add_argument("root", nargs="?", default="runs", help="run.root to scan (default: runs)")
    parser.add_argument("--json", action="store_true", help="print rows as JSON for scripts")
    parser.add_argument("--stage", help="only this stage (sft, reward_model, remax, ppo, evaluate)")
    parser.add_argument(
        "--state", help="only these states, comma-separated (RUNNING,PENDING,STALLED)"
    )
    parser.add_argument("--sweep", help="only the elements of this sweep id")
    parser.add_argument(
        "--metric", default="reward/mean", help="rank sweep elements by this metric"
    )
    parser.add_argument("--totals", action="store_true", help="with --json: per-sweep totals")
    parser.add_argument(
        "--watch", type=float, nargs="?", const=30.0, help="refresh every N s (default 30)"
    )
    return parser


def _view(args) -> tuple[list, str | None]:
    rows, error = collect(Path(args.root))
    rows = select(rows, args.stage, args.state, args.sweep)
    return rows, error


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not Path(args.root).is_dir():
        print(
            f"error: run root {args.root!r} does not exist: pass the run.root of your runs",
            file=sys.stderr,
        )
        return 2
    rows, error = _view(args)
    for line in (error or "").splitlines():
        print(f"error: {line}", file=sys.stderr)
    if args.json:  # rows as a list (the contract scripts rely on); --totals: the sweeps instead
        print(json.dumps(sweeps(rows, args.metric) if args.totals else rows, indent=2))
        return 1 if error else 0
    from rich.console import Console, Group
    from rich.live import Live

    if not args.watch:
        Console().print(*render(rows, sweeps(rows, args.metric)))
        return 1 if error else 0
    with Live(Group(*render(rows, sweeps(rows, args.metric))), refresh_per_second=1) as live:
        while True:
            time.sleep(args.watch)
            rows, _ = _view(args)
            live.update(Group(*render(rows, sweeps(rows, args.metric))))


def cli() -> None:
    """Console-script entry point (``remax-status``)."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
