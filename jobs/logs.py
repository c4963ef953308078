"""``python -m jobs.logs <run dir> [-f] [--rank N] [--all]``: a run's Slurm logs, without hunting.

Prints the stdout and stderr files of the run's latest job (submitit writes one pair per task:
``<job>_<rank>_log.out/.err``; requeues append to the same files). ``-f`` follows them as they
grow, ``--rank`` picks a task (default 0), ``--all`` also prints earlier jobs of the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _history(run_dir: Path) -> list[dict]:
    path = run_dir / "submissions.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def log_files(run_dir: Path, rank: int, every_job: bool = False) -> list[Path]:
    """The log files of the run's jobs (latest job only unless ``every_job``), stdout first."""
    records = [r for r in _history(run_dir) if r.get("job_id")]
    if not every_job:
        records = records[-1:]
    files = []
    for r in records:
        if r.get("sweep"):
            folder = run_dir.parent.parent / "sweeps" / r["sweep"]
        else:
            folder = Path(r.get("log_folder") or run_dir / "slurm")
        files += [folder / f"{r['job_id']}_{rank}_log.{kind}" for kind in ("out", "err")]
    return files


def follow(files: list[Path], poll_s: float = 1.0) -> None:
    offsets = {f: 0 for f in files}
    while True:
        for f in files:
            if f.exists() and f.stat().st_size > offsets[f]:
                with open(f, errors="replace") as fh:
                    fh.seek(offsets[f])
                    sys.stdout.write(fh.read())
                    offsets[f] = fh.tell()
                sys.stdout.flush()
        time.sleep(poll_s)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.logs", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing as they grow")
    parser.add_argument("--rank", type=int, default=0, help="task (rank) whose logs to show")
    parser.add_argument("--all", action="store_true", help="also earlier jobs of this run")
    args = parser.parse_args(argv)
    files = log_files(args.run_dir, args.rank, args.all)
    if not files:
        print(
            f"error: {args.run_dir} has no submission record (submissions.jsonl): pass a run dir "
            "that was submitted to Slurm",
            file=sys.stderr,
        )
        return 2
    if not args.follow:
        missing = [f for f in files if not f.exists()]
        for f in files:
            if f.exists():
                print(f"==> {f} <==")
                print(f.read_text(errors="replace"), end="")
        if len(missing) == len(files):
            print(
                f"no log files yet (job pending?): {', '.join(map(str, missing))}", file=sys.stderr
            )
        return 0
    try:
        follow(files)
    except KeyboardInterrupt:
        return 0
    return 0


def cli() -> None:
    """Console-script entry point (``remax-logs``)."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
