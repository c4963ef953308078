"""Billed, productive and wasted GPU-hours of a run: the segment ledger joined with ``sacct``.

Per segment (``<run_dir>/segments.jsonl``, written by the job, see ``remax.ledger``):

- productive: from the first step to the last published checkpoint (the steps it saved survive);
  a segment that completed the run is productive to its end (final evaluation and export);
- waste ``restart``: start to first step of every segment after the first (loading again);
- waste ``lost steps``: after the last checkpoint of a stopped segment (redone by the next one);
- waste ``<failure class>``: a failed segment, whole;
- waste ``outside the ledger``: what ``sacct`` billed beyond the ledger's segments (job startup
  before Python, teardown, segments killed before they wrote a line).
"""

from __future__ import annotations

from pathlib import Path

from remax import ledger


def _segment(seg: dict, first: bool) -> tuple[float, dict[str, float]]:
    """(productive seconds, {waste reason: seconds}) of one ledger line."""
    start, end = seg.get("start") or 0.0, seg.get("end")
    if end is None:  # killed; its time is counted from sacct
        return 0.0, {}
    waste: dict[str, float] = {}
    if seg.get("failure_class"):
        return 0.0, {seg["failure_class"]: end - start}
    first_step = seg.get("first_step_at") or end
    if not first:
        waste["restart"] = first_step - start
    if seg.get("stop_reason") == "completed":
        return (end - first_step) + (first_step - start if first else 0.0), waste
    saved = seg.get("saved_at") or []
    kept_until = saved[-1] if saved else first_step
    waste["lost steps"] = end - kept_until
    productive = max(0.0, kept_until - first_step) + (first_step - start if first else 0.0)
    return productive, waste


def waste(run_dir: Path, billed_s: float, gpus: int) -> dict:
    """``billed_gpu_h``, ``productive_gpu_h``, ``wasted_gpu_h`` and ``top_waste`` for a run."""
    rows = ledger.read(run_dir)
    productive, reasons = 0.0, {}
    for i, seg in enumerate(rows):
        p, w = _segment(seg, first=i == 0)
        productive += p
        for k, v in w.items():
            reasons[k] = reasons.get(k, 0.0) + max(0.0, v)
    covered = productive + sum(reasons.values())
    if billed_s > covered:
        reasons["outside the ledger"] = billed_s - covered
    billed = max(billed_s, covered)
    top = max(reasons, key=reasons.get) if reasons and max(reasons.values()) > 0 else None
    return {
        "billed_gpu_h": round(billed * gpus / 3600, 5),
        "productive_gpu_h": round(productive * gpus / 3600, 5),
        "wasted_gpu_h": round((billed - productive) * gpus / 3600, 5),
        "top_waste": top,
        "waste_by_reason_gpu_h": {k: round(v * gpus / 3600, 5) for k, v in reasons.items()},
    }


def failure_columns(run_dir: Path) -> dict:
    """The last failure's class and reason (``failure.json``), for the status table."""
    import json

    path = Path(run_dir) / "failure.json"
    if not path.exists():
        return {"failure_class": None, "failure_reason": None}
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"failure_class": "unknown", "failure_reason": "failure.json unreadable"}
    return {"failure_class": info.get("class"), "failure_reason": info.get("reason")}
