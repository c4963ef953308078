"""The waste ledger: one line per job segment in ``<run_dir>/segments.jsonl``.

A segment is one start of a job (the first run, or a restart after a requeue). Its line says when
it started, when its first step finished, which step it resumed from, which checkpoints it
published and how long they took, why it stopped and when it ended. ``jobs.status`` joins these
lines with ``sacct`` to split billed GPU-hours into productive ones (steps that survived into a
checkpoint) and wasted ones, with the reason. A segment killed outright (SIGKILL, node loss) writes
no line; the status counts its billed time as wasted with the reason ``killed``.

Module state, not an argument threaded through every layer: the loop, the checkpoint saver, the
stop guard and the watchdog all note into the one segment of this process.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from remax.fileio import atomic_write_text

FILE = "segments.jsonl"
LIVE = "segment.live.json"
"""The running segment's line so far (rewritten at its start and at a stop signal): when a
segment is killed before it appends its line, the next one tells a kill after a signal (a
preemption, an outside ``scontrol requeue``) from a silent death (a lost node)."""


@dataclass(kw_only=True)
class Segment:
    job: str | None = None
    restart: int = 0
    host: str = ""
    start: float = 0.0
    resume_step: int | None = None
    first_step_at: float | None = None
    """Unix time the first step of this segment finished (startup cost = this - start)."""
    last_step: int | None = None
    checkpoints: list[int] = field(default_factory=list)
    save_s: list[float] = field(default_factory=list)
    saved_at: list[float] = field(default_factory=list)
    """Unix time each checkpoint was published (the steps before it survive this segment)."""
    answered: int = 0
    """Evaluation batches answered and kept (``partial/``): the evaluate stage's progress, as it
    publishes no checkpoints."""
    stop_reason: str | None = None
    failure_class: str | None = None
    end: float | None = None
    run_dir: str | None = None


_CURRENT: Segment | None = None


def begin() -> Segment:
    """Start this process's segment (job id, restart count and host from Slurm's environment)."""
    global _CURRENT
    _CURRENT = Segment(
        job=os.environ.get("SLURM_JOB_ID"),
        restart=int(os.environ.get("SLURM_RESTART_COUNT") or 0),
        host=socket.gethostname(),
        start=time.time(),
    )
    return _CURRENT


def current() -> Segment | None:
    return _CURRENT


def attach(run_dir: Path) -> None:
    """Name the run dir this segment's line goes to (rank 0 only) and write the live file."""
    if _CURRENT is not None:
        _CURRENT.run_dir = str(run_dir)
        _write_live(_CURRENT)


def note_signal(reason: str) -> None:
    """A stop signal arrived (called from the stop guard thread, not the signal handler)."""
    if _CURRENT is not None and _CURRENT.run_dir is not None:
        _CURRENT.stop_reason = f"signal:{reason}"
        _write_live(_CURRENT)


def _write_live(seg: Segment) -> None:
    live = {**asdict(seg), "signal_at": time.time()}
    atomic_write_text(Path(seg.run_dir) / LIVE, json.dumps(live, sort_keys=True))


def read_live(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / LIVE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def append(run_dir: Path, row: dict) -> None:
    with open(Path(run_dir) / FILE, "a") as f:  # one short append: torn at most by a kill
        f.write(json.dumps(row, sort_keys=True) + "\n")


def note_resume(step: int) -> None:
    if _CURRENT is not None:
        _CURRENT.resume_step = step


def note_step(step: int) -> None:
    if _CURRENT is not None:
        if _CURRENT.first_step_at is None:
            _CURRENT.first_step_at = time.time()
        _CURRENT.last_step = step


def note_save(step: int, seconds: float) -> None:
    if _CURRENT is not None:
        _CURRENT.checkpoints.append(step)
        _CURRENT.save_s.append(round(seconds, 3))
        _CURRENT.saved_at.append(time.time())


def note_answered() -> None:
    """One evaluation batch answered and written: it survives this segment like a checkpoint."""
    if _CURRENT is not None:
        _CURRENT.answered += 1


def finish(stop_reason: str, failure_class: str | None = None) -> None:
    """Append this segment's line (once); safe to call from any exit path."""
    global _CURRENT
    seg, _CURRENT = _CURRENT, None
    if seg is None or seg.run_dir is None:
        return
    seg.stop_reason, seg.failure_class, seg.end = stop_reason, failure_class, time.time()
    append(Path(seg.run_dir), asdict(seg))


def read(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill
            continue
    return rows
