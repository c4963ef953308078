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

from remax import distributed
from remax.checkpoint import CheckpointManager, export_hf, rng_state, set_rng_state
from remax.config import OptimConfig, Scheduler
from remax.log import MetricWriter
from remax.run_dir import to_plain, wandb_id

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


class StopFlag:
    """Set from a signal handler; the loop checkpoints at the next step boundary and returns."""

    def __init__(self) -> None:
        self.requested = False

    def set(self, *_args) -> None:
        self.requested = True


def run(trainer, cfg, run_dir: Path, stage: str, *, stop: StopFlag | None = None) -> dict | None:
    """Train to ``trainer.total_steps`` from the latest checkpoint; export and summarise.

    Returns the summary, or None when stopped early by ``stop`` (after checkpointing).
    """
    ckpt = CheckpointManager(run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last)
    summary_file = run_dir / "summary.json"
    if summary_file.exists():
        log.info("%s already complete: %s", stage, summary_file)
        return json.loads(summary_file.read_text())
    rank, world = distributed.rank(), distributed.world_size()
    engines = _engines(trainer)
    latest = ckpt.latest()
    if latest is not None:
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

    writer = (
        _NullWriter()
        if rank
        else MetricWriter(
            run_dir,
            run_id=wandb_id(run_dir, stage),
            stage=stage,
            config=to_plain(cfg),
            resume_step=trainer.step,
            wandb_mode=cfg.log.wandb_mode,
            project=cfg.log.wandb_project,
            entity=cfg.log.wandb_entity,
            group=cfg.log.wandb_group or cfg.run.name,
        )
    )

    def save() -> None:
        def write(directory: Path) -> None:
            for engine in engines:
                engine.save(directory)

        if rank:  # weights, optimizer, sampler are identical across ranks: rank 0 writes them
            ckpt.save(trainer.step, None, {"rng": rng_state()}, write=write)
            return
        ckpt.save(
            trainer.step,
            None if engines else trainer.model.state_dict(),
            {"trainer": trainer.state_dict(), "rng": rng_state(), "world_size": world},
            write=write,
        )

    try:
        trainer.before_training(run_dir)
        bar = tqdm(
            total=trainer.total_steps,
            initial=trainer.step,
            desc=stage,
            disable=not cfg.log.progress or rank > 0,
            dynamic_ncols=True,
        )
        while trainer.step < trainer.total_steps and not trainer.should_stop_early():
            t0 = time.perf_counter()
            metrics = trainer.train_step()
            trainer.step += 1
            metrics["time/step_s"] = time.perf_counter() - t0
            if stop is not None and hasattr(stop, "observe"):
                stop.observe(metrics["time/step_s"])  # lets a deadline stop leave room for one step
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in list(_scalars(metrics).items())[:3]})
            if trainer.step % cfg.train.log_every == 0 or trainer.step == trainer.total_steps:
                writer.log(trainer.step, metrics)
            every = cfg.checkpoint.every_steps
            if every and trainer.step % every == 0 and trainer.step < trainer.total_steps:
                save()
            if distributed.any_rank(stop is not None and stop.requested):
                save()
                bar.close()
                return None
        bar.close()
        save()
        summary = trainer.evaluate_final(run_dir)  # collective: every rank evaluates its share
        module, weights = trainer.export_model(run_dir)  # collective under ZeRO-3: shards gather
        if rank:
            distributed.barrier()  # rank 0 writes the export and the summary
            return json.loads(summary_file.read_text())
        writer.summary(summary)
        export_hf(
            module,
            trainer.tokenizer,
            run_dir / "export",
            {
                "stage": stage,
                "step": trainer.step,
                "config": to_plain(cfg),
                "versions": _versions(),
            },
            state_dict=weights,
        )
        summary = {
            "stage": stage,
            "step": trainer.step,
            "run_dir": str(run_dir),
            "world_size": world,
            **summary,
        }
        write_json(summary_file, summary)
        distributed.barrier()
        return summary
    finally:
        writer.close()


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
