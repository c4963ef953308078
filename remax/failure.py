"""Failure classes and ``failure.json``: how a segment ended when it did not end well.

The class decides what the job does next (``jobs/_policy.py``): a preemption or a time limit is
requeued, a hang or a lost node is requeued away from the node a bounded number of times, an OOM,
a disk-full and a plain Python exception stop (a rerun would fail the same way, billed again).
``failure.json`` in the run dir holds the last failure (class, phase, step, host, job, restart,
reason); ``failures.jsonl`` keeps them all, for the status table and the bounds.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import socket
import time
from pathlib import Path

from remax.fileio import write_json

EXIT_HANG = 4
"""Exit status of a rank the watchdog ended (distinct from a crash's 1 and a requeue's 3)."""


class FailureClass(str, enum.Enum):
    preemption = "preemption"
    time_limit = "time_limit"
    hang = "hang"
    node_failure = "node_failure"
    oom = "oom"
    exception = "exception"
    no_progress = "no_progress"
    disk_full = "disk_full"


def classify(exc: BaseException) -> FailureClass:
    """The class of an exception that ended a stage."""
    import torch  # the caller is already training; not at module import (login-node tools)

    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return FailureClass.oom
    if isinstance(exc, OSError) and (
        exc.errno in (errno.ENOSPC, errno.EDQUOT) or type(exc).__name__ == "DiskFullError"
    ):
        return FailureClass.disk_full
    if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
        return FailureClass.oom  # some kernels raise a plain RuntimeError for a CUDA OOM
    if isinstance(exc, RuntimeError) and any(m in str(exc) for m in PEER_LOST):
        # Reached only when no rank claimed the event first (a rank that raises claims before
        # its process exits and closes our connections): a peer vanished without a word.
        return FailureClass.node_failure
    return FailureClass.exception


PEER_LOST = (
    "Connection closed by peer",  # gloo: the peer's process is gone (its node lost, SIGKILL)
    "Connection reset by peer",
    "remote process exited or there was a network error",  # NCCL
)
"""What a collective raises when another rank disappeared mid-collective."""


def record(
    folder: Path,
    cls: FailureClass,
    reason: str,
    *,
    phase: str | None = None,
    step: int | None = None,
    **extra,
) -> dict:
    """Write ``failure.json`` (atomically) and append it to ``failures.jsonl``; returns it."""
    info = {
        "class": cls.value,
        "reason": reason,
        "phase": phase,
        "step": step,
        "host": socket.gethostname(),
        "job": os.environ.get("SLURM_JOB_ID"),
        "restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
        "rank": _rank(),
        "time": time.time(),
        **extra,
    }
    folder = Path(folder)  # the run dir (not yet prepared when a startup read hangs)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "failure.json", info)
    with open(folder / "failures.jsonl", "a") as f:
        f.write(json.dumps(info, sort_keys=True) + "\n")
    return info


def claim_event(folder: Path) -> bool:
    """Whether this rank is the first to report this segment's failure (and so records it and
    acts on it). Every rank of an N-rank job sees one failure: a hung rank blocks the others in
    the next collective, where their watchdogs fire too; a rank that raises closes its peers'
    connections. Counted N times, one event would use up ``cluster.max_failure_requeues`` and
    requeue twice; the first claim in the shared run dir wins, the others stay silent."""
    key = _segment_key()
    if key is None:  # one process: nobody to race
        return True
    folder = Path(folder) / "failure"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(folder / f"event-{key}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"rank": _rank(), "host": socket.gethostname(), "time": time.time()}))
    return True


def _segment_key() -> str | None:
    """This segment's name, the same on every rank: job and restart, or the local launch."""
    env = os.environ
    if env.get("SLURM_JOB_ID"):
        return f"{env['SLURM_JOB_ID']}-r{int(env.get('SLURM_RESTART_COUNT') or 0)}"
    if int(env.get("WORLD_SIZE") or 1) <= 1:
        return None
    # torchrun (or a test's spawn): the ranks share a launcher process and a rendezvous port.
    return f"local-{os.getppid()}-{env.get('MASTER_PORT', '')}"


def _rank() -> int:
    return int(os.environ.get("SLURM_PROCID") or os.environ.get("RANK") or 0)


def history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "failures.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
