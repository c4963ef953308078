"""Every ``hydra_conf/experiment/`` preset composes with its stage and fits its cluster.

The stage is the file name's prefix (``sft_``, ``rm_`` → reward_model, ``remax_``, ``ppo_``). Each
preset runs on ``cluster=slurm_a800`` and must pass the memory planner at its own settings, through
the function ``python -m jobs.plan`` and the submission check use (``jobs.plan.plan_input``), with
world size ``cluster.gpus``. RL presets are planned as configured (``deepspeed``, ``train``,
``data``, the RM from ``reward_model.path``). SFT and RM presets are planned as one trained model in
the release's ZeRO-2 placement: their configs hold no ``deepspeed`` yet, and their trainers run plain
data parallelism. The negative control shows the check can fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs._config import CONF_DIR, SCHEMAS, compose_stage
from jobs.plan import PlanOptions, check_fits, plan_input, stage_of
from remax.plan import ModelShape, plan

EXPERIMENTS = sorted(
    p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml") if p.stem != "smoke"
)
PREFIXES = {"sft_": "sft", "rm_": "reward_model", "remax_": "remax", "ppo_": "ppo"}
RL_STAGES = ("remax", "ppo")

# The release's numbers (remax-spec §5), as each preset must hold them. Batch: the scripts' per-device
# batch × 4 GPUs = train.batch_size, per-device = train.micro_batch_size.
RELEASE = {"data.max_prompt_len": 256, "data.max_response_len": 256, "data.split": [2, 4, 4]}
SFT = {**RELEASE, "data.max_seq_len": 512, "optim.lr": 1e-5, "optim.weight_decay": 0.0}
RM = {**RELEASE, "data.max_seq_len": 512, "optim.lr": 1e-5, "optim.weight_decay": 0.1}
STEP3 = {
    **RELEASE,
    "optim.lr": 1e-6,
    "optim.weight_decay": 0.1,
    "algo.kl_coef": 0.05,
    "algo.gamma": 0.99,
    "deepspeed.enabled": True,
    "deepspeed.zero_stage": 2,
    "deepspeed.inference_zero_stage": 3,
    "train.epochs": 1,
    "seed": 2023,
}
EXPECTED = {
    "sft_opt1.3b_official": {
        **SFT,
        "model.name": "opt_1.3b",
        "train.batch_size": 64,
        "train.micro_batch_size": 16,
        "train.epochs": 4,
        "seed": 2023,
    },
    "sft_llama2_7b_official": {
        **SFT,
        "model.name": "llama2_7b",
        "train.batch_size": 64,
        "train.micro_batch_size": 16,
        "train.epochs": 2,
        "seed": 2023,
    },
    "rm_opt1.3b_official": {
        **RM,
        "model.name": "opt_350m",
        "train.batch_size": 64,
        "train.micro_batch_size": 16,
        "train.epochs": 4,
        "seed": 1234,
    },
    "rm_llama2_7b_official": {
        **RM,
        "model.name": "llama2_7b",
        "train.batch_size": 64,
        "train.micro_batch_size": 16,
        "train.epochs": 2,
        "seed": 1234,
    },
    "remax_opt1.3b_official": {
        **STEP3,
        "model.name": "opt_1.3b",
        "train.batch_size": 16,
        "train.micro_batch_size": 4,
        "deepspeed.offload_optimizer": False,
        "eval_prompts": 320,  # 20 eval batches × 4 per GPU × 4 GPUs
        "export_policy": "best_eval_reward",
    },
    "remax_llama2_7b_official": {
        **STEP3,
        "model.name": "llama2_7b",
        "train.batch_size": 4,
        "train.micro_batch_size": 1,
        "deepspeed.offload_optimizer": True,  # --offload
        "eval_prompts": 80,  # 20 eval batches × 1 per GPU × 4 GPUs
        "export_policy": "last",  # --save_at_final
    },
    "remax_mistral7b_card": {
        "model.name": "mistral_7b",
        "model.path": "mistralai/Mistral-7B-Instruct-v0.2",
        "reward_model.path": "openbmb/UltraRM-13b",
        "reward_model.kind": "regression_head",  # UltraRM's LlamaRewardModel
        "reward_model.template": "format",  # [MC] scores in UltraRM's chat template
        "reward_model.format": "Human: {prompt}\nAssistant: {response}",
        "data.max_prompt_len": 384,
        "data.max_response_len": 384,
        "data.num_train": 10000,
        "optim.lr": 5e-7,
        "algo.kl_coef": 0.1,
        "algo.reward_clip": 1.0,
        "algo.temperature": 0.7,
        "algo.top_p": 0.9,
        "train.epochs": 1,
    },
}


def stage_from_name(name: str) -> str:
    for prefix, stage in PREFIXES.items():
        if name.startswith(prefix):
            return stage
    raise AssertionError(
        f"experiment/{name}.yaml: the name must start with one of {list(PREFIXES)}"
    )


def _get(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return getattr(value, "value", value)  # Enums compare by their value


def test_glob_finds_the_release_presets():
    assert set(EXPERIMENTS) >= set(EXPECTED)
    for name in EXPERIMENTS:
        assert stage_of([f"experiment={name}"]) == stage_from_name(name)  # jobs.plan agrees


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_preset_composes_and_fits_its_cluster(name):
    stage = stage_from_name(name)
    config = compose_stage(stage, [f"experiment={name}"])
    assert isinstance(config, SCHEMAS[stage])
    assert config.cluster.name == "slurm_a800"
    inp = plan_input(stage, config, PlanOptions())
    assert inp.world_size == config.cluster.gpus == 4
    assert inp.rollout == (stage in RL_STAGES)
    result = plan(inp)
    assert result.fits, f"{name}:\n{result.table()}"
    if stage in RL_STAGES:
        assert check_fits(stage, config) is None  # a submission would not be refused


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_holds_the_release_numbers(name):
    config = compose_stage(stage_from_name(name), [f"experiment={name}"])
    seen = {key: _get(config, key) for key in EXPECTED[name]}
    assert seen == EXPECTED[name]


def test_the_planner_reads_the_preset_and_plan_keys_still_win():
    config = compose_stage("remax", ["experiment=remax_llama2_7b_official"])
    inp = plan_input("remax", config, PlanOptions())
    actor, reference, reward = inp.models
    # deepspeed.zero_stage / inference_zero_stage / offload_optimizer / inference_offload_params
    assert (actor.zero_stage, reference.zero_stage, reward.zero_stage) == (2, 3, 3)
    assert actor.offload_optimizer and not actor.offload_params
    assert reference.offload_params and reward.offload_params
    # 4 prompts / 4 GPUs = 1 per rank, 256 + 256 tokens from data=rm_static
    assert (inp.micro_batch, inp.gen_batch, inp.prompt_len, inp.response_len) == (1, 1, 256, 256)
    explicit = PlanOptions(offload=True, micro_batch=8, actor_zero=3, frozen_zero=0, prompt_len=64)
    inp = plan_input("remax", config, explicit)
    actor, reference, _ = inp.models
    assert (actor.zero_stage, reference.zero_stage, inp.micro_batch, inp.prompt_len) == (
        3,
        0,
        8,
        64,
    )
    assert actor.offload_optimizer and not actor.offload_params and not reference.offload_params


def test_reward_model_shape_comes_from_the_config():
    mistral = compose_stage("remax", ["experiment=remax_mistral7b_card"])
    reward = plan_input("remax", mistral, PlanOptions()).models[2]
    # reward_model.path=openbmb/UltraRM-13b → hydra_conf/model/ultrarm_13b.yaml → Llama-2-13B value
    # model: 13,015,864,320 − 32000·5120 (LM head) + 5120 (value head) = 12,852,029,440
    assert reward.shape == ModelShape.ultrarm_13b()
    assert reward.shape.n_params == 12_852_029_440
    # the OPT preset's RM path is a placeholder: planned actor-sized unless plan.reward_model says
    opt = compose_stage("remax", ["experiment=remax_opt1.3b_official"])
    assert plan_input("remax", opt, PlanOptions()).models[2].shape == (
        ModelShape.opt_1_3b().as_value_model()
    )
    named = plan_input("remax", opt, PlanOptions(reward_model="opt_350m")).models[2]
    assert named.shape == ModelShape.opt_350m().as_value_model()


def test_rm_stage_plans_two_rows_per_pair():
    config = compose_stage("reward_model", ["experiment=rm_llama2_7b_official"])
    inp = plan_input("reward_model", config, PlanOptions())
    (rm,) = inp.models
    assert rm.role == "rm" and rm.trainable and not rm.shape.lm_head
    # 16 pairs per rank → 32 sequences of data.max_seq_len 512 tokens
    assert (inp.micro_batch, inp.prompt_len + inp.response_len) == (32, 512)


@pytest.mark.parametrize(
    "overrides",
    [
        # ZeRO-0 replicates the actor's 16-bit weights, gradients and fp32 Adam states on every GPU:
        # 16 bytes × 6.74e9 ≈ 100 GiB before anything else
        ["deepspeed.zero_stage=0", "deepspeed.offload_optimizer=false"],
        # 128 prompts per GPU: the experience phase holds 7 fp32 B×L×V copies (the release logs
        # full-vocabulary KL and entropy), 7 · 128·512·32000·4 B ≈ 55 GiB, over ~19 GiB of states
        ["train.batch_size=512", "train.micro_batch_size=128"],
    ],
    ids=["zero0-no-offload", "micro-batch-128"],
)
def test_negative_control_a_llama_preset_that_cannot_fit_is_oom(overrides):
    config = compose_stage("remax", ["experiment=remax_llama2_7b_official", *overrides])
    result = plan(plan_input("remax", config, PlanOptions()))
    assert not result.fits
    assert result.table().splitlines()[-1] == "verdict: OOM"
    assert "memory planner estimates" in check_fits("remax", config)
