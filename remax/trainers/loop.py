"""The loop every stage shares: resume, step, log, checkpoint, export.

The loop names two typed interfaces and nothing else of a trainer: :class:`Trainer` (below) and
``remax.engines.Engine``, the trained models (plain PyTorch or DeepSpeed) that write and read their
own files inside each ``checkpoints/step_<N>/``. The loop owns the run directory:
``checkpoints/step_<N>/``, ``metrics.jsonl``, ``export/``, ``summary.json``.

At world size N > 1 every rank runs this loop in lockstep; rank 0 alone writes metrics, the
export and the summary, every rank writes its part of each checkpoint, evaluates its share in
``evaluate_final`` and takes part in the export (a ZeRO-3 gather), and a stop request on any rank
stops all of them at the same step boundary.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from remax import distributed
from remax.checkpoint import CheckpointManager, export_hf, rng_state, set_rng_state
from remax.engines import Engine
from remax.fileio import write_json
from remax.log import MetricWriter
from remax.run_dir import to_plain

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

    def should_stop_early(self) -> bool: ...

    def evaluate_final(self, run_dir: Path) -> dict:
        """Collective: every rank evaluates its share; returns the summary's stage part."""

    def export_model(self, run_dir: Path) -> tuple[torch.nn.Module, dict | None]:
        """The module to export and its weights (None: its own). Collective under ZeRO-3."""

    def state_dict(self) -> dict:
        """Counters and sampler position: everything the engines do not save."""

    def load_state_dict(self, state: dict) -> None: ...


class StopRequest(Protocol):
    """Asked from outside (a signal, a deadline): checkpoint at the next step boundary, return."""

    @property
    def requested(self) -> bool: ...

    def observe(self, step_s: float) -> None:
        """The last step's duration (a deadline stop leaves room for one more)."""


class StopFlag:
    """A :class:`StopRequest` set from a signal handler."""

    def __init__(self) -> None:
        self.requested = False

    def set(self, *_args) -> None:
        self.requested = True

    def observe(self, step_s: float) -> None:
        pass


def run(trainer: Trainer, cfg, run_dir: Path, stage: str, *, stop: StopRequest | None = None):
    """Train to ``trainer.total_steps`` from the latest checkpoint; export and summarise.

    Returns the summary, or None when stopped early by ``stop`` (after checkpointing).
    """
    summary_file = run_dir / "summary.json"
    if summary_file.exists():
        log.info("%s already complete: %s", stage, summary_file)
        return json.loads(summary_file.read_text())
    ckpt = CheckpointManager(run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last)
    resume(trainer, ckpt, stage)
    writer = _writer(cfg, run_dir, stage, trainer.step)
    try:
        trainer.before_training(run_dir)
        if not _train(trainer, cfg, stage, writer, lambda: save(trainer, ckpt), stop):
            return None
        save(trainer, ckpt)
        return _finish(trainer, cfg, run_dir, stage, writer)
    finally:
        writer.close()


def resume(trainer: Trainer, ckpt: CheckpointManager, stage: str) -> None:
    """Load the latest complete checkpoint, if any: engines, counters, sampler, RNG."""
    latest = ckpt.latest()
    if latest is None:
        return
    rank, world = distributed.rank(), distributed.world_size()
    state = CheckpointManager.load_state(latest, rank)
    if state.get("world_size", 1) != world:
        raise ValueError(
            f"{latest} was written by {state.get('world_size', 1)} ranks, this run has {world}: "
            "resume with the same number of ranks (each rank's RNG stream is in the checkpoint)"
        )
    for engine in trainer.engines():  # weights, optimizer and scheduler (each rank its shards)
        engine.load(latest)
    trainer.load_state_dict(state["trainer"])
    set_rng_state(state["rng"])
    log.info("resumed %s from %s (step %d)", stage, latest, trainer.step)


def save(trainer: Trainer, ckpt: CheckpointManager) -> None:
    """``step_<N>/``: every engine's files, the trainer's state, this rank's RNG (collective)."""

    def write(directory: Path) -> None:
        for engine in trainer.engines():
            engine.save(directory)

    if distributed.rank():  # counters and sampler are identical across ranks: rank 0 writes them
        ckpt.save(trainer.step, None, {"rng": rng_state()}, write=write)
        return
    state = {"trainer": trainer.state_dict(), "rng": rng_state()}
    ckpt.save(trainer.step, None, {**state, "world_size": distributed.world_size()}, write=write)


def _train(trainer: Trainer, cfg, stage: str, writer, save_now, stop) -> bool:
    """Steps to the end (True) or to a stop request (False, after a checkpoint)."""
    bar = tqdm(
        total=trainer.total_steps,
        initial=trainer.step,
        desc=stage,
        disable=not cfg.log.progress or distributed.rank() > 0,
        dynamic_ncols=True,
    )
    try:
        while trainer.step < trainer.total_steps and not trainer.should_stop_early():
            t0 = time.perf_counter()
            metrics = trainer.train_step()
            trainer.step += 1
            metrics["time/step_s"] = time.perf_counter() - t0
            if stop is not None:
                stop.observe(metrics["time/step_s"])
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in list(_scalars(metrics).items())[:3]})
            if trainer.step % cfg.train.log_every == 0 or trainer.step == trainer.total_steps:
                writer.log(trainer.step, metrics)
            every = cfg.checkpoint.every_steps
            if every and trainer.step % every == 0 and trainer.step < trainer.total_steps:
                save_now()
            if distributed.any_rank(stop is not None and stop.requested):
                save_now()
                return False
        return True
    finally:
        bar.close()


def _finish(trainer: Trainer, cfg, run_dir: Path, stage: str, writer) -> dict:
    """Evaluate, export and summarise (collective; rank 0 writes)."""
    summary_file = run_dir / "summary.json"
    summary = trainer.evaluate_final(run_dir)  # every rank evaluates its share
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
        run_id=f"{stage}-{run_dir.name.rsplit('-', 1)[-1]}",
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

    def close(self) -> None:
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
