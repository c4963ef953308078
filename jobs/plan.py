"""``python -m jobs.plan [stage overrides] [plan.key=value ...]``: will it fit, before anyone pays.

Takes the same overrides as a stage (``experiment=remax_llama2_7b_official``, or
``model=llama2_7b algo=ppo_dschat cluster=slurm_a800``). The stage is an ``experiment=`` preset's
prefix (``sft_``, ``rm_``, ``remax_``, ``ppo_``), else PPO for ``algo=ppo_*``, else ReMax.

Every planner input comes from the composed config: world size ``cluster.ranks`` (processes, one
per GPU); placement from
``deepspeed`` when enabled (``zero_stage``, ``inference_zero_stage``, ``offload_optimizer``,
``offload_params``, ``inference_offload_params``), else plain PyTorch (every model replicated); rows
per rank from ``train`` (micro-batch ``min(micro_batch_size, batch_size / ranks)``, generation
batch ``train.per_rank(ranks)``, times ``rollout.samples_per_prompt``); lengths from ``data``; the RM's shape from
``reward_model.path`` when it is a model preset's hub id or a local dir with a ``config.json``, else
the actor's. ``plan.*`` keys override: ``plan.offload`` (the release's ``--offload
--offload_reference_model --offload_reward_model``), ``plan.micro_batch`` (rows per micro-batch and
per generation), ``plan.prompt_len``, ``plan.response_len``, ``plan.actor_zero``,
``plan.frozen_zero``, ``plan.reward_model`` (a model preset name), ``plan.gpu_memory_gib``,
``plan.node_memory_gib`` (default ``cluster.mem_gb``, or ``cluster.node_mem_gb`` when that is 0 or
unset). ``rollout.engine=vllm`` is planned with the weight-push route the run takes
(``rollout.push``, ``remax.rollout.vllm.push_route``: ``direct`` on CUDA and one CPU rank, ``file``
on several CPU ranks; CUDA is ``cluster.device``, or for ``auto`` whether the cluster has GPUs). A
``file`` push that cannot fit in the node's memory is refused.
``model.lora.rank`` > 0 plans LoRA (``remax.plan``): the trained model's base frozen and stored
once, gradients and Adam states for the adapters only, and in RL no reference model (the actor with
its adapters disabled); PPO's critic trains in full.
SFT and RM stages plan their one trained model (rows: the micro-batch, ×2 for RM pairs; tokens:
``data.max_seq_len``) in the same placement.

Prints per-GPU memory by part and model, the largest micro-batch that fits, and a last line
``verdict: fits`` or ``verdict: OOM``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from jobs._config import CONF_DIR, compose_dict, fail, to_config
from remax import plan as planner
from remax.config import DType, PPOAlgoConfig, RolloutEngine
from remax.plan_lora import targets_of
from remax.stages import STAGES

PRESETS = {
    "llama2_7b": planner.ModelShape.llama2_7b,
    "llama2_13b": planner.ModelShape.llama2_13b,
    "llama2_70b": planner.ModelShape.llama2_70b,
    "mistral_7b": planner.ModelShape.mistral_7b,
    "opt_1.3b": planner.ModelShape.opt_1_3b,
    "opt_350m": planner.ModelShape.opt_350m,
    "ultrarm_13b": planner.ModelShape.ultrarm_13b,
}
PLANNED = {name: s for name, s in STAGES.items() if s.plan_models is not None}
DEFAULT_STAGE = "remax"  # no experiment= preset and no algo= preset of another RL stage
PLANNED_RM = "planned/reward_model"  # an RL config needs an RM path; the plan needs no weights


@dataclasses.dataclass(kw_only=True)
class PlanOptions:
    """The ``plan.*`` keys; None: taken from the stage config (module docstring)."""

    offload: bool | None = None
    micro_batch: int | None = None
    prompt_len: int | None = None
    response_len: int | None = None
    actor_zero: int | None = None
    frozen_zero: int | None = None
    reward_model: str | None = None
    gpu_memory_gib: float = 80.0
    node_memory_gib: float | None = None


KEY_TYPES = {
    "offload": bool,
    "micro_batch": int,
    "prompt_len": int,
    "response_len": int,
    "actor_zero": int,
    "frozen_zero": int,
    "reward_model": str,
    "gpu_memory_gib": float,
    "node_memory_gib": float,
}


def parse(argv: list[str]) -> tuple[list[str], PlanOptions]:
    stage_args, opts = [], PlanOptions()
    for arg in argv:
        key, _, value = arg.partition("=")
        if not key.startswith("plan."):
            stage_args.append(arg)
            continue
        name = key.removeprefix("plan.")
        if name not in KEY_TYPES:
            fail(
                f"unknown key {key!r}: valid plan keys are {', '.join('plan.' + k for k in KEY_TYPES)}"
            )
        kind = KEY_TYPES[name]
        try:
            parsed = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        except ValueError:
            fail(f"invalid {key}={value!r}: expected a {kind.__name__}")
        setattr(opts, name, parsed)
    return stage_args, opts


def stage_of(args: list[str]) -> str:
    """An ``experiment=`` preset's prefix names the stage; else an RL stage's ``algo=`` preset
    (``algo=ppo_*``: PPO), else ReMax."""
    given = {key.lstrip("+"): value for key, _, value in (a.partition("=") for a in args)}
    experiment, algo = given.get("experiment", ""), given.get("algo", "")
    for name, spec in PLANNED.items():
        if experiment.startswith(spec.preset_prefix):
            return name
    for name, spec in PLANNED.items():
        if spec.rl and algo.startswith(spec.preset_prefix):
            return name
    return DEFAULT_STAGE


@functools.cache
def _hub_ids() -> dict[str, str]:
    """HF hub id → model preset, read from ``hydra_conf/model/<preset>.yaml`` (one source of truth)."""
    out = {}
    for name in PRESETS:
        path = OmegaConf.load(Path(CONF_DIR) / "model" / f"{name}.yaml").get("path")
        if path:
            out[str(path)] = name
    return out


def shape_from_path(path: str | None) -> planner.ModelShape | None:
    """The shape of a model preset's hub id, or of a local HF dir's ``config.json``; else None."""
    if path is None:
        return None
    if path in _hub_ids():
        return PRESETS[_hub_ids()[path]]()
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        return planner.ModelShape.from_hf_config(json.loads(config.read_text()), name=path)
    except (KeyError, TypeError, ValueError):
        return None


def shape_of(model_cfg) -> planner.ModelShape:
    if model_cfg.name in PRESETS:
        return PRESETS[model_cfg.name]()
    if model_cfg.path is not None:
        shape = shape_from_path(model_cfg.path)
        if shape is None:
            fail(
                f"model {model_cfg.name!r} ({model_cfg.path}) has no shape preset: use one of "
                f"{', '.join(PRESETS)}, a local dir with a config.json, or a tiny model"
            )
        return shape
    from remax.models.tiny import CHARS

    return planner.ModelShape.from_hf_config(
        {
            "model_type": "llama",
            "hidden_size": model_cfg.hidden_size,
            "num_hidden_layers": model_cfg.num_layers,
            "num_attention_heads": model_cfg.num_heads,
            "num_key_value_heads": model_cfg.num_kv_heads,
            "vocab_size": len(CHARS) + 2,
            "intermediate_size": model_cfg.intermediate_size,
        },
        name="tiny",
    )


def reward_shape(config, opts: PlanOptions, actor: planner.ModelShape):
    """(RM shape, where it came from): ``plan.reward_model``, ``reward_model.path``, or the actor."""
    if opts.reward_model is not None:
        if opts.reward_model not in PRESETS:
            fail(f"plan.reward_model={opts.reward_model!r}: use one of {', '.join(PRESETS)}")
        return PRESETS[opts.reward_model](), f"plan.reward_model={opts.reward_model}"
    path = config.reward_model.path
    shape = shape_from_path(path)
    if shape is not None:
        return shape, f"reward_model.path={path}"
    return (
        actor,
        f"actor-sized: reward_model.path={path} names no known shape; plan.reward_model sets one",
    )


def _placement(config) -> tuple[int, int, bool, bool, bool]:
    """(actor ZeRO, frozen ZeRO, optimizer offload, actor parameter offload, frozen parameter
    offload) of the config's DeepSpeed; without it every model is replicated on every GPU."""
    ds = getattr(config, "deepspeed", None)
    if ds is None or not ds.enabled:
        return 0, 0, False, False, False  # plain PyTorch data parallelism
    return (
        ds.zero_stage,
        ds.inference_zero_stage,
        ds.offload_optimizer,
        ds.offload_params,
        ds.inference_offload_params,
    )


def _critic(config) -> dict:
    """PPO's critic LoRA switch (``algo.critic_lora``) for its planner builder; none elsewhere."""
    if isinstance(config.algo, PPOAlgoConfig):
        return {"critic_lora": config.algo.critic_lora}
    return {}


def plan_input(stage: str, config, opts: PlanOptions) -> planner.PlanInput:
    """The planner's input for a composed stage config, ``plan.*`` keys over its values."""
    ranks = config.cluster.ranks
    actor = shape_of(config.model)
    zero, frozen_zero, offload_optimizer, offload_params, offload_frozen = _placement(config)
    zero = zero if opts.actor_zero is None else opts.actor_zero
    frozen_zero = frozen_zero if opts.frozen_zero is None else opts.frozen_zero
    if opts.offload is not None:  # the release's three flags; the actor's parameters stay on GPU
        offload_optimizer = offload_frozen = opts.offload
        offload_params = False
    lora = config.model.lora  # rank 0: every weight trains
    common = dict(
        dtype_bytes=2 if config.model.dtype == DType.bfloat16 else 4,
        grad_checkpointing=config.model.grad_checkpointing,
        lora_rank=lora.rank,
        lora_targets=lora.target_modules,
    )
    data, train, spec = config.data, config.train, STAGES[stage]
    if spec.rl:
        n = config.rollout.samples_per_prompt
        per_rank = train.per_rank(ranks)  # prompts per rank and step
        micro, gen = min(train.micro_batch_size, per_rank) * n, per_rank * n
        prompt, response = data.max_prompt_len, data.max_response_len
        models = spec.plan_models(
            actor,
            reward_shape(config, opts, actor)[0],
            actor_zero_stage=zero,
            frozen_zero_stage=frozen_zero,
            offload_optimizer=offload_optimizer,
            offload_frozen_params=offload_frozen and frozen_zero == 3,
            offload_actor_params=offload_params and zero == 3,
            **common,
            **_critic(config),
        )
    else:  # one trained model; an RM step scores chosen and rejected: 2 rows per pair
        micro = gen = train.micro_batch_size * spec.rows_per_example
        prompt = min(data.max_prompt_len, data.max_seq_len)
        response = data.max_seq_len - prompt
        models = spec.plan_models(actor, zero_stage=zero, offload=offload_optimizer, **common)
    if opts.micro_batch is not None:
        micro = gen = opts.micro_batch
    return planner.PlanInput(
        models=models,
        world_size=ranks,
        gpu_memory_gib=opts.gpu_memory_gib,
        micro_batch=micro,
        generation_batch=gen,
        prompt_len=prompt if opts.prompt_len is None else opts.prompt_len,
        response_len=response if opts.response_len is None else opts.response_len,
        rollout=spec.rl,
        **_vllm(config, opts) if spec.rl else {},
    )


def _vllm(config, opts: PlanOptions) -> dict:
    """``rollout.engine=vllm``: vLLM's weights and KV-cache budget replace HF generate's, and
    its weight push may hold a buffer per node (the route the run takes: ``push_route``)."""
    rollout, cluster = config.rollout, config.cluster
    if rollout.engine != RolloutEngine.vllm:
        return {}
    return {
        "vllm_kv_cache_gib": rollout.kv_cache_gib,
        "vllm_sleep": rollout.sleep,
        "vllm_push": push_route(config),
        "ranks_per_node": cluster.tasks_per_node,
        "node_memory_gib": opts.node_memory_gib or node_memory_gib(cluster),
    }


def push_route(config):
    """The run's weight-push route (``rollout.push`` on this cluster's device and ranks; the device
    is CUDA for ``cluster.device=cuda``, and for ``auto`` when the cluster has GPUs)."""
    from remax.rollout.vllm import push_route as route_of  # torch: only for vLLM plans

    cluster = config.cluster
    cuda = cluster.device == "cuda" or (cluster.device == "auto" and cluster.gpus_per_node > 0)
    return route_of("cuda" if cuda else "cpu", config.rollout.push, cluster.ranks)[0]


def node_memory_gib(cluster) -> float | None:
    """What one node's job may use: ``mem_gb`` when set, else the node's (``node_mem_gb``).
    Slurm reads ``--mem=<n>GB`` in units of 1024 MB, so both are GiB."""
    return cluster.mem_gb or cluster.node_mem_gb or None


def push_refusal(result: planner.Plan) -> str | None:
    """None if the vLLM weight push fits the node's memory, else the one-line reason."""
    if result.node_push_fits:
        return None
    inp = result.inp
    return (
        f"rollout.engine=vllm pushes weights through /dev/shm (the file route): "
        f"{inp.ranks_per_node} rank(s) × 2 × the actor's weights = "
        f"{result.node_push_bytes / planner.GIB:.1f} GiB per node at each push, over the node's "
        f"{inp.node_memory_gib:g} GiB: run on CUDA or one rank per node (the direct push needs no "
        "file), lower cluster.tasks_per_node, raise cluster.mem_gb, or use rollout.engine=hf"
    )


def check_fits(stage: str, config) -> str | None:
    """For a submission: None if the RL stage fits (or has no known shape), else why it does not."""
    rollout = getattr(config, "rollout", None)  # SFT and RM stages decode nothing
    gpus, vllm = config.cluster.gpus, rollout is not None and rollout.engine == RolloutEngine.vllm
    if not STAGES[stage].rl or not (gpus or vllm):  # a CPU cluster: only a vLLM push can fail
        return None
    if config.model.name not in PRESETS and shape_from_path(config.model.path) is None:
        return None
    opts = PlanOptions()
    try:
        result = planner.plan(plan_input(stage, config, opts))
    except ValueError as exc:  # e.g. a push route this cluster cannot take: one line
        return str(exc)
    refusal = push_refusal(result)  # a CPU cluster's file push too: it needs no GPU
    if refusal or result.fits or not gpus:
        return refusal
    return (
        f"the memory planner estimates {result.total_gib:.1f} GiB per GPU for {stage} with "
        f"{config.model.name} on {config.cluster.gpus} GPU(s) (capacity {opts.gpu_memory_gib:g} GiB): "
        "see `python -m jobs.plan` with the same overrides; cluster.check_memory=false submits anyway"
    )


def _compose(stage: str, args: list[str]):
    """The stage config; an RL config without an RM path gets a placeholder (no weights needed)."""
    cfg = compose_dict(stage, args)  # the one composition every entry point uses
    if STAGES[stage].rl and cfg.reward_model.path is None and cfg.reward_model.kind != "function":
        cfg.reward_model.path = PLANNED_RM
    return to_config(cfg)


def _describe(stage: str, config, opts: PlanOptions, inp: planner.PlanInput) -> list[str]:
    m = inp.models[0]
    on = {True: "on", False: "off"}
    lines = [
        f"{stage} with {config.model.name} on {config.cluster.name}: {inp.world_size} GPU(s) × "
        f"{inp.gpu_memory_gib:g} GiB, micro-batch {inp.micro_batch}, generation batch "
        f"{inp.gen_batch if inp.rollout else '-'}, {inp.prompt_len}+{inp.response_len} tokens",
        f"placement: {m.role} ZeRO-{m.zero_stage}, optimizer offload {on[m.offload_optimizer]}, "
        f"parameter offload {on[m.offload_params]}",
    ]
    if inp.rollout:
        frozen = next(x for x in inp.models if x.role == "reward")
        shape, source = reward_shape(config, opts, shape_of(config.model))
        held = "RM" if m.lora else "reference and RM"
        lines[-1] += f"; {held} ZeRO-{frozen.zero_stage}, offload {on[frozen.offload_params]}"
        lines.append(f"reward model: {shape.name} ({source})")
        critic = next((x for x in inp.models if x.role == "critic"), None)
        if m.lora and critic is not None:
            lines.append(
                "critic: LoRA adapters and its value head (algo.critic_lora=true)"
                if critic.lora
                else "critic: trained in full (algo.critic_lora=false)"
            )
    if m.lora:
        lora = config.model.lora
        lines.append(
            f"LoRA rank {lora.rank} on {', '.join(targets_of(m.shape, lora.target_modules))}: "
            f"{m.adapter_params:,} adapter parameters train, the {m.shape.n_params:,} base "
            "weights are frozen"
            + (
                "; the reference is the actor with its adapters disabled (no copy)"
                if inp.rollout
                else ""
            )
        )
    return lines


def main(argv: list[str]) -> planner.Plan:
    if "-h" in argv or "--help" in argv:
        print("usage: " + __doc__.strip())
        return None
    stage_args, opts = parse(argv)
    stage = stage_of(stage_args)
    config = _compose(stage, stage_args)
    try:
        inp = plan_input(stage, config, opts)
        result = planner.plan(inp)
    except ValueError as exc:
        fail(str(exc))
    refusal = push_refusal(result)
    if refusal:
        fail(refusal)
    print("\n".join(_describe(stage, config, opts, inp)))
    largest = planner.max_micro_batch(inp)
    rows = STAGES[stage].rows_per_example
    unit = f" rows ({largest // rows} pairs)" if rows == 2 else ""
    print(f"largest micro-batch that fits: {largest}{unit}")
    print(result.table())
    return result


def cli() -> None:
    """Console-script entry point (``remax-plan``)."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
