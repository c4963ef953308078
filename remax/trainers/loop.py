"""The loop every stage shares: resume, step, log, checkpoint, export.

A trainer (composition, no base class) provides ``model``, ``tokenizer``, ``step`` (optimizer
steps done), ``total_steps``, ``train_step() -> metrics``, ``state_dict()``/``load_state_dict()``
(everything but the model weights), ``evaluate_final() -> summary`` and ``export_model() ->
(module, state_dict | None)``. A trainer whose weights live in engines (``trainer.actor``, and
PPO's ``trainer.critic_actor``, with ``uses_deepspeed``; see ``remax.engines``) has them write and
read their own files inside each ``step_<N>/``. The loop owns the run directory: ``checkpoints/step_<N>/``, ``metrics.jsonl``,
``export/``, ``summary.json``.

At world size N > 1 every rank runs this loop in lockstep; rank 0 alone writes metrics, the
export and the summary, every rank writes its part of each checkpoint, evaluates its share in
``evaluate_final`` and takes part in the export (a ZeRO-3 gather), and a stop request on any rank
stops all of them at the same step boundary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from remax import distributed, ledger, preemption, watchdog
from remax.checkpoint import CheckpointManager, export_hf, rng_state, set_rng_state
from remax.config import OptimConfig, Scheduler
from remax.log import MetricWriter
from remax.preemption import StopRequest
from remax.run_dir import to_plain
from remax.saving import Saver

log = logging.getLogger("remax.loop")


def select_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, total_steps: int):
    """AdamW (release: Adam betas (0.9, 0.95)) and the learning-rate schedule over ``total_steps``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
    )

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.scheduler == Scheduler.constant:
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def optimizer_step(model, opt, sched, grad_clip: float) -> float:
    """Clip, step, schedule; returns the pre-clip gradient norm."""
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


def mean_stderr(values: torch.Tensor) -> dict:
    """``{"mean", "stderr", "n"}`` of a 1-D sample (stderr = sample std / sqrt(n))."""
    v = values.detach().double().cpu()
    n = v.numel()
    std = float(v.std(unbiased=True)) if n > 1 else 0.0
    return {"mean": float(v.mean()), "stderr": std / math.sqrt(n) if n else 0.0, "n": n}


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)


# The loop's stop request type; the old name stays for callers that only set a flag.
StopFlag = StopRequest


def run(trainer, cfg, run_dir: Path, stage: str, *, stop: StopRequest | None = None) -> dict | None:
    """Train to ``trainer.total_steps`` from the latest checkpoint; export and summarise.

    Returns the summary, or None when stopped early by ``stop`` (after checkpointing when the
    save still fits before the kill; the job layer then requeues).
    """
    ckpt = CheckpointManager(run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last)
    summary_file = run_dir / "summary.json"
    if summary_file.exists():
        log.info("%s already complete: %s", stage, summary_file)
        return json.loads(summary_file.read_text())
    rank, world = distributed.rank(), distributed.world_size()
    engines = _engines(trainer)
    timing = _resume(trainer, ckpt, engines, stage, rank, world)
    ledger.note_resume(trainer.step)
    writer = (
        _NullWriter()
        if rank
        else MetricWriter(
            run_dir,
            run_id=f"{stage}-{run_dir.name.rsplit('-', 1)[-1]}",
            stage=stage,
            config=to_plain(cfg),
            resume_step=trainer.step,
            wandb_mode=cfg.log.wandb_mode,
            project=cfg.log.wandb_project,
            entity=cfg.log.wandb_entity,
            group=cfg.log.wandb_group or cfg.run.name,
        )
    )

    def write(step: int) -> None:
        def write_engines(directory: Path) -> None:
            for engine in engines:
                engine.save(directory)

        if rank:  # weights, optimizer, sampler are identical across ranks: rank 0 writes them
            ckpt.save(step, None, {"rng": rng_state()}, write=write_engines)
            return
        state = {"trainer": trainer.state_dict(), "rng": rng_state(), "world_size": world}
        state["timing"] = saver.timing()
        weights = None if engines else trainer.model.state_dict()
        ckpt.save(step, weights, state, write=write_engines)

    saver = Saver(cfg.checkpoint, write, stop, resumed_step=trainer.step)
    saver.restore_timing(timing, getattr(getattr(cfg, "cluster", None), "signal_delay_s", None))
    stopped = False
    try:
        stopped = not _train(trainer, cfg, run_dir, stage, writer, saver, stop)
        if stopped:
            return None
        saver.save(trainer.step)
        summary = trainer.evaluate_final(run_dir)  # collective: every rank evaluates its share
        watchdog.beat("export", trainer.step)
        if distributed.any_rank(stop is not None and stop.requested):
            stopped = True  # the export may not fit before the kill: the next segment redoes it
            return None
        return _finish(trainer, cfg, run_dir, stage, writer, summary)
    except preemption.Stopped:  # raised between evaluation batches (periodic or final eval)
        stopped = True
        _save_if_it_fits(saver, trainer.step, stop)
        return None
    finally:
        # Before a requeue W&B gets a short bound: the kill is coming, the offline files suffice.
        writer.close(timeout_s=10 if stopped else None)


def _resume(trainer, ckpt, engines, stage: str, rank: int, world: int) -> dict:
    """Load the newest intact checkpoint, if any; returns its save timing."""
    latest = ckpt.latest_intact() if rank == 0 else None
    if world > 1:  # rank 0 verified (and quarantined); everyone resumes from its choice
        chosen = distributed.sum_over_ranks({"step": _step_of(latest) + 1})["step"] - 1
        latest = ckpt.root / f"step_{int(chosen)}" if chosen >= 0 else None
    if latest is None:
        return {}
    device = next(trainer.model.parameters()).device
    model_state, state = CheckpointManager.load(latest, device, rank=rank)
    if state.get("world_size", 1) != world:
        raise ValueError(
            f"{latest} was written by {state.get('world_size', 1)} ranks, this run has {world}: "
            "resume with the same number of ranks (each rank's RNG stream is in the checkpoint)"
        )
    for engine in engines:  # weights, optimizer and scheduler, each rank its shards
        engine.load(latest)
    if not engines:
        trainer.model.load_state_dict(model_state)
    trainer.load_state_dict(state["trainer"])
    set_rng_state(state["rng"])
    log.info("resumed %s from %s (step %d)", stage, latest, trainer.step)
    return state.get("timing", {})


def _step_of(path: Path | None) -> int:
    return int(path.name.split("_")[1]) if path is not None else -1


def _train(trainer, cfg, run_dir: Path, stage: str, writer, saver: Saver, stop) -> bool:
    """Steps until the end (True) or a stop request (False, after a save that fits)."""
    rank = distributed.rank()
    bar = tqdm(
        total=trainer.total_steps,
        initial=trainer.step,
        desc=stage,
        disable=not cfg.log.progress or rank > 0,
        dynamic_ncols=True,
    )
    try:
        trainer.before_training(run_dir)
        while trainer.step < trainer.total_steps and not _eval_boundary(trainer, cfg, stop):
            t0 = time.perf_counter()
            metrics = trainer.train_step()
            trainer.step += 1
            ledger.note_step(trainer.step)
            watchdog.beat("step", trainer.step)
            metrics["time/step_s"] = time.perf_counter() - t0
            if stop is not None and hasattr(stop, "observe"):
                stop.observe(metrics["time/step_s"])  # the deadline stop leaves room for one step
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in list(_scalars(metrics).items())[:3]})
            if trainer.step % cfg.train.log_every == 0 or trainer.step == trainer.total_steps:
                writer.log(trainer.step, metrics)
            if saver.due(trainer.step, trainer.total_steps):
                saver.save(trainer.step)
            if distributed.any_rank(stop is not None and stop.requested):
                _save_if_it_fits(saver, trainer.step, stop)
                return False
        return True
    finally:
        bar.close()


def _eval_boundary(trainer, cfg, stop) -> bool:
    """``trainer.should_stop_early()`` (where the periodic eval runs), timed for the deadline."""
    every = cfg.train.eval_every
    due = bool(every) and trainer.step > 0 and trainer.step % every == 0
    t0 = time.perf_counter()
    early = trainer.should_stop_early()
    watchdog.beat("step", trainer.step)
    if due and stop is not None and hasattr(stop, "observe_eval"):
        stop.observe_eval(time.perf_counter() - t0)
    if stop is not None and hasattr(stop, "eval_due"):
        stop.eval_due = bool(every) and (trainer.step + 1) % every == 0
    return early


def _save_if_it_fits(saver: Saver, step: int, stop) -> None:
    """On a stop: save, unless the measured save would not finish before the kill (then the
    requeue alone keeps the chain alive; the steps since the last checkpoint are redone)."""
    fits = stop is None or not hasattr(stop, "can_save") or stop.can_save()
    if distributed.any_rank(not fits):
        log.warning("stop at step %d: no time to save (%.0f s measured)", step, saver.save_s)
        return
    saver.save(step)


def _finish(trainer, cfg, run_dir: Path, stage: str, writer, summary: dict) -> dict:
    """Export (collective under ZeRO-3) and the summary; rank 0 writes both."""
    module, weights = trainer.export_model(run_dir)
    summary_file = run_dir / "summary.json"
    if distributed.rank():
        distributed.barrier()  # rank 0 writes the export and the summary
        return json.loads(summary_file.read_text())
    writer.summary(summary)
    export_hf(
        module,
        trainer.tokenizer,
        run_dir / "export",
        {"stage": stage, "step": trainer.step, "config": to_plain(cfg), "versions": _versions()},
        state_dict=weights,
    )
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


def _engines(trainer) -> list:
    """The trainer's DeepSpeed-backed trained models: ``trainer.actor`` (every stage) and
    ``trainer.critic_actor`` (PPO)."""
    models = [getattr(trainer, name, None) for name in ("actor", "critic_actor")]
    return [m for m in models if m is not None and m.uses_deepspeed]


class _NullWriter:
    """Ranks other than 0 log nothing: their metrics are already all-reduced into rank 0's."""

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
