"""``python -m jobs.cancel <run dir | sweep dir | pipeline file> [--graceful] [--json]``.

Cancels the live job of a run dir, of every element of a sweep (``<run.root>/sweeps/<sweep id>``)
or of every stage of a pipeline (``<run.root>/pipelines/<id>.json``, written at submission).
``--graceful``: a running job writes a checkpoint at its next step boundary and then stops for good
(CANCELLED, not requeued); ``jobs.resume <run dir>`` continues it later. Pending jobs are simply
cancelled: they have nothing to save.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from jobs._lease import QueueError, live_state, request_stop


def _records(run_dir: Path) -> dict | None:
    path = run_dir / "submission.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_dirs_of(target: Path) -> list[Path]:
    """The run dirs a target names; exits 2 when it names none."""
    if target.is_file() and target.suffix == ".json":  # a pipeline's record
        return [Path(r["run_dir"]) for r in json.loads(target.read_text())["jobs"]]
    if (target / "submission.json").exists():
        return [target]
    if target.parent.name == "sweeps":  # <root>/sweeps/<sweep id>
        root = target.parent.parent
        found = []
        for path in sorted(root.glob("*/*/submission.json")):
            if json.loads(path.read_text()).get("sweep") == target.name:
                found.append(path.parent)
        if found:
            return found
    print(
        f"error: {target} is neither a run dir with a submission.json, a sweep dir "
        "(<run.root>/sweeps/<id>) nor a pipeline file (<run.root>/pipelines/<id>.json)",
        file=sys.stderr,
    )
    sys.exit(2)


def cancel(run_dir: Path, graceful: bool) -> dict:
    record = _records(run_dir) or {}
    job = record.get("job_id")
    row = {"run_dir": str(run_dir), "job_id": job, "state": None, "action": "none"}
    if not job:
        return row
    try:
        row["state"] = live_state(job)
    except QueueError as exc:
        row["action"] = f"error: {exc}"
        return row
    if row["state"] is None:
        return row
    if graceful and row["state"] == "RUNNING":
        request_stop(run_dir)  # before the signal: the job reads it right after its checkpoint
        subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=60)
        row["action"] = "checkpoint, then stop"
    else:
        subprocess.run(["scancel", job], check=True, timeout=60)
        row["action"] = "cancelled"
    return row


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.cancel", description=__doc__.split("\n")[0]
    )
    parser.add_argument("target", type=Path, help="run dir, sweep dir or pipeline file")
    parser.add_argument("--graceful", action="store_true", help="checkpoint first, never requeue")
    parser.add_argument("--json", action="store_true", help="one JSON document for scripts")
    args = parser.parse_args(argv)
    rows = [cancel(d, args.graceful) for d in run_dirs_of(args.target)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            state = r["state"] or "not live"
            print(f"{r['action']:<22} job {r['job_id'] or '-':<10} {state:<10} {r['run_dir']}")
    return 1 if any(r["action"].startswith("error") for r in rows) else 0


def cli() -> None:
    """Console-script entry point (``remax-cancel``)."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
