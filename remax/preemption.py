"""The whole preemption path of a job segment: one typed stop request, the signals that set it,
the deadline that sets it, the fallback that requeues when nothing else can, and the requeue.

Why one module: every way a segment can end early (USR2 before the time limit, SIGTERM at a
preemption, the job's end time coming closer than one more step plus a save) must end the same
way, in ``scontrol requeue``, or the ``afterok`` dependents are cancelled and the billed hours of
the chain are lost. The training loop (``remax.trainers.loop``), the evaluation loops and the job
layer (``jobs/``) all import from here and nothing here imports them back.

Timeline of a stop (t = the signal):

- the handler only sets the request (a signal handler must not write checkpoints);
- the loop sees it at the next step boundary, or between two evaluation batches (which get the
  same request: :meth:`StopRequest.check` raises :class:`Stopped`), saves if the measured save
  time still fits before the kill, and returns; the job layer's segment end
  (``jobs._stage.SegmentEnd``) cancels (a graceful stop) or calls :func:`requeue`;
- a guard thread requeues *without saving* and exits if the segment has not ended by
  ``kill time - margin``: a save longer than the signal window, a hung ``wandb.finish()`` or a
  stuck evaluation batch then cost the steps since the last checkpoint, never the whole chain.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable

from remax import ledger

log = logging.getLogger("remax.preemption")

EXIT_REQUEUED = 3
"""Exit status of a segment that requeued itself from the guard thread (no checkpoint)."""

_SIGNAL_TICK_S = 60  # slurmctld sends --signal at a 30 s tick: up to ~30 s (plus load) early


class StopReason(str, enum.Enum):
    usr2 = "usr2"  # Slurm's --signal warning: time limit near, or a preemption (preempt_send_user_signal)
    sigterm = "sigterm"  # preemption (GraceTime) or the time limit itself
    deadline = "deadline"  # no signal, but one more step + save + teardown would not fit
    graceful = "graceful"  # `jobs.cancel --graceful`: checkpoint, then cancel; no kill is coming
    manual = "manual"  # set in-process (tests, a trainer's own reason)


class Stopped(Exception):
    """Raised by :func:`check` between evaluation batches: unwind to the loop, which requeues."""


class StopRequest:
    """Stop request of one job segment; the loop checks :attr:`requested` at each step boundary.

    When the kill comes, which bounds the stop's save (:meth:`kill_time`):

    - ``end_time``: the job's projected end (Unix time) or None; it bounds every stop.
    - ``grace_time_s``: the partition's ``GraceTime``, the time between a preemption's signal
      and its kill (:func:`partition_grace_s`); 0 where the partition preempts nothing.
    - ``signal_delay_s``: ``--signal=USR2@<delay>``, the fallback for a USR2 when the end time is
      unknown (a failing squeue) and the partition says nothing.
    - ``graceful``: tells, at the signal, whether ``jobs.cancel --graceful`` sent it; such a
      stop has no kill deadline but the end time (nobody kills a job that is stopping itself).
    - ``margin_s``: time kept for the teardown and the requeue itself (``cluster.deadline_margin_s``).
    """

    def __init__(
        self,
        end_time: float | None = None,
        margin_s: float = 0.0,
        signal_delay_s: float = 0.0,
        *,
        grace_time_s: float = 0.0,
        graceful: Callable[[], bool] | None = None,
    ) -> None:
        self.end_time, self.margin_s = end_time, margin_s
        self.signal_delay_s, self.grace_time_s = signal_delay_s, grace_time_s
        self.graceful = graceful
        self.reason: StopReason | None = None
        self.signalled_at: float | None = None
        self.step_s = 0.0  # slowly decaying maximum of the step time
        self.save_s = 0.0  # last measured checkpoint save time (kept across restarts)
        self.eval_s = 0.0  # last measured periodic evaluation time
        self.eval_due = False  # the loop says: the next step boundary runs a periodic eval
        self.failed = False  # the segment is failing (an exception): the guard must not requeue

    # ------------------------------------------------------------------ setting it
    def on_signal(self, signum: int = 0, _frame=None) -> None:
        """Signal handler: only flags (the save happens at the next step boundary)."""
        if self.reason in (None, StopReason.deadline):
            if self.graceful is not None and self.graceful():
                self.reason = StopReason.graceful
            elif signum == signal.SIGTERM:
                self.reason = StopReason.sigterm
            else:
                self.reason = StopReason.usr2
        if self.signalled_at is None:  # the guard thread counts from the first signal
            self.signalled_at = time.time()

    def set(self, *_args) -> None:
        if self.reason is None:
            self.reason, self.signalled_at = StopReason.manual, time.time()

    # ------------------------------------------------------------------ measurements
    def observe(self, step_s: float) -> None:
        self.step_s = max(step_s, 0.9 * self.step_s)  # slow decay: steps vary in length

    def observe_save(self, save_s: float) -> None:
        self.save_s = save_s

    def observe_eval(self, eval_s: float) -> None:
        self.eval_s = eval_s

    # ------------------------------------------------------------------ deciding
    @property
    def requested(self) -> bool:
        if self.reason is not None:
            return True
        if self.end_time is None:
            return False
        # The next boundary must still leave room for one step, a save, a due eval, the teardown.
        need = self.step_s + self.save_s + (self.eval_s if self.eval_due else 0.0) + self.margin_s
        if time.time() + need >= self.end_time:
            self.reason = StopReason.deadline
            return True
        return False

    def check(self) -> None:
        """Between evaluation batches: raise :class:`Stopped` when a stop was requested."""
        if self.requested:
            raise Stopped(self.reason.value)

    def kill_time(self) -> float | None:
        """When the kill is expected, None when nothing is known to come."""
        return min(
            (t for t in (self.end_time, self._kill_after_signal()) if t is not None), default=None
        )

    def _kill_after_signal(self) -> float | None:
        if self.signalled_at is None or self.reason in (StopReason.graceful, StopReason.manual):
            return None
        if self.reason == StopReason.sigterm:  # a preemption confirmed: GraceTime, whatever it is
            return self.signalled_at + self.grace_time_s
        if self.reason == StopReason.usr2:
            # A time-limit warning (Slurm sends it signal_delay_s before the end, up to one
            # 30 s tick early: the end time says when) or a preemption's user signal (GraceTime
            # after it). The end time tells the two apart; unknown, the earlier kill is assumed.
            if self.end_time is not None and self.end_time - self.signalled_at <= (
                self.signal_delay_s + _SIGNAL_TICK_S
            ):
                return None
            if self.grace_time_s > 0:
                return self.signalled_at + self.grace_time_s
            if self.end_time is None and self.signal_delay_s > 0:
                return self.signalled_at + self.signal_delay_s
        return None

    def can_save(self) -> bool:
        """Whether the measured save still fits before the kill (else requeue without saving)."""
        kill = self.kill_time()
        return kill is None or time.time() + self.save_s + self.margin_s < kill


_early: list[tuple[int, float]] = []  # (signal, when) noted before install()
_STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


def note_early_signals() -> None:
    """From a job task's first moment (``jobs/__init__``, and again where submitit replaced it):
    note USR2 and SIGTERM until :func:`install` takes them over. Their default action kills the
    task: a preemption's or a time limit's warning while four ranks import, or the retried kill
    of a lost node's old incarnation reaching the new one, would end the job FAILED and cancel
    its chain instead of requeueing it. A cancel's SIGTERM is then obeyed at :func:`install`
    (or by Slurm's SIGKILL, KillWait later)."""
    for signum in _STOP_SIGNALS:
        signal.signal(signum, lambda sig, _frame: _early.append((sig, time.time())))


def install(stop: StopRequest) -> StopRequest:
    """USR2 and SIGTERM set ``stop``; a guard thread watches it. A signal noted since the task
    started (:func:`note_early_signals`) is handled now, a USR2's clock counted from its arrival."""
    signal.signal(signal.SIGUSR2, stop.on_signal)
    signal.signal(signal.SIGTERM, lambda *_: _triage_sigterm(stop))
    while _early:
        signum, at = _early.pop(0)
        if signum == signal.SIGTERM:
            _triage_sigterm(stop)  # a preemption (the job RUNNING) or a cancel
            continue
        stop.on_signal(signum)
        stop.signalled_at = min(stop.signalled_at, at)
    threading.Thread(target=_guard, args=(stop,), name="remax-stop-guard", daemon=True).start()
    return stop


def ignore_late_signals() -> None:
    """The segment's outcome is decided (completed, requeued or failed) and the task is leaving:
    a USR2 or SIGTERM now (the time limit's warning as the last step ends, the retried kill of a
    lost node's old incarnation) has nothing left to stop. Python drops its handlers while the
    interpreter shuts down, and the default action there turned a finished segment into FAILED
    (tasks "killed by USR2" or "Terminated" after the summary, the chain cancelled). A task
    stuck in its teardown still gets Slurm's SIGKILL, KillWait after the SIGTERM."""
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


# What Slurm says about a job that just got SIGTERM (measured on slurm-wlm 22.05): a preemption's
# GraceTime signal finds it RUNNING; `scancel`, `scontrol requeue` and the time limit have already
# moved it to COMPLETING (or a terminal state).
PREEMPTED_STATES = frozenset({"RUNNING"})


def _triage_sigterm(stop: StopRequest) -> None:
    """SIGTERM handler: ask Slurm why, off the main thread (a handler must not block on a pipe)."""
    threading.Thread(target=_on_sigterm, args=(stop,), name="remax-sigterm", daemon=True).start()


def _on_sigterm(stop: StopRequest, state: str | None = None) -> None:
    """A preemption (the job still RUNNING) takes the stop path: checkpoint and requeue. A cancel
    or anything Slurm cannot confirm ends the segment as SIGTERM's default would: requeueing a job
    the user cancelled bills hours nobody asked for."""
    state = state or job_state()
    if state in PREEMPTED_STATES:
        log.warning("SIGTERM while the job is %s: a preemption; checkpointing for a requeue", state)
        stop.on_signal(signal.SIGTERM)
        return
    log.warning("SIGTERM while the job is %s: cancelled or at its limit; ending now", state)
    ledger.finish(f"sigterm ({state or 'state unknown'})")
    os._exit(128 + signal.SIGTERM)


def job_state() -> str | None:
    """This job's state per ``squeue`` (RUNNING, COMPLETING, ...), None when Slurm does not say."""
    states = (_squeue("%T", timeout=10) or "").split()
    return states[0] if states else None


def _squeue(field: str, timeout: float) -> str | None:
    """One ``squeue -o`` field of this job, None outside Slurm or when squeue fails."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", field],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired):  # no squeue, a hung slurmctld
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _guard(stop: StopRequest) -> None:
    """Requeue without saving when the segment is still alive at ``kill time - margin``."""
    while stop.signalled_at is None:
        time.sleep(0.5)
    ledger.note_signal(stop.reason.value)
    kill = stop.kill_time()
    if kill is None or stop.reason == StopReason.graceful:
        return  # a graceful stop is never requeued: at the end time Slurm ends it
    time.sleep(max(0.0, kill - stop.margin_s - time.time()))
    if stop.failed:  # srun ends the other tasks of a failed step with SIGTERM: not a preemption
        return
    log.warning(
        "stop (%s) not reached %.0f s before the kill: requeueing without a checkpoint",
        stop.reason.value,
        stop.margin_s,
    )
    requeue()
    ledger.finish(f"{stop.reason.value}: requeued without a checkpoint")
    os._exit(EXIT_REQUEUED)  # the main thread is stuck (a save, an eval batch, wandb.finish)


def partition_grace_s() -> float | None:
    """This job's partition's ``GraceTime`` in seconds (a preemption's signal-to-kill window),
    None outside Slurm or when scontrol does not answer."""
    partition = os.environ.get("SLURM_JOB_PARTITION")
    if not partition:
        return None
    try:
        out = subprocess.run(
            ["scontrol", "show", "partition", partition, "-o"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"\bGraceTime=(\d+)", out.stdout) if out.returncode == 0 else None
    return float(match.group(1)) if match else None


def job_end_time() -> float | None:
    """The job's projected end (Unix time): SLURM_JOB_END_TIME (Slurm >= 23.02) or squeue."""
    if os.environ.get("SLURM_JOB_END_TIME"):
        return float(os.environ["SLURM_JOB_END_TIME"])
    try:
        return time.mktime(time.strptime(_squeue("%e", timeout=30) or "", "%Y-%m-%dT%H:%M:%S"))
    except ValueError:  # "N/A", "Unknown", no answer
        return None


def requeue(
    attempts: int = 5, wait_s: float = 2.0, exclude: str | None = None, any_rank: bool = False
) -> bool:
    """``scontrol requeue $SLURM_JOB_ID``, retried: a busy slurmctld refuses now and then.

    Only rank 0 requeues (one requeue per job, not one per task; the others return True).
    ``exclude``: a node the requeued job must avoid (a hang, a lost GPU). ``any_rank``: requeue
    from this rank whatever its number (a hung rank is alone to know it). Returns False when
    every try failed (or outside Slurm); a job that a preemption is already requeueing reports
    an error here and needs nothing more.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    if not any_rank and int(os.environ.get("SLURM_PROCID") or os.environ.get("RANK") or 0):
        return True
    for attempt in range(1, attempts + 1):
        try:
            out = subprocess.run(
                # Incomplete: only a RUNNING (or configuring, stopped, suspended) job comes back;
                # a plain requeue also revives one that a user's scancel just ended.
                ["scontrol", "requeue", "Incomplete", job],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if out.returncode == 0:
                log.info("requeued job %s", job)
                if exclude:  # only a pending job accepts a new exclude list
                    subprocess.run(
                        ["scontrol", "update", f"JobId={job}", f"ExcNodeList={exclude}"],
                        capture_output=True,
                        timeout=30,
                    )
                return True
            log.warning("scontrol requeue %s failed (try %d): %s", job, attempt, out.stderr.strip())
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("scontrol requeue %s failed (try %d): %s", job, attempt, exc)
        time.sleep(wait_s * attempt)
    return False
