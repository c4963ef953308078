"""`python -m jobs.report <run dir | stage dir | run.root> ... [--out DIR] [--name report]`.

Training curves (reward with its greedy baseline, KL, response length, losses, RM accuracy) of
every run found, one line per run, as ``<name>.png``, and a markdown table of final values and
``summary.json`` evaluations as ``<name>.md``. Offline: reads ``metrics.jsonl`` only, never W&B.
"""

from __future__ import annotations

import argparse
import json
import sys

from remax.report import write_report


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.report", description=__doc__.split("\n")[2]
    )
    parser.add_argument("paths", nargs="+", help="run dirs, stage dirs or run.root dirs")
    parser.add_argument("--out", help="output directory (default: the first path)")
    parser.add_argument("--name", default="report", help="file stem: <name>.png, <name>.md")
    args = parser.parse_args(argv)
    try:
        result = write_report(args.paths, args.out or args.paths[0], args.name)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))
    return result


def cli() -> None:
    """Console-script entry point (``remax-report``)."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
