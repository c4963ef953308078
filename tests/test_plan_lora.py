"""The planner with LoRA (``model.lora.rank`` > 0, remax/plan_lora.py): adapters counted exactly
from the shape, the base frozen and stored once, no reference copy; and the Llama-2 presets."""

from __future__ import annotations

import pytest

from remax.plan import (
    RESIDENT,
    ModelShape,
    Part,
    PlanInput,
    plan,
    ppo_models,
    remax_models,
    reward_model_models,
)
from remax.plan_lora import DEFAULT_TARGETS, adapter_params

LLAMA = ModelShape.llama2_7b()
LLAMA_TARGETS = DEFAULT_TARGETS["llama"]


def test_llama2_13b_and_70b_presets_match_published_counts():
    # 13B: 40·(4·5120² + 3·5120·13824 + 2·5120) + 5120 + 2·32000·5120 = 13,015,864,320
    assert ModelShape.llama2_13b().n_params == 13_015_864_320
    # 70B (GQA: k, v 8192 → 8·128 = 1024): per layer 2·8192² + 2·8192·1024 + 3·8192·28672 + 2·8192
    # = 855,654,400; 80 of them + 8192 + 2·32000·8192 = 68,976,648,192
    big = ModelShape.llama2_70b()
    assert big.n_params == 68_976_648_192
    assert (big.num_heads, big.num_kv_heads, big.head_dim, big.num_layers) == (64, 8, 128, 80)


def test_adapter_count_of_llama2_7b_and_mistral_7b_at_rank_8():
    # Llama-2-7B, every projection: 32 layers · 8 · [q, o: 2·(4096 + 4096); k, v: 2·(4096 + 4096);
    # gate, up, down: 3·(4096 + 11008)] = 256 · 78,080 = 19,988,480 (PEFT prints the same)
    assert adapter_params(LLAMA, 8) == 19_988_480
    assert adapter_params(LLAMA, 8, LLAMA_TARGETS) == 19_988_480
    # q and v only: 32 · 8 · 2 · 8192 = 4,194,304
    assert adapter_params(LLAMA, 8, ["q_proj", "v_proj"]) == 4_194_304
    # Mistral-7B (GQA, k/v out 1024, I 14336): 32 · 8 · (2·8192 + 2·5120 + 3·18432) = 20,971,520
    assert adapter_params(ModelShape.mistral_7b(), 8) == 20_971_520
    assert adapter_params(LLAMA, 0) == 0


def test_an_unknown_target_module_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match=r"lm_head.*q_proj, k_proj"):
        adapter_params(LLAMA, 8, ["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="o_proj"):  # OPT calls it out_proj
        adapter_params(ModelShape.opt_350m(), 8, ["o_proj"])


def _peft_trainable(model, targets) -> int:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=list(targets)))
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


@pytest.mark.parametrize("targets", [LLAMA_TARGETS, ("q_proj", "v_proj", "down_proj")])
def test_adapter_count_equals_peft_on_a_tiny_gqa_llama(targets):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: k and v project 64 → 32
        num_hidden_layers=2,
        vocab_size=100,
    )
    model = LlamaForCausalLM(config)
    shape = ModelShape.from_hf_config(config.to_dict())
    assert shape.n_params == sum(p.numel() for p in model.parameters())
    assert _peft_trainable(model, targets) == adapter_params(shape, 8, targets)


def test_adapter_count_equals_peft_on_a_tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        hidden_size=32,
        ffn_dim=48,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=50,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    )
    shape = ModelShape.from_hf_config(config.to_dict())
    targets = DEFAULT_TARGETS["opt"]
    assert _peft_trainable(OPTForCausalLM(config), targets) == adapter_params(shape, 8, targets)


def _rl(models_fn, **kw) -> PlanInput:
    return PlanInput(
        models=models_fn(LLAMA, LLAMA, **kw), world_size=4, prompt_len=256, response_len=256
    )


def test_a_lora_remax_plan_has_no_reference_and_trains_only_the_adapters():
    full, lora = plan(_rl(remax_models)), plan(_rl(remax_models, lora_rank=8))
    assert [m.role for m in full.inp.models] == ["actor", "reference", "reward"]
    assert [m.role for m in lora.inp.models] == ["actor", "reward"]
    n, a = LLAMA.n_params, 19_988_480
    # ZeRO-2 actor: base + adapters stored whole in bf16, gradients and Adam on the adapters / 4
    assert lora.bytes_of("actor", Part.PARAMETERS, RESIDENT) == 2 * (n + a)
    assert lora.bytes_of("actor", Part.GRADIENTS, RESIDENT) == 2 * a // 4
    assert lora.bytes_of("actor", Part.OPTIMIZER, RESIDENT) == 12 * a // 4
    # Adam on 6.74e9 parameters vs on 2.0e7: 337× less
    assert lora.bytes_of(part=Part.OPTIMIZER) * 300 < full.bytes_of(part=Part.OPTIMIZER)
    # the step transient and the reduce bucket shrink to the adapters too
    assert lora.bytes_of("actor", Part.STEP_GRADIENTS) == 6 * a // 4
    assert lora.bytes_of("actor", Part.REDUCE_BUCKET) == 2 * a
    # the reference's logits are still held in the experience phase (on the actor, its owner)
    assert lora.bytes_of(part=Part.LOGITS, phase="experience") == full.bytes_of(
        part=Part.LOGITS, phase="experience"
    )
    # saved model states: the actor's gradients and Adam (2N/4 + 12N/4) and the ZeRO-3 reference
    # (2N/4), less the stored adapters (2A) and their gradients and Adam (14A/4): 4N − 5.5A
    saved = full.model_states_bytes() - lora.model_states_bytes()
    assert saved == 4 * n - 11 * a // 2 == 26_843_725_824 and lora.fits


def test_lora_at_zero3_partitions_base_and_adapters():
    inp = _rl(remax_models, lora_rank=8, actor_zero_stage=3)
    a = 19_988_480
    # ⌈(6,738,415,616 + 19,988,480) / 4⌉ = 1,689,601,024 parameters per GPU, in bf16
    assert plan(inp).bytes_of("actor", Part.PARAMETERS, RESIDENT) == 2 * 1_689_601_024
    assert inp.models[0].trainable_params == a


def test_lora_ppo_keeps_a_full_critic_and_no_reference():
    lora = plan(_rl(ppo_models, lora_rank=8))
    assert [m.role for m in lora.inp.models] == ["actor", "reward", "critic"]
    critic = lora.inp.models[2]
    assert not critic.lora and critic.trainable_params == LLAMA.as_value_model().n_params
    full = plan(_rl(ppo_models))
    assert lora.bytes_of("critic", Part.OPTIMIZER) == full.bytes_of("critic", Part.OPTIMIZER)


def test_a_lora_reward_model_trains_its_score_head_in_full():
    (rm,) = reward_model_models(LLAMA, lora_rank=8)
    # the value model has Llama's decoder layers, so the same adapters, + the 4096 → 1 head
    assert rm.adapter_params == 19_988_480 and rm.trainable_params == 19_988_480 + 4096


def test_a_lora_critic_trains_the_adapters_and_its_value_head():
    """``algo.critic_lora=true``: PPO's critic gets the actor's adapters + its h → 1 head."""
    lora = plan(_rl(ppo_models, lora_rank=8, critic_lora=True))
    critic = lora.inp.models[2]
    assert critic.lora and critic.trainable_params == 19_988_480 + 4096
    full_critic = plan(_rl(ppo_models, lora_rank=8))
    assert (
        lora.bytes_of("critic", Part.OPTIMIZER)
        < full_critic.bytes_of("critic", Part.OPTIMIZER) / 300
    )
    # the switch means nothing without actor adapters: the critic trains in full
    assert not plan(_rl(ppo_models, critic_lora=True)).inp.models[2].lora
