"""Human-readable output by default, one JSON document with ``--json`` (for scripts and tests)."""

from __future__ import annotations

import json
import sys

_state = {"json": "--json" in sys.argv}


def use_json(flag: bool) -> None:
    _state["json"] = flag


def wants_json() -> bool:
    return _state["json"]


def emit(data: dict) -> None:
    """Print a submission or summary: JSON on one line with ``--json``, else readable lines."""
    if _state["json"]:
        print(json.dumps(data))
        return
    print(human(data))


def _estimate(e: dict | None) -> str:
    if not e:
        return ""
    return f"≤ {e['gpu_hours']} GPU-h, ≤ {e['cost']} {e['currency']}"


def human(d: dict) -> str:
    if d.get("dry_run"):
        n = d.get("elements", 1)
        return (
            f"dry run: {d['stage']} × {n} would cost {_estimate(d['estimate'])}; nothing submitted"
        )
    if d.get("complete"):
        return f"{d['stage']} already complete: {d['run_dir']} (nothing submitted)"
    if "sweep" in d and "elements" in d:
        lines = [
            f"sweep {d['sweep']}: array job {d['array_job_id'] or '-'}, {d['elements']} element(s) "
            f"submitted, {len(d['already_live'])} live, {d['already_complete']} complete",
            f"  estimate {_estimate(d['estimate'])}",
        ]
        lines += [
            f"  live: {x['run_dir']} (job {x['job_id']}, {x['state']})" for x in d["already_live"]
        ]
        lines.append(
            f"  status: python -m jobs.status {d['run_dirs'][0].rsplit('/', 2)[0]} --sweep {d['sweep']}"
        )
        return "\n".join(lines)
    return "\n".join(
        [
            f"submitted {d['stage']} job {d['job_id']}"
            + (f" (after {d['dependency']})" if d.get("dependency") else ""),
            f"  run dir   {d['run_dir']}",
            f"  W&B id    {d['wandb_id']}",
            f"  estimate  {_estimate(d['estimate'])}",
            f"  logs      python -m jobs.logs {d['run_dir']}",
        ]
    )
