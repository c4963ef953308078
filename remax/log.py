"""Logging setup and the one metric writer (metrics.jsonl + optional W&B).

Named ``log.py``, not ``logging.py``, so it never shadows the stdlib. The only module that imports
wandb. The W&B run id is derived from the run-dir signature, so every restart of a run logs to the
same id; steps are the global optimizer step (offline runs restart W&B's own step counter, so it
is always passed explicitly), and ``metrics.jsonl`` rows past the resumed step are dropped so no
step appears twice.

W&B never fails or strands a job: an online ``init`` that fails (a compute node without network,
a bad key) falls back to offline mode, a failing ``log`` is dropped with one warning, and
``finish`` runs in a daemon thread that is abandoned after a bound (a hung upload must not burn
the rest of the allocation, nor the signal window before a requeue). Abandoning the thread is not
enough: wandb's own ``atexit`` teardown waits for the same upload without limit, so the interpreter
would never exit and the finished job would stay billed. An abandoned finish therefore arms a hard
exit that runs before that teardown (see :func:`_arm_hard_exit`).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import sys
import threading
from pathlib import Path

from remax.fileio import atomic_write_text

log = logging.getLogger("remax")

WANDB_INIT_TIMEOUT_S = 30
"""Online ``wandb.init`` gives up after this long (its default is 90 s) and we go offline."""
WANDB_FINISH_TIMEOUT_S = 120
"""``wandb.finish`` after a completed run may upload for this long; after it we leave it."""


def init_logging(level: int = logging.INFO) -> None:
    """One stream handler with a fixed prefix; idempotent."""
    root = logging.getLogger("remax")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("[remax %(asctime)s %(levelname)s] %(message)s", "%H:%M:%S")
        )
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def _clean(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        v = float(v.item()) if hasattr(v, "item") else v
        out[k] = None if isinstance(v, float) and not math.isfinite(v) else v
    return out


def resolve_wandb_mode(mode: str) -> str:
    """``auto``: online only with an API key and WANDB_MODE not offline/disabled, else offline."""
    mode = str(getattr(mode, "value", mode))
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "")
    if env in ("offline", "disabled", "dryrun"):
        return "disabled" if env == "disabled" else "offline"
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class MetricWriter:
    """Append ``{"step": N, **metrics}`` rows to ``metrics.jsonl`` and mirror them to W&B."""

    def __init__(
        self,
        run_dir: Path,
        *,
        run_id: str,
        stage: str,
        config: dict,
        resume_step: int = 0,
        wandb_mode: str = "auto",
        project: str = "remax",
        entity: str | None = None,
        group: str | None = None,
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self._truncate_after(resume_step)
        self._wandb = None
        mode = resolve_wandb_mode(wandb_mode)
        if mode != "disabled":
            import wandb

            if not os.environ.get("WANDB_MODE"):  # an empty value fails wandb's settings validation
                os.environ.pop("WANDB_MODE", None)
            wandb_dir = Path(run_dir)
            os.environ.setdefault("WANDB_CONFIG_DIR", str(wandb_dir / "wandb"))
            os.environ.setdefault("WANDB_CACHE_DIR", str(wandb_dir / "wandb" / ".cache"))
            os.environ.setdefault("WANDB_DATA_DIR", str(wandb_dir / "wandb" / ".data"))
            kwargs = dict(
                id=run_id,
                resume="allow",
                dir=str(wandb_dir),
                project=project,
                entity=entity,
                group=group,
                job_type=stage,
                name=run_id,
                config=config,
            )
            self._wandb = _init_or_offline(wandb, mode, kwargs)
        (Path(run_dir) / "wandb_id").write_text(run_id + "\n")

    def _truncate_after(self, step: int) -> None:
        """Drop rows with step > ``step``: they were logged after the checkpoint we resume from."""
        if not self.path.exists():
            return
        kept, redone = [], 0
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a row torn by a kill
                continue
            if row.get("step", 0) <= step:
                kept.append(line)
            else:
                redone += 1
        if redone:
            log.info("resuming at step %d: %d logged step(s) after it are redone", step, redone)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": int(step), **_clean(metrics)}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            try:
                self._wandb.log(row, step=int(step))
            except Exception as exc:  # noqa: BLE001 - metrics.jsonl has the row; W&B is a mirror
                log.warning("W&B log failed, W&B off for this segment: %s", exc)
                self._wandb = None

    def summary(self, summary: dict) -> None:
        if self._wandb is not None:
            try:
                self._wandb.summary.update(_flatten(summary))
            except Exception as exc:  # noqa: BLE001 - summary.json has it
                log.warning("W&B summary failed: %s", exc)

    def close(self, timeout_s: float | None = None) -> bool:
        """``wandb.finish`` bounded by ``timeout_s`` (default WANDB_FINISH_TIMEOUT_S); returns
        whether it finished in time."""
        run, self._wandb = self._wandb, None
        if run is None:
            return True
        bound = WANDB_FINISH_TIMEOUT_S if timeout_s is None else timeout_s
        done = threading.Thread(
            target=_finish_quietly, args=(run,), name="wandb-finish", daemon=True
        )
        done.start()
        done.join(bound)
        if done.is_alive():
            log.warning(
                "wandb.finish still running after %.0f s: leaving it (offline files kept)", bound
            )
            _arm_hard_exit()
            return False
        return True


_HARD_EXIT: dict = {"armed": False, "code": None}


def _arm_hard_exit() -> None:
    """End the interpreter before wandb's atexit teardown (which waits for the abandoned upload).

    atexit hooks run last-registered first, and wandb registered its teardown at ``init``, so this
    hook runs before it. It cannot read the exit status Python is about to return, so ``sys.exit``
    is wrapped to remember it (wandb's ``ExitHooks`` does the same); an uncaught exception is 1.
    The cost: atexit hooks registered before this one (temporary-file cleanup) are skipped.
    """
    if _HARD_EXIT["armed"]:
        return
    _HARD_EXIT["armed"] = True
    previous_exit = sys.exit

    def remember_exit(code=None):
        _HARD_EXIT["code"] = code
        previous_exit(code)

    sys.exit = remember_exit
    atexit.register(_hard_exit)


def _exit_status() -> int:
    """What the interpreter would return: the uncaught exception's 1, else the ``sys.exit`` code."""
    if getattr(sys, "last_value", None) is not None:
        return 130 if isinstance(sys.last_value, KeyboardInterrupt) else 1
    code = _HARD_EXIT["code"]
    if code is None:
        return 0
    return code if isinstance(code, int) else 1  # sys.exit("message"): Python printed it, exits 1


def _hard_exit() -> None:
    code = _exit_status()
    log.warning("exiting (status %d) without waiting for W&B's teardown", code)
    for handler in [*logging.getLogger("remax").handlers, *logging.getLogger().handlers]:
        handler.flush()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to save
            pass
    os._exit(code)


def _finish_quietly(run) -> None:
    try:
        run.finish()
    except Exception as exc:  # noqa: BLE001 - a failed upload must not fail the job
        log.warning("wandb.finish failed: %s", exc)


def _teardown(wandb) -> None:
    try:
        wandb.teardown()
    except Exception as exc:  # noqa: BLE001
        log.warning("W&B teardown after a failed init: %s", exc)


def _init_or_offline(wandb, mode: str, kwargs: dict):
    """``wandb.init`` in ``mode``; an online init that fails is retried offline (the run syncs
    later with ``wandb sync``); an offline one that fails leaves W&B off."""
    settings = dict(silent=True, console="off")
    try:
        if mode == "online":
            settings["init_timeout"] = WANDB_INIT_TIMEOUT_S
        return wandb.init(mode=mode, settings=wandb.Settings(**settings), **kwargs)
    except Exception as exc:  # noqa: BLE001 - wandb raises many types (CommError, UsageError...)
        if mode != "online":
            log.warning("W&B %s init failed, W&B off: %s", mode, exc)
            return None
        log.warning("W&B online init failed, falling back to offline: %s", exc)
        _teardown(wandb)  # the failed run still holds its id in this process
    settings.pop("init_timeout", None)
    try:
        return wandb.init(mode="offline", settings=wandb.Settings(**settings), **kwargs)
    except Exception as exc:  # noqa: BLE001
        log.warning("W&B offline init failed too, W&B off: %s", exc)
        return None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out
