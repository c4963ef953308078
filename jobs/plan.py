"""``python -m jobs.plan [stage overrides] [plan.key=value ...]``: will it fit, before anyone pays.

Takes the same overrides as a stage (``model=llama2_7b algo=ppo_dschat cluster=slurm_a800``; an
``algo=ppo_*`` plans the PPO stage, anything else ReMax) plus ``plan.*`` keys for what the stage
config does not hold yet: ``plan.offload``, ``plan.micro_batch``, ``plan.prompt_len``,
``plan.response_len``, ``plan.actor_zero``, ``plan.frozen_zero``, ``plan.reward_model`` (a model
preset name; default: the policy's), ``plan.gpu_memory_gib``. Prints per-GPU memory by part and
model, the largest micro-batch that fits, and a last line ``verdict: fits`` or ``verdict: OOM``.
"""

from __future__ import annotations

import dataclasses
import sys

from jobs._config import compose_stage, fail
from remax import plan as planner

PRESETS = {
    "llama2_7b": planner.ModelShape.llama2_7b,
    "mistral_7b": planner.ModelShape.mistral_7b,
    "opt_1.3b": planner.ModelShape.opt_1_3b,
    "opt_350m": planner.ModelShape.opt_350m,
}


@dataclasses.dataclass(kw_only=True)
class PlanOptions:
    offload: bool = False
    micro_batch: int = 1
    prompt_len: int = 256
    response_len: int = 256
    actor_zero: int = 2
    frozen_zero: int = 3
    reward_model: str = ""
    gpu_memory_gib: float = 80.0


def parse(argv: list[str]) -> tuple[list[str], PlanOptions]:
    stage_args, opts = [], PlanOptions()
    fields = {f.name: f for f in dataclasses.fields(PlanOptions)}
    for arg in argv:
        key, _, value = arg.partition("=")
        if not key.startswith("plan."):
            stage_args.append(arg)
            continue
        name = key.removeprefix("plan.")
        if name not in fields:
            fail(
                f"unknown key {key!r}: valid plan keys are {', '.join('plan.' + f for f in fields)}"
            )
        kind = type(getattr(opts, name))
        try:
            parsed = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        except ValueError:
            fail(f"invalid {key}={value!r}: expected a {kind.__name__}")
        setattr(opts, name, parsed)
    return stage_args, opts


def shape_of(model_cfg) -> planner.ModelShape:
    if model_cfg.name in PRESETS:
        return PRESETS[model_cfg.name]()
    if model_cfg.path is not None:
        fail(
            f"model {model_cfg.name!r} ({model_cfg.path}) has no shape preset: use one of "
            f"{', '.join(PRESETS)}, or a tiny model"
        )
    from remax.models.tiny import CHARS

    h, layers = model_cfg.hidden_size, model_cfg.num_layers
    return planner.ModelShape.from_hf_config(
        {
            "model_type": "llama",
            "hidden_size": h,
            "num_hidden_layers": layers,
            "num_attention_heads": model_cfg.num_heads,
            "num_key_value_heads": model_cfg.num_kv_heads,
            "vocab_size": len(CHARS) + 2,
            "intermediate_size": model_cfg.intermediate_size,
        },
        name="tiny",
    )


def plan_input(stage: str, config, opts: PlanOptions) -> planner.PlanInput:
    actor = shape_of(config.model)
    rm = PRESETS[opts.reward_model]() if opts.reward_model else actor
    build = planner.ppo_models if stage == "ppo" else planner.remax_models
    dtype_bytes = (
        2 if str(getattr(config.model.dtype, "value", config.model.dtype)) == "bfloat16" else 4
    )
    models = build(
        actor,
        rm,
        offload=opts.offload,
        dtype_bytes=dtype_bytes,
        actor_zero_stage=opts.actor_zero,
        frozen_zero_stage=opts.frozen_zero,
        grad_checkpointing=config.model.grad_checkpointing,
    )
    return planner.PlanInput(
        models=models,
        world_size=max(1, config.cluster.gpus),
        gpu_memory_gib=opts.gpu_memory_gib,
        micro_batch=opts.micro_batch,
        prompt_len=opts.prompt_len,
        response_len=opts.response_len,
    )


def check_fits(stage: str, config) -> str | None:
    """For a submission: None if the RL stage fits (or has no shape preset), else why it does not."""
    if stage not in ("remax", "ppo") or config.model.name not in PRESETS or not config.cluster.gpus:
        return None
    opts = PlanOptions(
        micro_batch=config.train.micro_batch_size,
        prompt_len=config.data.max_prompt_len,
        response_len=config.data.max_response_len,
    )
    result = planner.plan(plan_input(stage, config, opts))
    if result.fits:
        return None
    return (
        f"the memory planner estimates {result.total_gib:.1f} GiB per GPU for {stage} with "
        f"{config.model.name} on {config.cluster.gpus} GPU(s) (capacity {opts.gpu_memory_gib:g} GiB): "
        "see `python -m jobs.plan` with the same overrides; cluster.check_memory=false submits anyway"
    )


def main(argv: list[str]) -> planner.Plan:
    stage_args, opts = parse(argv)
    stage = "ppo" if any(a.startswith("algo=ppo") for a in stage_args) else "remax"
    if not any(a.startswith("reward_model.path=") for a in stage_args):
        stage_args = [
            *stage_args,
            "reward_model.path=planned/reward_model",
        ]  # the plan needs no weights
    config = compose_stage(stage, stage_args)
    try:
        inp = plan_input(stage, config, opts)
        result = planner.plan(inp)
    except ValueError as exc:
        fail(str(exc))
    gpus = max(1, config.cluster.gpus)
    print(
        f"{stage} with {config.model.name} on {config.cluster.name}: {gpus} GPU(s) × "
        f"{opts.gpu_memory_gib:g} GiB, micro-batch {opts.micro_batch}, {opts.prompt_len}+{opts.response_len} "
        f"tokens, offload={'on' if opts.offload else 'off'}"
    )
    print(f"largest micro-batch that fits: {planner.max_micro_batch(inp)}")
    print(result.table())
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
