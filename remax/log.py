"""Logging setup and the one metric writer (metrics.jsonl + optional W&B).

Named ``log.py``, not ``logging.py``, so it never shadows the stdlib. The only module that imports
wandb. The W&B run id is derived from the run-dir signature, so every restart of a run logs to the
same id; steps are the global optimizer step (offline runs restart W&B's own step counter, so it
is always passed explicitly), and ``metrics.jsonl`` rows past the resumed step are dropped so no
step appears twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

from remax.fileio import atomic_write_text

log = logging.getLogger("remax")


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
            self._wandb = wandb.init(
                id=run_id,
                resume="allow",
                mode=mode,
                dir=str(wandb_dir),
                project=project,
                entity=entity,
                group=group,
                job_type=stage,
                name=run_id,
                config=config,
                settings=wandb.Settings(silent=True, console="off"),
            )
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
            self._wandb.log(row, step=int(step))

    def summary(self, summary: dict) -> None:
        if self._wandb is not None:
            self._wandb.summary.update(_flatten(summary))

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out
