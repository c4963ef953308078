"""The loop every stage shares: resume, step, log, checkpoint, export.

The loop names two typed interfaces and nothing else of a trainer: :class:`Trainer` (below) and
``remax.engines.Engine``, the trained models (plain PyTorch or DeepSpeed) that write and read their
own files inside each ``checkpoints/step_<N>/``. The loop owns ``metrics.jsonl``, ``export/`` and
``summary.json``; what is saved into ``checkpoints/`` and when is :class:`Checkpointer`'s.

At world size N > 1 every rank runs this loop in lockstep; rank 0 alone writes metrics, the
export and the summary, every rank writes its part of each checkpoint, evaluates its share in
``evaluate_final`` and takes part in the export (a ZeRO-3 gather), and a stop request on any rank
stops all of them at the same step boundary.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from remax import distributed, ledger, preemption, watchdog
from remax.checkpoint import export_hf
from remax.engines import Engine
from remax.fileio import write_json
from remax.log import MetricWriter
from remax.preemption import StopRequest
from remax.run_dir import to_plain, wandb_id
from remax.trainers.checkpointer import Checkpointer

log = logging.getLogger("remax.loop")


class Trainer(Protocol):
    """What a stage's trainer provides (composition, no base class; style.md rule 7)."""

    tokenizer: Any
    step: int
    """Optimizer steps done."""
    total_steps: int

    def engines(self) -> list[Engine]:
        """The trained models; each saves and loads its own files in ``step_<N>/``."""

    def before_training(self, run_dir: Path) -> None: ...

    def train_step(self) -> dict[str, float]:
        """One optimizer step; its metrics."""

    def should_stop_early(self, stop: StopRequest) -> bool:
        """The periodic evaluation and its stop rules; ``stop`` interrupts it (Stopped)."""

    def evaluate_final(self, run_dir: Path, stop: StopRequest) -> dict:
        """Collective: every rank evaluates its share; returns the summary's stage part.
        ``stop`` interrupts it between batches (:class:`remax.preemption.Stopped`)."""

    def export_model(self, run_dir: Path) -> tuple[torch.nn.Module, dict | None]:
        """The module to export and its weights (None: its own). Collective under ZeRO-3."""

    def state_dict(self) -> dict:
        """Counters and sampler position: everything the engines do not save."""

    def load_state_dict(self, state: dict) -> None: ...


def run(
    trainer: Trainer,
    cfg,
    run_dir: Path,
    stage: str,
    *,
    stop: StopRequest | None = None,
    end_segment: Callable[[], None] | None = None,
):
    """Train to ``trainer.total_steps`` from the latest checkpoint; export and summarise.

    Returns the summary, or None when stopped early by ``stop`` (after checkpointing). Then
    ``end_segment`` (the job's requeue or cancel) runs before W&B closes: a requeue must not
    wait on a slow close, and the kill that follows it may cut the close short.
    """
    stop = stop if stop is not None else StopRequest()  # a plain run: never requested
    summary_file = run_dir / "summary.json"
    if summary_file.exists():
        log.info("%s already complete: %s", stage, summary_file)
        return json.loads(summary_file.read_text())
    ckpt = Checkpointer(cfg.checkpoint, trainer, run_dir / "checkpoints", stop)
    ckpt.resume(stage, getattr(getattr(cfg, "cluster", None), "signal_delay_s", None))
    ledger.note_resume(trainer.step)
    writer = _writer(cfg, run_dir, stage, trainer.step)
    stopped = False
    try:
        trainer.before_training(run_dir)
        stopped = not _train(trainer, cfg, stage, writer, ckpt, stop)
        if stopped:
            return None
        ckpt.save(trainer.step)
        summary = trainer.evaluate_final(run_dir, stop)  # every rank evaluates its share
        watchdog.beat("export", trainer.step)
        if distributed.any_rank(stop.requested):
            stopped = True  # the export may not fit before the kill: the next segment redoes it
            return None
        return _finish(trainer, cfg, run_dir, stage, writer, summary)
    except preemption.Stopped:  # raised between evaluation batches (periodic or final eval)
        stopped = True
        ckpt.save_if_it_fits(trainer.step)
        return None
    finally:
        try:
            if stopped and end_segment is not None:
                end_segment()
        finally:
            # Before a requeue W&B gets a short bound: the kill is coming, the offline files suffice.
            writer.close(timeout_s=10 if stopped else None)


def _train(
    trainer: Trainer, cfg, stage: str, writer, ckpt: Checkpointer, stop: StopRequest
) -> bool:
    """Steps to the end (True) or to a stop request (False, after a save that fits)."""
    bar = tqdm(
        total=trainer.total_steps,
        initial=trainer.step,
        desc=stage,
        disable=not cfg.log.progress or distributed.rank() > 0,
        dynamic_ncols=True,
    )
    try:
        while trainer.step < trainer.total_steps and not _eval_boundary(trainer, cfg, stop):
            t0 = time.perf_counter()
            metrics = trainer.train_step()
            trainer.step += 1
            ledger.note_step(trainer.step)
            watchdog.beat("step", trainer.step)
            metrics["time/step_s"] = time.perf_counter() - t0
            stop.observe(metrics["time/step_s"])  # the deadline stop leaves room for one step
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in list(_scalars(metrics).items())[:3]})
            if trainer.step % cfg.train.log_every == 0 or trainer.step == trainer.total_steps:
                writer.log(trainer.step, metrics)
            # One decision for every rank: rank 0's clock says whether a save is due, any rank's
            # signal stops all. Per-rank answers would pair one rank's save barrier with
            # another's gradient all-reduce.
            save_due, stop_now = distributed.agree(
                ckpt.due(trainer.step, trainer.total_steps), stop.requested
            )
            if save_due:
                ckpt.save(trainer.step)
            if stop_now:
                ckpt.save_if_it_fits(trainer.step)
                return False
        return True
    finally:
        bar.close()


def _eval_boundary(trainer: Trainer, cfg, stop: StopRequest) -> bool:
    """``trainer.should_stop_early()`` (where the periodic eval runs), timed for the deadline."""
    every = cfg.train.eval_every
    due = bool(every) and trainer.step > 0 and trainer.step % every == 0
    t0 = time.perf_counter()
    early = trainer.should_stop_early(stop)
    watchdog.beat("step", trainer.step)
    if due:
        stop.observe_eval(time.perf_counter() - t0)
    stop.eval_due = bool(every) and (trainer.step + 1) % every == 0
    return early


def _finish(trainer: Trainer, cfg, run_dir: Path, stage: str, writer, summary: dict) -> dict:
    """Export and summarise (collective; rank 0 writes)."""
    summary_file = run_dir / "summary.json"
    module, weights = trainer.export_model(run_dir)  # under ZeRO-3 the shards gather
    if distributed.rank():
        distributed.barrier()  # rank 0 writes the export and the summary
        return json.loads(summary_file.read_text())
    writer.summary(summary)
    meta = {"stage": stage, "step": trainer.step, "config": to_plain(cfg), "versions": _versions()}
    export_hf(module, trainer.tokenizer, run_dir / "export", meta, state_dict=weights)
    summary = {
        "stage": stage,
        "step": trainer.step,
        "run_dir": str(run_dir),
        "world_size": distributed.world_size(),
        **summary,
    }
    write_json(summary_file, summary)
    distributed.barrier()
    return summary


def _writer(cfg, run_dir: Path, stage: str, resume_step: int):
    if distributed.rank():  # other ranks' metrics are already all-reduced into rank 0's
        return _NullWriter()
    return MetricWriter(
        run_dir,
        run_id=wandb_id(run_dir, stage),
        stage=stage,
        config=to_plain(cfg),
        resume_step=resume_step,
        wandb_mode=cfg.log.wandb_mode,
        project=cfg.log.wandb_project,
        entity=cfg.log.wandb_entity,
        group=cfg.log.wandb_group or cfg.run.name,
    )


class _NullWriter:
    """Ranks other than 0 log nothing."""

    def log(self, step, metrics) -> None:
        pass

    def summary(self, summary) -> None:
        pass

    def close(self, timeout_s=None) -> None:
        pass


def _scalars(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if not k.startswith("time/")}


def _versions() -> dict:
    import transformers

    import remax

    return {
        "remax": remax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
