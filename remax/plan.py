"""Per-GPU memory planner for one RLHF step (ReMax vs PPO) under DeepSpeed ZeRO.

Pure arithmetic (stdlib only). It answers "does this placement fit on an 80 GiB GPU, and what is the
largest per-GPU batch that does?" for the layouts of the official ReMax release (DeepSpeed-Chat step 3):
an actor trained with ZeRO-2 and gradient checkpointing, a frozen reference and a frozen reward model
at ZeRO-3, and, for PPO, a critic with the actor's settings initialised from the reward model.
The release's steps 1-2 (one trained model: the SFT policy, role ``sft``, or the reward model being
trained, role ``rm``) are the same arithmetic with ``PlanInput.rollout=False``: no generation and no
experience phase, only the resident states, ``train:<role>`` and ``step:<role>``.

All quantities are bytes per GPU (integers); GiB = 2**30 bytes. N = parameters of a model, W = world
size (data-parallel GPUs), d = ``dtype_bytes`` (2 for bf16/fp16, 4 for fp32), b = micro-batch,
g = generation batch, s = prompt_len + response_len, h/a/L/V = hidden size, heads, layers, vocab.

Model states (resident for the whole step)
------------------------------------------
- parameters: d·N at ZeRO-0/1/2, d·⌈N/W⌉ at ZeRO-3, 0 at ZeRO-3 with ``offload_params``.
- gradients (trainable only): d·N at ZeRO-0/1, d·⌈N/W⌉ at ZeRO-2/3; 0 with ``offload_optimizer``
  (ZeRO-Offload reduces gradients straight into pinned CPU buffers; only the reduce bucket below stays).
- optimizer (trainable only): Adam with mixed precision keeps an fp32 master copy + m + v = 12 bytes/param
  (``d == 2``); pure fp32 keeps only m + v = 8 bytes/param (``d == 4``). Partitioned (÷W, ceil) at
  ZeRO ≥ 1; 0 with ``offload_optimizer``.

Transient parts, each alive in one phase of the step
----------------------------------------------------
- ``generation`` (actor, ``generate``): kv_cache = 2·L·kv_heads·head_dim·s·g·d; the fp32 last-position
  logits g·V·4; the prompt pre-fill working set (one layer's activations at prompt_len, formula below).
  ReMax decodes twice (sampled, then greedy), one after the other, so the KV cache is not doubled.
- ``experience`` (no-grad forwards of every model on the sampled sequence; the RM also on the greedy one):
  fp32 B×L×V logits of the actor and the reference, both held at once (2 copies), plus the
  log-softmax work: with ``full_vocab_logging`` (the release logs exact full-vocabulary KL and entropy)
  the peak holds 5 more copies (actor log-softmax, its exp, the entropy product, reference
  log-softmax, the KL difference/product), i.e. 7 copies of g·s·V·4 bytes; without it, 1 more (one
  log-softmax at a time before the gather), i.e. 3 copies. Plus the largest per-model forward working
  set: one ZeRO-3 gathered unit (below) + one layer's activations at batch g.
- ``train:<role>`` (forward + backward of a trainable model at micro-batch b):
  activations, after Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
  Models", no tensor/sequence parallelism): one layer without recomputation keeps
  s·b·h·(34 + 5·a·s/h) bytes in 16-bit, i.e. the integer s·b·(34·h + 5·a·s), scaled by d/2.
  Without gradient checkpointing: L times that. With full checkpointing: each layer keeps only its
  16-bit input, s·b·h·d (= 2·s·b·h in bf16), and the backward re-materialises one layer at a time,
  so L·s·b·h·d + one full layer. The formula assumes a 4h MLP and eager attention (the 5·a·s/h term is
  the attention-score matrix, which FlashAttention would remove); it is a standard estimate, not a
  measurement. Vocabulary models (actor) add the loss logits: 4 fp32 B×L×V copies (the fp32 logits
  held by the caller, the saved log-softmax output, and at the log-softmax backward its incoming and
  outgoing gradients). ZeRO-2/3 add the contiguous reduce bucket: min(N, 5e8)·d (DeepSpeed's default
  ``reduce_bucket_size``). ZeRO-3 adds one gathered unit.
- ``step:<role>`` (optimizer step of a trainable model on GPU, mixed precision only): DeepSpeed's ZeRO
  optimizer flattens the 16-bit gradient partition and casts it to fp32 before Adam
  (``flatten(averaged_gradients).to(fp32)``), i.e. (2 + 4)·P bytes where P is the partition size
  (⌈N/W⌉ at ZeRO-1/2, N at ZeRO-0, min(⌈N/W⌉, 1e9 sub-group) at ZeRO-3). 0 with optimizer offload
  (the step runs on the CPU) and in pure fp32.
- ZeRO-3 gathered unit: a ZeRO-3 model gathers one module at a time for its forward (prefetching is
  ignored): d·max(V·h, (N − embedding parameters)/L), the larger of the embedding matrix and one
  decoder layer. It appears in every phase where that model runs, also when its parameters are offloaded.

Total and verdict
-----------------
total = overhead + Σ resident parts + max over phases of Σ transient parts in that phase. Phases run one
after another, so their transients are not added together. ``fits`` means total ≤ ``gpu_memory_gib``;
"OOM" means the estimated peak exceeds it. ``overhead_gib`` (default 3.0) covers what is not a tensor of
the step: the CUDA context with cuBLAS/cuDNN workspaces (about 0.5-1 GiB per process on A100/A800),
NCCL communicator buffers for DeepSpeed's process groups (a few hundred MiB) and PyTorch caching-allocator
fragmentation (typically a few per cent of the ~40-80 GiB reserved, 1-2 GiB). Note that an "80 GB"
A100/A800 reports about 79.3 GiB to PyTorch; ``gpu_memory_gib`` defaults to the nominal 80.

vLLM rollouts (``vllm_kv_cache_gib`` set, ``rollout.engine=vllm``): the actor's generation phase is
vLLM's instead of HF ``generate``'s: its own copy of the actor's weights (N·d) and its KV-cache budget
(``rollout.kv_cache_gib``), plus, at ZeRO-3, the whole actor gathered once for the weight push (N·d). With sleep mode
(``rollout.sleep``, GPUs) both are released while the actor trains, so they are a generation
transient; without it they are resident. The weights reach the engine by one of two routes
(``rollout.push``, ``remax.rollout.vllm.push_route``): ``direct`` (CUDA, and one CPU rank: parameter by
parameter from the actor into the engine, no extra buffer beyond the ZeRO-3 gather above) or ``file``
(the CPU build with several ranks, ``remax.rollout.vllm``:
each rank copies its full state dict to the CPU, N·d, and writes it as one safetensors file in
``/dev/shm``, N·d more, which stays there between steps). The file route puts nothing on the GPU;
per node it holds ``ranks_per_node`` × 2·N·d at each push (tmpfs counts against Slurm's memory
cgroup: 7B in bf16 × 4 ranks is 54 GB of files, 108 GB at the push). ``node_push_fits`` compares
that with ``node_memory_gib``; the rest of the node's CPU memory is not modelled, so it is a
lower bound.

Not modelled: DeepSpeed hybrid-engine inference workspaces, HF ``generate``'s KV-cache concatenation
copies, CPU memory, pipeline/tensor parallelism.

LoRA (``model.lora.rank`` > 0, ``remax.plan_lora``): the trained model's base weights are frozen and
stored once in the model dtype (partitioned at ZeRO-3 like any parameter), the adapters are stored
beside them (r·(in + out) per targeted linear, in the model dtype: DeepSpeed casts the module), and
gradients, Adam states, the step transient and the reduce bucket count only the trainable
parameters (the adapters, plus the score head of a trained RM). Activations are as without
adapters (their r-wide intermediates are ignored). The reference policy is the actor with its
adapters disabled: an RL plan with a LoRA actor has no ``reference`` model, but the experience
phase still holds the reference's logits (counted on the actor). PPO's critic is trained in full
(there is no critic LoRA switch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum

from remax.config.rollout import PushRoute
from remax.plan_lora import adapter_params

GIB = 1024**3

# ``reward`` is the frozen RM of an RL step; ``rm`` the reward model trained in the RM stage.
ROLES = ("actor", "reference", "reward", "critic", "sft", "rm")
FROZEN_ROLES = ("reference", "reward")
VOCAB_ROLES = ("actor", "reference")  # models whose B×L×V logits are materialised

ADAM_BYTES_MIXED = 12  # fp32 master weights + Adam m + Adam v
ADAM_BYTES_FP32 = 8  # Adam m + v; the fp32 weights are the master copy
STEP_BYTES_PER_ELEMENT = 2 + 4  # 16-bit flattened gradient partition + its fp32 cast
REDUCE_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed default zero_optimization.reduce_bucket_size
ZERO3_SUB_GROUP_ELEMENTS = 1_000_000_000  # DeepSpeed default zero_optimization.sub_group_size
LOGIT_BYTES = 4  # logits and log-softmax in fp32
TRAIN_LOGIT_COPIES = 4
EXPERIENCE_EXTRA_COPIES_FULL_VOCAB = 5
EXPERIENCE_EXTRA_COPIES_GATHER = 1
DEFAULT_OVERHEAD_GIB = 3.0

RESIDENT = "resident"
GENERATION = "generation"
EXPERIENCE = "experience"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------------
# model shapes
# --------------------------------------------------------------------------------------------------

_LLAMA2_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
_MISTRAL_7B = {
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
_OPT_1_3B = {
    "model_type": "opt",
    "hidden_size": 2048,
    "ffn_dim": 8192,
    "num_attention_heads": 32,
    "num_hidden_layers": 24,
    "vocab_size": 50272,
    "max_position_embeddings": 2048,
    "word_embed_proj_dim": 2048,
    "do_layer_norm_before": True,
}
_OPT_350M = {
    "model_type": "opt",
    "hidden_size": 1024,
    "ffn_dim": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "vocab_size": 50272,
    "max_position_embeddings": 2048,
    "word_embed_proj_dim": 512,
    "do_layer_norm_before": False,
}
# Llama-2-13B, meta-llama/Llama-2-13b-hf config.json (Touvron et al. 2023, Table 1: 13B, no GQA):
# the backbone of UltraRM-13B ("UltraRM is initialized by LLaMA2-13B", OpenBMB/UltraFeedback README).
_LLAMA2_13B = {
    "model_type": "llama",
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_attention_heads": 40,
    "num_hidden_layers": 40,
    "num_key_value_heads": 40,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
# Llama-2-70B, meta-llama/Llama-2-70b-hf config.json (Touvron et al. 2023, Table 1: 70B with GQA).
_LLAMA2_70B = {
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """Architecture numbers the planner needs. ``lm_head`` is False for a value model (RM, critic)."""

    n_params: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    intermediate_size: int
    tie_word_embeddings: bool = False
    lm_head: bool = True
    name: str = ""
    model_type: str = "llama"
    """``llama``, ``mistral`` or ``opt``: which linears a decoder layer has (LoRA targets)."""

    def __post_init__(self) -> None:
        for f in (
            "n_params",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "vocab_size",
        ):
            if getattr(self, f) <= 0:
                raise ValueError(f"ModelShape.{f} must be positive, got {getattr(self, f)}")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer, ≈ (N − embedding/LM-head matrices) / L (norms included)."""
        n_matrices = 2 if (self.lm_head and not self.tie_word_embeddings) else 1
        return _ceil_div(
            max(self.n_params - n_matrices * self.embedding_params, 0), self.num_layers
        )

    @property
    def gathered_unit_params(self) -> int:
        """Largest module a ZeRO-3 forward gathers at once: the embedding or one decoder layer."""
        return max(self.embedding_params, self.layer_params)

    def as_value_model(self) -> ModelShape:
        """The DeepSpeed-Chat reward/critic: the backbone without LM head + a bias-free h→1 value head."""
        if not self.lm_head:
            return self
        n = self.n_params + self.hidden_size
        if not self.tie_word_embeddings:
            n -= self.embedding_params
        name = f"{self.name}-value" if self.name else ""
        return replace(self, n_params=n, lm_head=False, name=name)

    # presets -------------------------------------------------------------------------------------
    @classmethod
    def llama2_7b(cls) -> ModelShape:
        return cls.from_hf_config(_LLAMA2_7B, name="llama2-7b")

    @classmethod
    def llama2_13b(cls) -> ModelShape:
        return cls.from_hf_config(_LLAMA2_13B, name="llama2-13b")

    @classmethod
    def llama2_70b(cls) -> ModelShape:
        return cls.from_hf_config(_LLAMA2_70B, name="llama2-70b")

    @classmethod
    def mistral_7b(cls) -> ModelShape:
        return cls.from_hf_config(_MISTRAL_7B, name="mistral-7b")

    @classmethod
    def opt_1_3b(cls) -> ModelShape:
        return cls.from_hf_config(_OPT_1_3B, name="opt-1.3b")

    @classmethod
    def opt_350m(cls) -> ModelShape:
        return cls.from_hf_config(_OPT_350M, name="opt-350m")

    @classmethod
    def ultrarm_13b(cls) -> ModelShape:
        """openbmb/UltraRM-13b: a Llama-2-13B backbone (no LM head) + a bias-free 5120→1
        ``regression_head``, i.e. Llama-2-13B as a value model (the RM of the Mistral-7B-ReMax card)."""
        return replace(cls.from_hf_config(_LLAMA2_13B).as_value_model(), name="ultrarm-13b")

    @classmethod
    def from_hf_config(cls, config: Mapping, *, name: str = "") -> ModelShape:
        """Shape from a Hugging Face ``config.json`` dict (Llama/Mistral-style or OPT-style decoders).

        Llama/Mistral: per layer q (h·a·hd) + k, v (h·kv·hd each) + o (a·hd·h) [+ biases if
        ``attention_bias``] + gated MLP 3·h·I [+ biases if ``mlp_bias``] + 2 RMSNorm weights (2h);
        plus the final norm (h), the embedding V·h and, untied, the LM head V·h.
        OPT: embedding V·e (e = word_embed_proj_dim), learned positions (max_pos + 2)·h, project_in/out
        2·e·h when e ≠ h; per layer 4 attention projections with bias 4(h² + h), fc1/fc2 2·h·I + I + h,
        2 LayerNorms 4h; the final LayerNorm 2h only when ``do_layer_norm_before``; LM head tied.
        """
        h = int(config["hidden_size"])
        n_layers = int(config["num_hidden_layers"])
        n_heads = int(config["num_attention_heads"])
        vocab = int(config["vocab_size"])
        name = name or str(config.get("_name_or_path", config.get("model_type", "")))
        if config.get("model_type") == "opt" or "ffn_dim" in config:
            inter = int(config["ffn_dim"])
            e = int(config.get("word_embed_proj_dim") or h)
            tied = bool(config.get("tie_word_embeddings", True))
            bias = 1 if config.get("enable_bias", True) else 0
            ln = 2 * h if config.get("layer_norm_elementwise_affine", True) else 0
            layer = 4 * h * h + 4 * h * bias + 2 * h * inter + (inter + h) * bias + 2 * ln
            n = vocab * e + (int(config.get("max_position_embeddings", 2048)) + 2) * h
            n += 2 * e * h if e != h else 0
            n += n_layers * layer
            final_ln = config.get("do_layer_norm_before", True) and not config.get(
                "_remove_final_layer_norm", False
            )
            n += ln if final_ln else 0
            n += 0 if tied else vocab * e
            return cls(
                n_params=n,
                hidden_size=h,
                num_layers=n_layers,
                num_heads=n_heads,
                num_kv_heads=n_heads,
                vocab_size=vocab,
                intermediate_size=inter,
                tie_word_embeddings=tied,
                name=name,
                model_type="opt",
            )
        inter = int(config["intermediate_size"])
        n_kv = int(config.get("num_key_value_heads") or n_heads)
        hd = int(config.get("head_dim") or h // n_heads)
        tied = bool(config.get("tie_word_embeddings", False))
        attn = h * n_heads * hd + 2 * h * n_kv * hd + n_heads * hd * h
        if config.get("attention_bias", False):
            attn += n_heads * hd + 2 * n_kv * hd + h
        mlp = 3 * h * inter + ((2 * inter + h) if config.get("mlp_bias", False) else 0)
        n = n_layers * (attn + mlp + 2 * h) + h + vocab * h * (1 if tied else 2)
        return cls(
            n_params=n,
            hidden_size=h,
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=n_kv,
            vocab_size=vocab,
            intermediate_size=inter,
            tie_word_embeddings=tied,
            name=name,
            model_type=str(config.get("model_type") or "llama"),
        )


# --------------------------------------------------------------------------------------------------
# placements and input
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ModelPlacement:
    """One model of the RLHF step and how DeepSpeed places it."""

    role: str
    shape: ModelShape
    trainable: bool
    zero_stage: int = 0
    offload_params: bool = False
    offload_optimizer: bool = False
    dtype_bytes: int = 2
    grad_checkpointing: bool = False
    adapter_params: int = 0
    """LoRA: parameters the adapters add; > 0 freezes the shape's own weights."""
    base_trainable_params: int = 0
    """LoRA: weights of the shape that still train (a trained RM's score head)."""

    def __post_init__(self) -> None:
        if self.adapter_params < 0 or self.base_trainable_params < 0:
            raise ValueError("adapter_params and base_trainable_params must be ≥ 0")
        if self.adapter_params and not self.trainable:
            raise ValueError(f"the {self.role} model is frozen: it has no adapters to train")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.role in FROZEN_ROLES and self.trainable:
            raise ValueError(
                f"the {self.role} model is frozen in RLHF; trainable=True is incoherent"
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0-3, got {self.zero_stage}")
        if self.dtype_bytes not in (2, 4):
            raise ValueError(
                f"dtype_bytes must be 2 (bf16/fp16) or 4 (fp32), got {self.dtype_bytes}"
            )
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("DeepSpeed offloads parameters only at ZeRO-3")
        if self.offload_optimizer and not self.trainable:
            raise ValueError("offload_optimizer needs a trainable model")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("DeepSpeed offloads the optimizer only at ZeRO-1/2/3")

    @property
    def lora(self) -> bool:
        return self.adapter_params > 0

    @property
    def stored_params(self) -> int:
        """Parameters held: the shape's, plus LoRA adapters."""
        return self.shape.n_params + self.adapter_params

    @property
    def trainable_params(self) -> int:
        """Parameters with gradients and Adam states: all of them, or with LoRA the adapters
        (+ ``base_trainable_params``); 0 for a frozen model."""
        if not self.trainable:
            return 0
        if self.lora:
            return self.adapter_params + self.base_trainable_params
        return self.shape.n_params


@dataclass(frozen=True, kw_only=True)
class PlanInput:
    """One RLHF step per GPU (``rollout=False``: one SFT/RM step). ``generation_batch`` defaults to
    ``micro_batch``.

    ``overhead_gib``: CUDA context + cuBLAS/NCCL workspaces (~1 GiB) + allocator fragmentation
    (~1-2 GiB); 3.0 by default, see the module docstring.
    """

    models: tuple[ModelPlacement, ...]
    world_size: int
    gpu_memory_gib: float = 80.0
    micro_batch: int = 1
    prompt_len: int = 256
    response_len: int = 256
    generation_batch: int | None = None
    overhead_gib: float = DEFAULT_OVERHEAD_GIB
    full_vocab_logging: bool = True
    rollout: bool = True
    """False: a supervised stage (SFT, RM training): no generation and no experience phase."""
    vllm_kv_cache_gib: float | None = None
    """``rollout.engine=vllm``: vLLM's KV-cache budget per GPU; None: HF ``generate`` decodes."""
    vllm_sleep: bool = True
    """``rollout.sleep``: vLLM releases its memory while the actor trains."""
    vllm_push: PushRoute = PushRoute.direct
    """How the weights reach vLLM (``remax.rollout.vllm.push_route``): ``direct`` or ``file``."""
    ranks_per_node: int = 1
    """Processes (one engine each) sharing a node's memory: the file route's push buffer × this."""
    node_memory_gib: float | None = None
    """Memory one node may use (Slurm's cgroup); None: unknown, the push is not checked."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        roles = [m.role for m in self.models]
        if len(set(roles)) != len(roles):
            raise ValueError(f"each role may appear once, got {roles}")
        if self.world_size < 1:
            raise ValueError("world_size must be ≥ 1")
        if self.micro_batch < 1 or (
            self.generation_batch is not None and self.generation_batch < 1
        ):
            raise ValueError("micro_batch and generation_batch must be ≥ 1")
        if self.prompt_len < 0 or self.response_len < 0 or self.seq_len < 1:
            raise ValueError("prompt_len and response_len must be ≥ 0 with a positive sum")
        if self.overhead_gib < 0 or self.gpu_memory_gib <= 0:
            raise ValueError("overhead_gib must be ≥ 0 and gpu_memory_gib > 0")
        if self.ranks_per_node < 1 or (
            self.node_memory_gib is not None and self.node_memory_gib <= 0
        ):
            raise ValueError("ranks_per_node must be ≥ 1 and node_memory_gib > 0 (or None)")
        object.__setattr__(self, "vllm_push", PushRoute(self.vllm_push))

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    @property
    def gen_batch(self) -> int:
        return self.micro_batch if self.generation_batch is None else self.generation_batch


# --------------------------------------------------------------------------------------------------
# formulas (bytes per GPU)
# --------------------------------------------------------------------------------------------------


def parameter_bytes(m: ModelPlacement, world_size: int) -> int:
    n = m.stored_params
    if m.zero_stage == 3:
        return 0 if m.offload_params else m.dtype_bytes * _ceil_div(n, world_size)
    return m.dtype_bytes * n


def gradient_bytes(m: ModelPlacement, world_size: int) -> int:
    n = m.trainable_params
    if not n or m.offload_optimizer:
        return 0
    if m.zero_stage >= 2:
        return m.dtype_bytes * _ceil_div(n, world_size)
    return m.dtype_bytes * n


def optimizer_bytes(m: ModelPlacement, world_size: int) -> int:
    n = m.trainable_params
    if not n or m.offload_optimizer:
        return 0
    per_param = ADAM_BYTES_MIXED if m.dtype_bytes == 2 else ADAM_BYTES_FP32
    if m.zero_stage >= 1:
        return per_param * _ceil_div(n, world_size)
    return per_param * n


def step_gradient_bytes(m: ModelPlacement, world_size: int) -> int:
    """Transient of the on-GPU optimizer step: 16-bit flat gradient partition + its fp32 cast."""
    n = m.trainable_params
    if not n or m.offload_optimizer or m.dtype_bytes != 2:
        return 0
    partition = n if m.zero_stage == 0 else _ceil_div(n, world_size)
    if m.zero_stage == 3:
        partition = min(partition, ZERO3_SUB_GROUP_ELEMENTS)
    return STEP_BYTES_PER_ELEMENT * partition


def reduce_bucket_bytes(m: ModelPlacement) -> int:
    if not m.trainable_params or m.zero_stage < 2:
        return 0
    return m.dtype_bytes * min(m.trainable_params, REDUCE_BUCKET_ELEMENTS)


def gathered_bytes(m: ModelPlacement) -> int:
    """ZeRO-3 transient: one gathered module (embedding or decoder layer) in 16/32-bit."""
    return m.dtype_bytes * m.shape.gathered_unit_params if m.zero_stage == 3 else 0


def layer_activation_bytes(shape: ModelShape, seq: int, batch: int, dtype_bytes: int = 2) -> int:
    """Korthikanti et al. 2022: s·b·h·(34 + 5·a·s/h) bytes per layer in 16-bit, scaled by d/2."""
    return seq * batch * (34 * shape.hidden_size + 5 * shape.num_heads * seq) * dtype_bytes // 2


def training_activation_bytes(
    shape: ModelShape, seq: int, batch: int, dtype_bytes: int = 2, grad_checkpointing: bool = False
) -> int:
    """All layers without recomputation; with full checkpointing L·s·b·h·d + one recomputed layer."""
    layer = layer_activation_bytes(shape, seq, batch, dtype_bytes)
    if grad_checkpointing:
        return shape.num_layers * seq * batch * shape.hidden_size * dtype_bytes + layer
    return shape.num_layers * layer


def kv_cache_bytes(shape: ModelShape, seq: int, batch: int, dtype_bytes: int = 2) -> int:
    """2 (K and V) · L · kv_heads · head_dim · seq · batch · d."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * seq * batch * dtype_bytes


def logits_bytes(shape: ModelShape, seq: int, batch: int, copies: int = 1) -> int:
    """``copies`` fp32 tensors of batch × seq × vocab."""
    return copies * batch * seq * shape.vocab_size * LOGIT_BYTES


# --------------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------------


class Part(str, Enum):
    PARAMETERS = "parameters"
    GATHERED = "gathered"
    GRADIENTS = "gradients"
    REDUCE_BUCKET = "reduce_bucket"
    STEP_GRADIENTS = "step_gradients"
    OPTIMIZER = "optimizer"
    ACTIVATIONS = "activations"
    LOGITS = "logits"
    KV_CACHE = "kv_cache"
    VLLM_WEIGHTS = "vllm_weights"
    VLLM_KV_CACHE = "vllm_kv_cache"


#: table columns → the parts they add up
COLUMNS: dict[str, tuple[Part, ...]] = {
    "parameters": (Part.PARAMETERS, Part.GATHERED),
    "gradients": (Part.GRADIENTS, Part.REDUCE_BUCKET, Part.STEP_GRADIENTS),
    "optimizer": (Part.OPTIMIZER,),
    "activations": (Part.ACTIVATIONS,),
    "logits": (Part.LOGITS,),
    "kv_cache": (Part.KV_CACHE,),
}
#: the extra column of a plan with a vLLM engine: its copy of the weights and its KV budget
VLLM_COLUMN = ("vllm", (Part.VLLM_WEIGHTS, Part.VLLM_KV_CACHE))


@dataclass(frozen=True)
class Item:
    """``nbytes`` of one part of one model, alive in ``phase`` (``"resident"`` = the whole step)."""

    role: str
    part: Part
    phase: str
    nbytes: int


@dataclass(frozen=True)
class Plan:
    inp: PlanInput
    items: tuple[Item, ...]

    @property
    def columns(self) -> dict[str, tuple[Part, ...]]:
        """``COLUMNS``, plus ``vllm`` when an engine is planned (so the rows add up to the total)."""
        if self.inp.vllm_kv_cache_gib is None:
            return COLUMNS
        return {**COLUMNS, VLLM_COLUMN[0]: VLLM_COLUMN[1]}

    # phases --------------------------------------------------------------------------------------
    @property
    def phases(self) -> tuple[str, ...]:
        seen: list[str] = []
        for it in self.items:
            if it.phase != RESIDENT and it.phase not in seen:
                seen.append(it.phase)
        return tuple(seen)

    def phase_bytes(self, phase: str) -> int:
        return sum(it.nbytes for it in self.items if it.phase == phase)

    @property
    def peak_phase(self) -> str | None:
        """The phase with the largest transient sum (the first one on a tie)."""
        best: str | None = None
        for ph in self.phases:
            if best is None or self.phase_bytes(ph) > self.phase_bytes(best):
                best = ph
        return best

    # totals --------------------------------------------------------------------------------------
    @property
    def overhead_bytes(self) -> int:
        return round(self.inp.overhead_gib * GIB)

    @property
    def resident_bytes(self) -> int:
        return self.phase_bytes(RESIDENT)

    @property
    def counted_items(self) -> tuple[Item, ...]:
        """Items that make up the total: resident ones and those of the peak phase."""
        peak = self.peak_phase
        return tuple(it for it in self.items if it.phase in (RESIDENT, peak))

    @property
    def total_bytes(self) -> int:
        peak = self.peak_phase
        return self.overhead_bytes + self.resident_bytes + (self.phase_bytes(peak) if peak else 0)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.inp.gpu_memory_gib * GIB

    @property
    def headroom_gib(self) -> float:
        return self.inp.gpu_memory_gib - self.total_gib

    # per node ------------------------------------------------------------------------------------
    @property
    def node_push_bytes(self) -> int:
        """CPU memory of one node at a vLLM weight push: the file route's safetensors file and the
        state-dict copy written into it, 2·N·d per rank; 0 for the direct route (or no vLLM)."""
        inp = self.inp
        if inp.vllm_kv_cache_gib is None or inp.vllm_push != PushRoute.file:
            return 0
        actor = next((m for m in inp.models if m.role == "actor"), None)
        if actor is None:
            return 0
        return inp.ranks_per_node * 2 * actor.shape.n_params * actor.dtype_bytes

    @property
    def node_push_fits(self) -> bool:
        """The push fits the node's memory (True when that memory is unknown)."""
        limit = self.inp.node_memory_gib
        return limit is None or self.node_push_bytes <= limit * GIB

    def node_push_line(self) -> str:
        """One line: the vLLM push route and what it holds per node."""
        inp = self.inp
        if inp.vllm_push == PushRoute.direct:
            return "vLLM weight push: direct (parameters straight into the engine, no file)"
        limit = "unknown" if inp.node_memory_gib is None else f"{inp.node_memory_gib:g} GiB"
        return (
            f"vLLM weight push: file (/dev/shm), {inp.ranks_per_node} rank(s) × 2·N·d = "
            f"{self.node_push_bytes / GIB:.1f} GiB per node at each push (node memory {limit})"
        )

    # breakdowns ----------------------------------------------------------------------------------
    def bytes_of(
        self, role: str | None = None, part: Part | None = None, phase: str | None = None
    ) -> int:
        """Sum over all items (every phase unless ``phase`` is given) matching the filters."""
        return sum(
            it.nbytes
            for it in self.items
            if (role is None or it.role == role)
            and (part is None or it.part == part)
            and (phase is None or it.phase == phase)
        )

    def counted_bytes(self, role: str | None = None, part: Part | None = None) -> int:
        """Like ``bytes_of`` but only what the total counts (resident + peak phase)."""
        return sum(
            it.nbytes
            for it in self.counted_items
            if (role is None or it.role == role) and (part is None or it.part == part)
        )

    def model_states_bytes(self, role: str | None = None) -> int:
        """Resident parameters + gradients + optimizer states."""
        return self.bytes_of(role=role, phase=RESIDENT)

    def breakdown(self) -> dict[str, dict[str, float]]:
        """{role: {column: GiB}} of what the total counts (resident + peak phase)."""
        out: dict[str, dict[str, float]] = {}
        for m in self.inp.models:
            row = {
                col: sum(self.counted_bytes(m.role, p) for p in parts) / GIB
                for col, parts in self.columns.items()
            }
            row["total"] = sum(row.values())
            out[m.role] = row
        return out

    def table(self) -> str:
        """Per-GPU memory by part in GiB; the last line is ``verdict: fits`` or ``verdict: OOM``."""
        inp = self.inp
        peak = self.peak_phase
        cols = list(self.columns)
        generation = f"generation_batch={inp.gen_batch}, " if inp.rollout else ""
        lines = [
            f"per-GPU memory by part, GiB (world_size={inp.world_size}, micro_batch={inp.micro_batch}, "
            f"{generation}seq={inp.prompt_len}+{inp.response_len})",
            "transient GiB per phase (only the peak is counted): "
            + ", ".join(
                f"{ph} {self.phase_bytes(ph) / GIB:.1f}{' (peak)' if ph == peak else ''}"
                for ph in self.phases
            ),
            f"{'model':<10}" + "".join(f"{c:>12}" for c in cols) + f"{'total':>10}",
        ]

        def row(label: str, cells: list[float], total: float) -> str:
            return f"{label:<10}" + "".join(f"{c:>12.1f}" for c in cells) + f"{total:>10.1f}"

        for m in inp.models:
            cells = [
                sum(self.counted_bytes(m.role, p) for p in self.columns[c]) / GIB for c in cols
            ]
            lines.append(row(m.role, cells, sum(cells)))
        lines.append(f"{'overhead':<10}" + " " * (12 * len(cols)) + f"{inp.overhead_gib:>10.1f}")
        totals = [sum(self.counted_bytes(None, p) for p in self.columns[c]) / GIB for c in cols]
        lines.append(row("total", totals, self.total_gib))
        lines.append(f"capacity {inp.gpu_memory_gib:.1f} GiB, headroom {self.headroom_gib:.1f} GiB")
        if inp.vllm_kv_cache_gib is not None:
            lines.append(self.node_push_line())
        lines.append(f"verdict: {'fits' if self.fits else 'OOM'}")
        return "\n".join(lines)


def _add_rollout(inp: PlanInput, add) -> None:
    """Transients of the RL rollout: the actor's generation, then the experience forwards."""
    s, g = inp.seq_len, inp.gen_batch
    # generation (actor only)
    for m in inp.models:
        if m.role != "actor":
            continue
        if inp.vllm_kv_cache_gib is not None:
            phase = GENERATION if inp.vllm_sleep else RESIDENT
            weights = m.shape.n_params * m.dtype_bytes
            add(m.role, Part.VLLM_WEIGHTS, phase, weights)
            add(m.role, Part.VLLM_KV_CACHE, phase, round(inp.vllm_kv_cache_gib * GIB))
            # ZeRO-3: the push gathers the whole actor once
            add(m.role, Part.GATHERED, GENERATION, weights if m.zero_stage == 3 else 0)
            continue
        add(m.role, Part.KV_CACHE, GENERATION, kv_cache_bytes(m.shape, s, g, m.dtype_bytes))
        add(m.role, Part.LOGITS, GENERATION, logits_bytes(m.shape, 1, g))
        add(
            m.role,
            Part.ACTIVATIONS,
            GENERATION,
            layer_activation_bytes(m.shape, inp.prompt_len, g, m.dtype_bytes),
        )
        add(m.role, Part.GATHERED, GENERATION, gathered_bytes(m))

    # experience: held fp32 logits of the vocabulary models + the largest forward working set
    extra = (
        EXPERIENCE_EXTRA_COPIES_FULL_VOCAB
        if inp.full_vocab_logging
        else EXPERIENCE_EXTRA_COPIES_GATHER
    )
    vocab_models = [m for m in inp.models if m.role in VOCAB_ROLES and m.shape.lm_head]
    roles = {m.role for m in inp.models}
    # a LoRA actor is also the reference (adapters disabled): its logits are held all the same
    vocab_models += [m for m in vocab_models if m.lora and "reference" not in roles]
    for i, m in enumerate(vocab_models):
        add(
            m.role,
            Part.LOGITS,
            EXPERIENCE,
            logits_bytes(m.shape, s, g, 1 + (extra if i == 0 else 0)),
        )
    if inp.models:
        ws = max(
            inp.models,
            key=lambda m: gathered_bytes(m) + layer_activation_bytes(m.shape, s, g, m.dtype_bytes),
        )
        add(ws.role, Part.GATHERED, EXPERIENCE, gathered_bytes(ws))
        add(
            ws.role,
            Part.ACTIVATIONS,
            EXPERIENCE,
            layer_activation_bytes(ws.shape, s, g, ws.dtype_bytes),
        )


def plan(inp: PlanInput) -> Plan:
    """Estimate per-GPU memory of one RLHF step (see the module docstring for every formula)."""
    w, s, b = inp.world_size, inp.seq_len, inp.micro_batch
    items: list[Item] = []

    def add(role: str, part: Part, phase: str, nbytes: int) -> None:
        if nbytes:
            items.append(Item(role, part, phase, int(nbytes)))

    # resident model states
    for m in inp.models:
        add(m.role, Part.PARAMETERS, RESIDENT, parameter_bytes(m, w))
        add(m.role, Part.GRADIENTS, RESIDENT, gradient_bytes(m, w))
        add(m.role, Part.OPTIMIZER, RESIDENT, optimizer_bytes(m, w))

    if inp.rollout:
        _add_rollout(inp, add)

    # training: forward/backward, then the optimizer step, one trainable model after the other
    for m in inp.models:
        if not m.trainable:
            continue
        train, step = f"train:{m.role}", f"step:{m.role}"
        add(
            m.role,
            Part.ACTIVATIONS,
            train,
            training_activation_bytes(m.shape, s, b, m.dtype_bytes, m.grad_checkpointing),
        )
        if m.shape.lm_head:  # the loss logits of a trained LM (actor, sft); value models have none
            add(m.role, Part.LOGITS, train, logits_bytes(m.shape, s, b, TRAIN_LOGIT_COPIES))
        add(m.role, Part.REDUCE_BUCKET, train, reduce_bucket_bytes(m))
        add(m.role, Part.GATHERED, train, gathered_bytes(m))
        add(m.role, Part.STEP_GRADIENTS, step, step_gradient_bytes(m, w))

    return Plan(inp=inp, items=tuple(items))


def max_micro_batch(inp: PlanInput, limit: int = 512) -> int:
    """Largest k ≤ ``limit`` with micro_batch = generation_batch = k that fits (0 if none).

    Memory is non-decreasing in k, so a bisection is exact.
    """

    def fits(k: int) -> bool:
        return plan(replace(inp, micro_batch=k, generation_batch=k)).fits

    if limit < 1 or not fits(1):
        return 0
    if fits(limit):
        return limit
    lo, hi = 1, limit  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


# --------------------------------------------------------------------------------------------------
# the release's layouts
# --------------------------------------------------------------------------------------------------


def remax_models(
    actor_shape: ModelShape,
    rm_shape: ModelShape,
    *,
    offload: bool = False,
    dtype_bytes: int = 2,
    actor_zero_stage: int = 2,
    frozen_zero_stage: int = 3,
    grad_checkpointing: bool = True,
    offload_optimizer: bool | None = None,
    offload_frozen_params: bool | None = None,
    offload_actor_params: bool = False,
    lora_rank: int = 0,
    lora_targets: Sequence[str] | None = None,
) -> tuple[ModelPlacement, ...]:
    """ReMax: trainable actor (ZeRO-2, grad-ckpt) + frozen reference (actor-sized) + frozen RM.

    ``offload`` turns on optimizer offload for the actor and, at ZeRO-3, parameter offload for the
    frozen models (``--offload --offload_reference_model --offload_reward_model`` in the release).
    ``offload_optimizer`` / ``offload_frozen_params`` set the two halves separately (None: ``offload``);
    ``offload_actor_params`` offloads a ZeRO-3 actor's parameters too (``deepspeed.offload_params``).
    The RM shape is converted to a value model (no LM head, h→1 head).
    ``lora_rank`` > 0: the actor trains LoRA adapters on ``lora_targets`` (None: the
    architecture's default) and is also the reference (adapters disabled), so no reference copy.
    """
    optimizer_offload = offload if offload_optimizer is None else offload_optimizer
    frozen_offload = offload if offload_frozen_params is None else offload_frozen_params
    actor = ModelPlacement(
        role="actor",
        shape=actor_shape,
        trainable=True,
        zero_stage=actor_zero_stage,
        offload_optimizer=optimizer_offload,
        offload_params=offload_actor_params,
        dtype_bytes=dtype_bytes,
        grad_checkpointing=grad_checkpointing,
        adapter_params=adapter_params(actor_shape, lora_rank, lora_targets),
    )
    reference = ModelPlacement(
        role="reference",
        shape=actor_shape,
        trainable=False,
        zero_stage=frozen_zero_stage,
        offload_params=frozen_offload and frozen_zero_stage == 3,
        dtype_bytes=dtype_bytes,
    )
    reward = replace(reference, role="reward", shape=rm_shape.as_value_model())
    return (actor, reward) if actor.lora else (actor, reference, reward)


def ppo_models(
    actor_shape: ModelShape,
    rm_shape: ModelShape,
    critic_shape: ModelShape | None = None,
    *,
    offload: bool = False,
    dtype_bytes: int = 2,
    actor_zero_stage: int = 2,
    frozen_zero_stage: int = 3,
    grad_checkpointing: bool = True,
    offload_optimizer: bool | None = None,
    offload_frozen_params: bool | None = None,
    offload_actor_params: bool = False,
    lora_rank: int = 0,
    lora_targets: Sequence[str] | None = None,
    critic_lora: bool = False,
) -> tuple[ModelPlacement, ...]:
    """PPO: the ReMax models + a critic with the actor's settings, initialised from the RM (RM-sized).
    With LoRA the actor trains adapters and serves as the reference; the critic trains in full,
    or (``critic_lora``, ``algo.critic_lora``) the same adapters plus its value head (h → 1)."""
    base = remax_models(
        actor_shape,
        rm_shape,
        offload=offload,
        dtype_bytes=dtype_bytes,
        actor_zero_stage=actor_zero_stage,
        frozen_zero_stage=frozen_zero_stage,
        grad_checkpointing=grad_checkpointing,
        offload_optimizer=offload_optimizer,
        offload_frozen_params=offload_frozen_params,
        offload_actor_params=offload_actor_params,
        lora_rank=lora_rank,
        lora_targets=lora_targets,
    )
    critic_shape = (critic_shape or rm_shape).as_value_model()
    lora = critic_lora and lora_rank > 0  # its value head (h → 1) trains in full
    critic = replace(
        base[0],
        role="critic",
        shape=critic_shape,
        adapter_params=adapter_params(critic_shape, lora_rank, lora_targets) if lora else 0,
        base_trainable_params=critic_shape.hidden_size if lora else 0,
    )
    return base + (critic,)


def sft_models(
    shape: ModelShape,
    *,
    zero_stage: int = 2,
    offload: bool = False,
    dtype_bytes: int = 2,
    grad_checkpointing: bool = True,
    lora_rank: int = 0,
    lora_targets: Sequence[str] | None = None,
) -> tuple[ModelPlacement, ...]:
    """SFT (release step 1): one trained LM; ``offload`` is ``--offload`` (optimizer to CPU).
    ``lora_rank`` > 0 trains adapters only. Plan it with ``PlanInput(rollout=False)``."""
    return (
        ModelPlacement(
            role="sft",
            shape=shape,
            trainable=True,
            zero_stage=zero_stage,
            offload_optimizer=offload,
            dtype_bytes=dtype_bytes,
            grad_checkpointing=grad_checkpointing,
            adapter_params=adapter_params(shape, lora_rank, lora_targets),
        ),
    )


def reward_model_models(
    shape: ModelShape,
    *,
    zero_stage: int = 2,
    offload: bool = False,
    dtype_bytes: int = 2,
    grad_checkpointing: bool = True,
    lora_rank: int = 0,
    lora_targets: Sequence[str] | None = None,
) -> tuple[ModelPlacement, ...]:
    """RM training (release step 2): one trained value model (backbone + h→1 head, no LM logits).
    A step scores chosen and rejected answers, so its micro-batch in rows is 2 × pairs.
    With LoRA the score head (h weights) trains in full beside the adapters."""
    (model,) = sft_models(
        shape.as_value_model(),
        zero_stage=zero_stage,
        offload=offload,
        dtype_bytes=dtype_bytes,
        grad_checkpointing=grad_checkpointing,
        lora_rank=lora_rank,
        lora_targets=lora_targets,
    )
    head = shape.hidden_size if model.lora else 0
    return (replace(model, role="rm", base_trainable_params=head),)


__all__ = [
    "COLUMNS",
    "GIB",
    "Item",
    "ModelPlacement",
    "ModelShape",
    "Part",
    "Plan",
    "PlanInput",
    "PushRoute",
    "gathered_bytes",
    "gradient_bytes",
    "kv_cache_bytes",
    "layer_activation_bytes",
    "logits_bytes",
    "max_micro_batch",
    "optimizer_bytes",
    "parameter_bytes",
    "plan",
    "ppo_models",
    "reduce_bucket_bytes",
    "remax_models",
    "reward_model_models",
    "sft_models",
    "step_gradient_bytes",
    "training_activation_bytes",
]
