"""The trained actor and the frozen models: plain PyTorch, or DeepSpeed engines (ZeRO 0–3, offload).

One typed interface, :class:`Engine`, so the trainers and the loop read the same at world size 1
and N, with or without DeepSpeed (no trainer asks which one it has):

- ``actor.forward_module``: what training forwards call (the engine under DeepSpeed);
  ``actor.module``: the bare model, for generation, evaluation, and forwards through submodules (the RM's score head).
  ZeRO counts micro-batches at the start of the engine's forward; a forward through the bare
  module skips that, and ZeRO-3 then overwrites instead of accumulating the earlier micro-batches'
  gradients (measured: only the last one survived). ``backward`` therefore closes each micro-batch
  itself, so either forward is correct.
- ``actor.backward(loss)`` once per micro-batch; ``actor.step() -> grad_norm`` once per step.
  The loss of every micro-batch already carries the *global* normaliser (tokens or rows of the
  whole batch across ranks), so the micro-batches' and ranks' gradients must be **summed**:
  plain PyTorch sums them by hand (``distributed.all_reduce_grads``); DeepSpeed averages over ranks
  and divides by the accumulation steps, so the loss is scaled by the world size and handed over
  with ``scale_wrt_gas=False``.
- ``actor.generation()``: the context a rollout decodes in. Under ZeRO-3 it gathers the actor's
  parameters once per rollout instead of once per decoding step (``deepspeed.gather_for_generation``).
- ``actor.full_state_dict()``: every parameter, consolidated from ZeRO-3 shards (collective; the
  full dict on rank 0 only).
- ``actor.export_weights()``: the weights an export must save instead of the module's own (a
  ZeRO-3 consolidation; None when the module holds them).
- ``actor.save(dir)``/``actor.load(dir)``: the engine's state inside the run's ``step_<N>/``.
  Plain PyTorch: ``model.safetensors`` (the actor; other engines ``<name>.safetensors``) and
  ``<name>_optimizer.pt`` (optimizer and scheduler), written by rank 0 (identical on every rank).
  DeepSpeed: the engine's own files (each rank's ZeRO shards of the fp32 master weights, optimizer,
  scheduler) under ``deepspeed/<name>/``.

``frozen(model, ...)`` places the reference and the reward model: as they are, or as ZeRO-3
inference engines (parameters sharded across ranks, optionally in CPU memory), as the release does.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file

from remax import distributed
from remax.checkpoint import save_weights
from remax.config import DeepSpeedConfig, DType, OptimConfig, TrainConfig, deepspeed_json
from remax.master_weights import MasterWeights
from remax.optim import build_optimizer, optimizer_step

ENGINE_DIR = "deepspeed"  # inside checkpoints/step_<N>/
_ENGINES: list = []  # every DeepSpeed engine of this process, for close_all()


class Engine(Protocol):
    """A trained model with its optimizer, plain or DeepSpeed (see the module docstring)."""

    name: str
    module: torch.nn.Module
    forward_module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    @property
    def lr(self) -> float: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> float:
        """One optimizer step; the pre-clip gradient norm."""

    def generation(self) -> contextlib.AbstractContextManager: ...

    def all_finished(self, done: bool) -> bool: ...

    def full_state_dict(self) -> dict[str, torch.Tensor]: ...

    def export_weights(self) -> dict[str, torch.Tensor] | None: ...

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...


class TorchActor:
    """Plain PyTorch: AdamW, the LR schedule, gradients summed over ranks by hand."""

    def __init__(self, model, optim: OptimConfig, total_steps: int, name: str = "actor") -> None:
        self.name = name
        self.forward_module = self.module = model
        self.grad_clip = optim.grad_clip
        # bf16 weights: the optimizer steps fp32 copies (remax.master_weights); fp32: the weights.
        self.master = MasterWeights(model)
        self.optimizer, self.scheduler = build_optimizer(self.master.params, optim, total_steps)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        # Summed, not averaged: each rank's loss already carries the global normaliser. Every
        # rank then clips and steps on the same gradient and keeps the same weights.
        distributed.all_reduce_grads(self.module.parameters())
        self.master.grads_to_master()
        norm = optimizer_step(self.master.params, self.optimizer, self.scheduler, self.grad_clip)
        self.master.copy_to_model()
        return norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def generation(self):
        return contextlib.nullcontext()

    def all_finished(self, done: bool) -> bool:
        return done  # plain forwards have no collectives: each rank stops on its own

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def export_weights(self) -> None:
        return None  # the module holds them

    def _files(self, directory: Path) -> tuple[Path, Path]:
        weights = "model.safetensors" if self.name == "actor" else f"{self.name}.safetensors"
        return Path(directory) / weights, Path(directory) / f"{self.name}_optimizer.pt"

    def save(self, directory: Path) -> None:
        if distributed.rank():  # weights and optimizer are identical on every rank
            return
        weights, optimizer = self._files(directory)
        save_weights(trained_state(self.module), weights)
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.master.active:  # the fp32 copies: not derivable from the bf16 weights
            state["master"] = self.master.state_dict()
        torch.save(state, optimizer)

    def load(self, directory: Path) -> None:
        weights, optimizer = self._files(directory)
        if not weights.is_file():
            raise ValueError(
                f"{directory} holds no plain PyTorch weights ({weights.name} is missing): it was "
                "written with deepspeed.enabled=true; resume with the same deepspeed setting"
            )
        device = next(self.module.parameters()).device
        load_trained_state(self.module, load_file(weights, device=str(device)))
        state = torch.load(optimizer, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.master.active:
            self.master.load_state_dict(state["master"])


class DeepSpeedActor:
    """A DeepSpeed engine around the actor: ZeRO stage, offload and bf16 from ``DeepSpeedConfig``.

    The optimizer is the client's AdamW (``torch.optim.AdamW``; ``DeepSpeedCPUAdam`` when the
    optimizer state is offloaded, whose op DeepSpeed JIT-builds once per ``TORCH_EXTENSIONS_DIR``),
    the schedule the same LambdaLR as plain PyTorch, so both paths take the same steps.
    """

    def __init__(
        self,
        model,
        ds: DeepSpeedConfig,
        *,
        optim: OptimConfig,
        train: TrainConfig,
        dtype: DType,
        total_steps: int,
        rows_per_prompt: int = 1,
        name: str = "actor",
    ) -> None:
        import deepspeed

        distributed.ensure_process_group()
        self.ds, self.name = ds, name
        self.world_size = distributed.world_size()
        config = deepspeed_json(
            ds,
            optim=optim,
            train=train,
            dtype=dtype,
            world_size=self.world_size,
            rows_per_prompt=rows_per_prompt,
        )
        self.grad_accum = train.rank_grad_accum(self.world_size)
        optimizer, scheduler = _client_optimizer(model, ds, optim, total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        _load_weights_only(self.engine)
        _ENGINES.append(self.engine)
        self.forward_module, self.module = self.engine, self.engine.module
        self._micro, self._grad_norm = 0, 0.0

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks (÷ world size) and would divide the loss by the
        # accumulation steps; ours is already this rank's share of the global sum.
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        if self.ds.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
            # ZeRO-0 reports no norm: read it from the all-reduced gradients before the step.
            params = [p for p in self.module.parameters() if p.grad is not None]
            self._grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        self.engine.step()  # a no-op until the accumulation boundary
        if hasattr(self.engine.optimizer, "clear_backward_seen_flag"):
            self.engine.optimizer.clear_backward_seen_flag()  # this micro-batch is accumulated
        self._micro += 1

    def step(self) -> float:
        if self._micro != self.grad_accum:
            raise RuntimeError(
                f"{self._micro} micro-batches in one step, DeepSpeed expects "
                f"{self.grad_accum} (train.batch_size / world size / micro_batch_size)"
            )
        self._micro = 0
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else self._grad_norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def partitioned(self) -> bool:
        return self.ds.zero_stage == 3

    def generation(self):
        if self.partitioned and self.ds.gather_for_generation:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.module.parameters()))
        return contextlib.nullcontext()

    def all_finished(self, done: bool) -> bool:
        # ZeRO-3 forwards (the actor's or the frozen models') are collective: stop together.
        return not distributed.any_rank(not done)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.partitioned:  # collective: every rank sends its shards, rank 0 holds the result
            return self.engine._zero3_consolidated_16bit_state_dict() or {}
        return self.module.state_dict()

    def export_weights(self) -> dict[str, torch.Tensor] | None:
        return self.full_state_dict() if self.partitioned else None

    def save(self, directory: Path) -> None:
        """Every rank writes its shards into ``directory/deepspeed/`` (collective)."""
        self.engine.save_checkpoint(
            str(Path(directory) / ENGINE_DIR),
            tag=self.name,
            save_latest=False,
            exclude_frozen_parameters=_has_frozen(self.module),  # LoRA: the adapters alone
        )

    def load(self, directory: Path) -> None:
        path = Path(directory) / ENGINE_DIR
        if not (path / self.name).is_dir():
            raise ValueError(
                f"{directory} holds no DeepSpeed engine state ({path / self.name} is missing): it was "
                "written without deepspeed=...; resume with the same deepspeed setting"
            )
        loaded, _ = self.engine.load_checkpoint(
            str(path),
            tag=self.name,
            load_module_strict=not _has_frozen(self.module),  # frozen weights: from the base
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if loaded is None:
            raise ValueError(f"DeepSpeed could not load its engine state from {path / self.name}")


def _has_frozen(module: torch.nn.Module) -> bool:
    return any(not p.requires_grad for p in module.parameters())


def trained_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of ``module``: its whole state, or with frozen weights (LoRA's
    base) the trainable parameters alone (adapters and head): the base is loaded from
    ``model.path``, and its hash in the checkpoint says it is the same one (``remax.models.lora``)."""
    if not _has_frozen(module):
        return module.state_dict()
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def load_trained_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load what :func:`trained_state` saved; every trainable tensor must be there."""
    if not _has_frozen(module):
        module.load_state_dict(state)
        return
    wanted = set(trained_state(module))
    if set(state) != wanted:
        raise ValueError(
            f"checkpoint holds {len(state)} trainable tensors, the model has {len(wanted)} "
            f"(differing: {sorted(set(state) ^ wanted)[:3]}): resume with the same model.lora"
        )
    module.load_state_dict(state, strict=False)


def build_actor(
    model,
    cfg,
    total_steps: int,
    rows_per_prompt: int = 1,
    *,
    optim: OptimConfig | None = None,
    train: TrainConfig | None = None,
    name: str = "actor",
):
    """A trained model of a stage config (``cfg.deepspeed``, ``cfg.model``), with ``cfg.optim`` and
    ``cfg.train`` or others (PPO's critic optimizer; PPO's minibatch as the engine's batch).
    ``name`` tags its engine files (``step_<N>/deepspeed/<name>/``)."""
    optim, train = optim or cfg.optim, train or cfg.train
    if not cfg.deepspeed.enabled:
        return TorchActor(model, optim, total_steps, name=name)
    return DeepSpeedActor(
        model,
        cfg.deepspeed,
        optim=optim,
        train=train,
        dtype=cfg.model.dtype,
        total_steps=total_steps,
        rows_per_prompt=rows_per_prompt,
        name=name,
    )


def frozen(model, ds: DeepSpeedConfig, *, train: TrainConfig, dtype: DType):
    """A frozen model (reference, reward model) placed for inference; returns the module to call.

    ZeRO-3 (``deepspeed.inference_zero_stage=3``): parameters sharded across ranks (in CPU memory
    with ``inference_offload_params``), gathered layer by layer during each forward — every rank must then
    run the same number of forwards. Stages 0–2 hold nothing to shard without an optimizer: the
    model stays replicated as it is.
    """
    if not isinstance(model, torch.nn.Module):
        return model  # a view of the actor (LoRA's reference: adapters off), placed with it
    model.eval().requires_grad_(False)
    if not ds.enabled or ds.inference_zero_stage != 3:
        return model
    import deepspeed

    distributed.ensure_process_group()
    config = deepspeed_json(
        ds,
        optim=OptimConfig(),
        train=train,
        dtype=dtype,
        world_size=distributed.world_size(),
        inference=True,
    )
    engine, *_ = deepspeed.initialize(model=model, config=config)
    _ENGINES.append(engine)
    return engine.module


def close_all() -> None:
    """Destroy this process's DeepSpeed engines; call before it exits.

    A ZeRO-3 engine still alive at interpreter exit aborts the process ("terminate called without
    an active exception", SIGABRT) in about 4 of 10 two-rank runs here, which would turn a finished
    Slurm task into a failed one; destroyed first, 0 of 10.
    """
    import gc

    while _ENGINES:
        _ENGINES.pop().destroy()
    gc.collect()


def _client_optimizer(model, ds: DeepSpeedConfig, optim: OptimConfig, total_steps: int):
    optimizer, scheduler = build_optimizer(model, optim, total_steps)
    if not ds.offload_optimizer:
        return optimizer, scheduler
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    params = [p for p in model.parameters() if p.requires_grad]
    cpu_adam = DeepSpeedCPUAdam(
        params,
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        adamw_mode=True,
    )
    # The same schedule, rebuilt on the offloaded optimizer (LambdaLR binds to one optimizer).
    return cpu_adam, torch.optim.lr_scheduler.LambdaLR(cpu_adam, scheduler.lr_lambdas[0])


def _load_weights_only(engine) -> None:
    """DeepSpeed's loader unpickles anything (``weights_only=False``); ours refuses code objects.

    Its checkpoints hold tensors, dicts and a few DeepSpeed/torch value types, which are allowed
    by name; anything else in a checkpoint fails to load instead of running.
    """
    ckpt_engine = engine.checkpoint_engine

    def load(path, map_location=None):
        with torch.serialization.safe_globals(_checkpoint_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    ckpt_engine.load = load


def _checkpoint_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]
