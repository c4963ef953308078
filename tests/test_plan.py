"""Tests for the per-GPU memory planner (remax/plan.py).

Hand-computed numbers carry their arithmetic in comments; arithmetic checks are exact (integer bytes).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from remax.plan import (
    GIB,
    RESIDENT,
    ModelPlacement,
    ModelShape,
    Part,
    PlanInput,
    PushRoute,
    kv_cache_bytes,
    layer_activation_bytes,
    logits_bytes,
    max_micro_batch,
    plan,
    ppo_models,
    remax_models,
    reward_model_models,
    sft_models,
    training_activation_bytes,
)

# A 1B-parameter model: V·h = 32000·2048 = 65,536,000; one layer ≈ (1e9 − 2·65,536,000) / 16 = 54,308,000.
ONE_B = ModelShape(
    n_params=1_000_000_000,
    hidden_size=2048,
    num_layers=16,
    num_heads=16,
    num_kv_heads=16,
    vocab_size=32000,
    intermediate_size=5504,
)
# A toy GQA shape: head_dim = 64 / 4 = 16, 2 KV heads.
TINY = ModelShape(
    n_params=10_000,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    vocab_size=100,
    intermediate_size=256,
)
LLAMA = ModelShape.llama2_7b()


def _one(shape=ONE_B, *, role="actor", world=4, **kw):
    """Plan with a single model; returns the plan."""
    m = ModelPlacement(role=role, shape=shape, **kw)
    return plan(PlanInput(models=(m,), world_size=world, prompt_len=3, response_len=5))


def _llama(models_fn, *, offload, batch=1, world=4, **kw):
    return PlanInput(
        models=models_fn(LLAMA, LLAMA, offload=offload),
        world_size=world,
        micro_batch=batch,
        prompt_len=256,
        response_len=256,
        **kw,
    )


# --------------------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------------------


def test_preset_parameter_counts_match_published_models():
    # Llama-2-7B: 32·(4·4096² + 3·4096·11008 + 2·4096) + 4096 + 2·32000·4096 = 6,738,415,616
    assert LLAMA.n_params == 6_738_415_616
    # Mistral-7B (GQA, 8 KV heads, I = 14336): 7,241,732,096
    assert ModelShape.mistral_7b().n_params == 7_241_732_096
    assert ModelShape.mistral_7b().num_kv_heads == 8
    # OPT-1.3B: 50272·2048 + 2050·2048 + 24·50,358,272 + 2·2048 = 1,315,758,080
    assert ModelShape.opt_1_3b().n_params == 1_315_758_080
    # OPT-350m: 50272·512 + 2050·1024 + 2·512·1024 + 24·12,596,224 (no final LN) = 331,196,416
    assert ModelShape.opt_350m().n_params == 331_196_416
    assert ModelShape.opt_350m().tie_word_embeddings


def test_from_hf_config_defaults_kv_heads_and_head_dim():
    cfg = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 100,
        "intermediate_size": 128,
    }
    s = ModelShape.from_hf_config(cfg)
    assert s.num_kv_heads == 4 and s.head_dim == 16
    # per layer 4·64² + 3·64·128 + 2·64 = 16,384 + 24,576 + 128 = 41,088
    # 2 layers + final norm + embedding + untied LM head: 82,176 + 64 + 2·100·64 = 95,040
    assert s.n_params == 95_040


def test_value_model_drops_untied_lm_head_and_adds_value_head():
    v = LLAMA.as_value_model()
    # 6,738,415,616 − 32000·4096 + 4096
    assert v.n_params == 6_738_415_616 - 131_072_000 + 4096
    assert not v.lm_head and v.as_value_model() == v
    opt = ModelShape.opt_350m()
    assert opt.as_value_model().n_params == opt.n_params + 1024  # tied: nothing to drop


# --------------------------------------------------------------------------------------------------
# model states, hand-computed: 1B params, fp16, world 4
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "params", "grads", "optim"),
    [
        # ZeRO-0: 2·1e9, 2·1e9, 12·1e9
        (0, 2_000_000_000, 2_000_000_000, 12_000_000_000),
        # ZeRO-1 partitions the optimizer: 12·1e9/4 = 3e9
        (1, 2_000_000_000, 2_000_000_000, 3_000_000_000),
        # ZeRO-2 also the gradients: 2·1e9/4 = 5e8
        (2, 2_000_000_000, 500_000_000, 3_000_000_000),
        # ZeRO-3 also the parameters: 2·1e9/4 = 5e8
        (3, 500_000_000, 500_000_000, 3_000_000_000),
    ],
)
def test_model_states_by_zero_stage(stage, params, grads, optim):
    p = _one(trainable=True, zero_stage=stage)
    assert p.bytes_of(part=Part.PARAMETERS) == params
    assert p.bytes_of(part=Part.GRADIENTS) == grads
    assert p.bytes_of(part=Part.OPTIMIZER) == optim
    assert p.model_states_bytes() == params + grads + optim


def test_step_transient_and_reduce_bucket():
    # ZeRO-2 step: (2 + 4) bytes · 1e9/4 = 1.5e9; bucket: 2 · min(1e9, 5e8) = 1e9
    p = _one(trainable=True, zero_stage=2)
    assert p.bytes_of(part=Part.STEP_GRADIENTS, phase="step:actor") == 1_500_000_000
    assert p.bytes_of(part=Part.REDUCE_BUCKET, phase="train:actor") == 1_000_000_000
    # ZeRO-0: the whole model is one partition: 6 · 1e9; no reduce bucket
    p0 = _one(trainable=True, zero_stage=0)
    assert p0.bytes_of(part=Part.STEP_GRADIENTS) == 6_000_000_000
    assert p0.bytes_of(part=Part.REDUCE_BUCKET) == 0
    # ZeRO-3 steps one sub-group (≤ 1e9 elements) at a time: a 2e9 model on 1 GPU → 6 · 1e9
    big = replace(ONE_B, n_params=2_000_000_000)
    assert (
        _one(big, world=1, trainable=True, zero_stage=3).bytes_of(part=Part.STEP_GRADIENTS)
        == 6 * 1_000_000_000
    )


def test_offload_and_fp32():
    # ZeRO-2 + optimizer offload: optimizer and gradients on CPU, 16-bit params stay, no GPU step
    p = _one(trainable=True, zero_stage=2, offload_optimizer=True)
    assert p.bytes_of(part=Part.PARAMETERS) == 2_000_000_000
    assert p.bytes_of(part=Part.GRADIENTS) == 0
    assert p.bytes_of(part=Part.OPTIMIZER) == 0
    assert p.bytes_of(part=Part.STEP_GRADIENTS) == 0
    # ZeRO-3 + both offloads: no resident model states at all
    p3 = _one(trainable=True, zero_stage=3, offload_optimizer=True, offload_params=True)
    assert p3.resident_bytes == 0
    # fp32 ZeRO-0: params 4e9, grads 4e9, Adam m+v 8e9, no fp32 cast at the step
    p32 = _one(trainable=True, zero_stage=0, dtype_bytes=4)
    assert p32.bytes_of(part=Part.PARAMETERS) == 4_000_000_000
    assert p32.bytes_of(part=Part.GRADIENTS) == 4_000_000_000
    assert p32.bytes_of(part=Part.OPTIMIZER) == 8_000_000_000
    assert p32.bytes_of(part=Part.STEP_GRADIENTS) == 0


def test_frozen_zero3_partition_and_gathered_layer():
    # resident 2·1e9/4 = 5e8; gathered unit = 2 · max(65,536,000, 54,308,000) = 131,072,000
    p = _one(role="reference", trainable=False, zero_stage=3)
    assert p.bytes_of(part=Part.PARAMETERS, phase=RESIDENT) == 500_000_000
    assert p.bytes_of(part=Part.GATHERED, phase="experience") == 131_072_000
    assert p.bytes_of(part=Part.GRADIENTS) == p.bytes_of(part=Part.OPTIMIZER) == 0
    # with parameter offload nothing is resident, the gathered layer still comes to the GPU
    po = _one(role="reference", trainable=False, zero_stage=3, offload_params=True)
    assert po.resident_bytes == 0
    assert po.bytes_of(part=Part.GATHERED) == 131_072_000
    # ZeRO-0 frozen: the full 16-bit copy, nothing gathered
    p0 = _one(role="reference", trainable=False, zero_stage=0)
    assert p0.bytes_of(part=Part.PARAMETERS) == 2_000_000_000
    assert p0.bytes_of(part=Part.GATHERED) == 0


# --------------------------------------------------------------------------------------------------
# activations, KV cache, logits: toy shape h 64, a 4, kv 2, L 2, V 100, s = 3 + 5 = 8, b = g = 3
# --------------------------------------------------------------------------------------------------


def test_kv_cache_bytes():
    # 2 (K,V) · 2 layers · 2 kv heads · 16 head_dim · 8 tokens · 3 seqs · 2 bytes = 6,144
    assert kv_cache_bytes(TINY, 8, 3, 2) == 6_144
    p = plan(
        PlanInput(
            models=(ModelPlacement(role="actor", shape=TINY, trainable=True),),
            world_size=1,
            micro_batch=3,
            prompt_len=3,
            response_len=5,
        )
    )
    assert p.bytes_of(part=Part.KV_CACHE, phase="generation") == 6_144


def test_activation_formulas():
    # one layer: s·b·(34h + 5·a·s) = 8·3·(34·64 + 5·4·8) = 24·(2176 + 160) = 56,064
    assert layer_activation_bytes(TINY, 8, 3, 2) == 56_064
    assert layer_activation_bytes(TINY, 8, 3, 4) == 2 * 56_064  # fp32 doubles
    # no recompute: L · 56,064 = 112,128
    assert training_activation_bytes(TINY, 8, 3, 2, grad_checkpointing=False) == 112_128
    # full checkpointing: L·s·b·h·2 + one layer = 2·8·3·64·2 + 56,064 = 6,144 + 56,064 = 62,208
    assert training_activation_bytes(TINY, 8, 3, 2, grad_checkpointing=True) == 62_208


def test_logits_in_training_and_experience():
    models = (
        ModelPlacement(role="actor", shape=TINY, trainable=True),
        ModelPlacement(role="reference", shape=TINY, trainable=False),
    )
    inp = PlanInput(models=models, world_size=1, micro_batch=3, prompt_len=3, response_len=5)
    p = plan(inp)
    one_copy = 3 * 8 * 100 * 4  # b·s·V·4 = 9,600
    assert logits_bytes(TINY, 8, 3) == one_copy
    # training loss: 4 fp32 copies = 38,400
    assert p.bytes_of(role="actor", part=Part.LOGITS, phase="train:actor") == 4 * one_copy
    # experience with full-vocab KL/entropy logging: 7 copies (actor 1 + 5 work copies, reference 1)
    assert p.bytes_of(part=Part.LOGITS, phase="experience") == 7 * one_copy
    assert p.bytes_of(role="reference", part=Part.LOGITS, phase="experience") == one_copy
    # gather-only experience: 3 copies (2 logits + one log-softmax at a time)
    p_lean = plan(replace(inp, full_vocab_logging=False))
    assert p_lean.bytes_of(part=Part.LOGITS, phase="experience") == 3 * one_copy
    # generation samples from the last position only: g·V·4 = 1,200
    assert p.bytes_of(part=Part.LOGITS, phase="generation") == 1_200


# --------------------------------------------------------------------------------------------------
# total, table, verdict
# --------------------------------------------------------------------------------------------------


def test_total_is_overhead_plus_resident_plus_peak_phase():
    p = plan(_llama(ppo_models, offload=False, batch=4))
    peak = max(p.phases, key=p.phase_bytes)
    assert p.peak_phase == peak
    assert p.total_bytes == p.overhead_bytes + p.resident_bytes + p.phase_bytes(peak)
    assert p.overhead_bytes == 3 * GIB
    # the counted parts add up to the total; the breakdown rows add up too
    assert sum(it.nbytes for it in p.counted_items) + p.overhead_bytes == p.total_bytes
    rows = p.breakdown()
    assert set(rows) == {"actor", "reference", "reward", "critic"}
    assert sum(r["total"] for r in rows.values()) * GIB + p.overhead_bytes == pytest.approx(
        p.total_bytes
    )


def test_table_last_line_is_verdict():
    fits = plan(_llama(remax_models, offload=True, batch=8))
    oom = plan(_llama(ppo_models, offload=False, batch=1))
    assert fits.table().splitlines()[-1] == "verdict: fits"
    assert oom.table().splitlines()[-1] == "verdict: OOM"
    header = fits.table().splitlines()[2].split()
    assert header == [
        "model",
        "parameters",
        "gradients",
        "optimizer",
        "activations",
        "logits",
        "kv_cache",
        "total",
    ]
    rows = [line.split()[0] for line in oom.table().splitlines()[3:8]]
    assert rows == ["actor", "reference", "reward", "critic", "overhead"]


def test_fits_is_total_against_capacity():
    p = plan(_llama(remax_models, offload=True))
    assert p.fits
    assert not plan(replace(p.inp, gpu_memory_gib=p.total_gib - 0.01)).fits
    assert plan(replace(p.inp, gpu_memory_gib=p.total_gib)).fits


# --------------------------------------------------------------------------------------------------
# monotonicity and max_micro_batch
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("models_fn", [remax_models, ppo_models])
@pytest.mark.parametrize("offload", [False, True])
def test_more_gpus_never_increase_per_gpu_memory(models_fn, offload):
    totals = [
        plan(_llama(models_fn, offload=offload, batch=4, world=w)).total_bytes
        for w in (1, 2, 3, 4, 8, 16, 64)
    ]
    assert totals == sorted(totals, reverse=True)


def test_larger_batch_never_decreases_memory():
    totals = [
        plan(_llama(ppo_models, offload=True, batch=b)).total_bytes for b in (1, 2, 4, 8, 16, 64)
    ]
    assert totals == sorted(totals)


def test_grad_checkpointing_reduces_activations():
    for shape in (TINY, ONE_B, LLAMA):
        for seq in (8, 512):
            with_ckpt = training_activation_bytes(shape, seq, 2, 2, grad_checkpointing=True)
            without = training_activation_bytes(shape, seq, 2, 2, grad_checkpointing=False)
            assert with_ckpt < without
    ckpt = plan(_llama(remax_models, offload=True, batch=8))
    no_ckpt_models = tuple(
        replace(m, grad_checkpointing=False) if m.trainable else m for m in ckpt.inp.models
    )
    no_ckpt = plan(replace(ckpt.inp, models=no_ckpt_models))
    assert ckpt.bytes_of(part=Part.ACTIVATIONS, phase="train:actor") < no_ckpt.bytes_of(
        part=Part.ACTIVATIONS, phase="train:actor"
    )


@pytest.mark.parametrize(
    ("models_fn", "offload"),
    [(remax_models, False), (remax_models, True), (ppo_models, True)],
)
def test_max_micro_batch_is_the_boundary(models_fn, offload):
    inp = _llama(models_fn, offload=offload)
    k = max_micro_batch(inp)
    assert 0 < k < 512
    assert plan(replace(inp, micro_batch=k, generation_batch=k)).fits
    assert not plan(replace(inp, micro_batch=k + 1, generation_batch=k + 1)).fits


def test_max_micro_batch_edges():
    assert max_micro_batch(_llama(ppo_models, offload=False)) == 0
    tiny = PlanInput(
        models=(ModelPlacement(role="actor", shape=TINY, trainable=True),), world_size=1
    )
    assert max_micro_batch(tiny, limit=37) == 37


# --------------------------------------------------------------------------------------------------
# Llama-2-7B actor + Llama-2-7B RM on 4×80 GB, bf16, prompt 256 + answer 256 (spec §6 README table)
# --------------------------------------------------------------------------------------------------


def test_layouts_built_by_the_helpers():
    remax = remax_models(LLAMA, LLAMA, offload=True)
    ppo = ppo_models(LLAMA, LLAMA, offload=True)
    assert [m.role for m in remax] == ["actor", "reference", "reward"]
    assert [m.role for m in ppo] == ["actor", "reference", "reward", "critic"]
    actor, ref, rm, critic = ppo
    assert actor.trainable and actor.zero_stage == 2 and actor.grad_checkpointing
    assert actor.offload_optimizer and not actor.offload_params
    assert not ref.trainable and ref.zero_stage == 3 and ref.offload_params
    assert rm.shape == LLAMA.as_value_model() and rm.offload_params
    # critic: the actor's settings, RM-sized (initialised from the RM)
    assert critic.shape == LLAMA.as_value_model()
    assert replace(critic, role="actor", shape=LLAMA) == actor


def test_no_offload_ppo_is_oom_and_remax_fits():
    # PPO model states alone: 2 trainable 7B models at ZeRO-2 (2N + 2N/4 + 12N/4 each) + 2 frozen
    # ZeRO-3 (2N/4 each) ≈ 74.6 GiB; the ZeRO-2 step adds (2+4)·N/4 ≈ 9.4 GiB → OOM at micro-batch 1,
    # even with zero overhead.
    ppo = plan(_llama(ppo_models, offload=False, batch=1))
    assert 74 * GIB < ppo.model_states_bytes() < 75 * GIB
    assert not ppo.fits
    assert not plan(replace(ppo.inp, overhead_gib=0.0)).fits
    # ReMax fits at micro-batch 1, 8, and at the README's no-offload maximum 26/GPU
    for b in (1, 8, 26):
        assert plan(_llama(remax_models, offload=False, batch=b)).fits
        assert not plan(_llama(ppo_models, offload=False, batch=b)).fits


def test_offload_both_fit_and_remax_fits_more():
    for b in (1, 8):
        assert plan(_llama(remax_models, offload=True, batch=b)).fits
        assert plan(_llama(ppo_models, offload=True, batch=b)).fits
    # the README's offload maxima (PPO 30/GPU, ReMax 40/GPU) are not contradicted
    assert plan(_llama(ppo_models, offload=True, batch=30)).fits
    assert plan(_llama(remax_models, offload=True, batch=40)).fits
    assert max_micro_batch(_llama(remax_models, offload=True)) > max_micro_batch(
        _llama(ppo_models, offload=True)
    )


@pytest.mark.parametrize(("offload", "batch"), [(False, 1), (False, 8), (True, 1), (True, 8)])
def test_remax_saves_35_to_55_percent_vs_ppo(offload, batch):
    # The paper (v4) reports ~46% less GPU memory at 7B. This model gives 39% (no offload, where the
    # PPO figure is the estimated need of an OOM run), 42% (offload, b 1) and 38% (offload, b 8):
    # the critic's states and its optimizer-step transient are what ReMax saves; the shared transients
    # (KV cache, logits, activations) dilute the saving as the batch grows. Band stated, not tuned.
    remax = plan(_llama(remax_models, offload=offload, batch=batch)).total_bytes
    ppo = plan(_llama(ppo_models, offload=offload, batch=batch)).total_bytes
    assert 0.35 <= 1 - remax / ppo <= 0.55


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"role": "policy", "trainable": True},
        {"role": "reference", "trainable": True},
        {"role": "reference", "trainable": False, "zero_stage": 2, "offload_params": True},
        {"role": "actor", "trainable": True, "zero_stage": 0, "offload_optimizer": True},
        {"role": "reward", "trainable": False, "offload_optimizer": True},
        {"role": "actor", "trainable": True, "zero_stage": 4},
        {"role": "actor", "trainable": True, "dtype_bytes": 1},
    ],
)
def test_invalid_placements_are_rejected(kw):
    with pytest.raises(ValueError):
        ModelPlacement(shape=TINY, **kw)


def test_invalid_inputs_are_rejected():
    actor = ModelPlacement(role="actor", shape=TINY, trainable=True)
    with pytest.raises(ValueError):
        PlanInput(models=(actor, actor), world_size=1)
    with pytest.raises(ValueError):
        PlanInput(models=(actor,), world_size=0)
    with pytest.raises(ValueError):
        PlanInput(models=(actor,), world_size=1, micro_batch=0)
    assert PlanInput(models=[actor], world_size=1, micro_batch=5).gen_batch == 5


# --------------------------------------------------------------------------------------------------
# the Mistral recipe's RM, supervised stages, separate offload switches
# --------------------------------------------------------------------------------------------------


def test_ultrarm_13b_is_llama2_13b_as_a_value_model():
    rm = ModelShape.ultrarm_13b()
    # Llama-2-13B: 40·(4·5120² + 3·5120·13824 + 2·5120) + 5120 + 2·32000·5120 = 13,015,864,320;
    # without the LM head (32000·5120) and with a 5120→1 head: 12,852,029,440
    assert rm.n_params == 13_015_864_320 - 163_840_000 + 5120 == 12_852_029_440
    assert not rm.lm_head and (rm.hidden_size, rm.num_layers, rm.num_kv_heads) == (5120, 40, 40)


def test_supervised_stage_has_only_training_phases():
    # SFT: 1B params, ZeRO-2 on 4 GPUs; no generation or experience phase without a rollout
    inp = PlanInput(
        models=sft_models(ONE_B), world_size=4, micro_batch=2, prompt_len=3, response_len=5
    )
    p = plan(replace(inp, rollout=False))
    assert p.phases == ("train:sft", "step:sft")
    # the loss logits of the trained LM: 4 fp32 copies of b·s·V = 4 · 2·8·32000·4 = 8,192,000
    assert p.bytes_of(part=Part.LOGITS) == 8_192_000
    # resident states as an actor's at ZeRO-2: 2e9 + 5e8 + 3e9
    assert p.model_states_bytes() == 5_500_000_000
    # the trained RM: a value model, so no logits at all
    (rm,) = reward_model_models(ONE_B)
    assert rm.role == "rm" and rm.trainable and rm.shape == ONE_B.as_value_model()
    p_rm = plan(replace(inp, models=(rm,), rollout=False))
    assert p_rm.phases == ("train:rm", "step:rm") and p_rm.bytes_of(part=Part.LOGITS) == 0


def test_offload_halves_are_separate_switches():
    actor, ref, rm = remax_models(LLAMA, LLAMA, offload_optimizer=True, offload_frozen_params=False)
    assert actor.offload_optimizer and not ref.offload_params and not rm.offload_params
    actor, ref, _ = remax_models(LLAMA, LLAMA, offload_optimizer=False, offload_frozen_params=True)
    assert not actor.offload_optimizer and ref.offload_params
    # a ZeRO-3 actor may offload its parameters too; the release's `offload` leaves them on GPU
    actor3 = remax_models(LLAMA, LLAMA, actor_zero_stage=3, offload_actor_params=True)[0]
    assert actor3.offload_params
    assert not remax_models(LLAMA, LLAMA, actor_zero_stage=3, offload=True)[0].offload_params
    # frozen parameter offload exists only at ZeRO-3
    assert not remax_models(LLAMA, LLAMA, frozen_zero_stage=0, offload=True)[1].offload_params


def test_vllm_rollouts_count_the_engines_weights_and_kv_budget_in_generation_only():
    """rollout.engine=vllm: generation holds vLLM's copy of the actor (N·d) and its KV budget
    instead of HF generate's cache; with sleep mode both are gone while the actor trains."""
    m = ModelPlacement(role="actor", shape=ONE_B, trainable=True, zero_stage=2)
    common = dict(models=(m,), world_size=4, prompt_len=3, response_len=5)
    hf = plan(PlanInput(**common))
    asleep = plan(PlanInput(**common, vllm_kv_cache_gib=2.0))
    awake = plan(PlanInput(**common, vllm_kv_cache_gib=2.0, vllm_sleep=False))
    weights, kv = ONE_B.n_params * 2, 2 * GIB  # bf16 copy; the configured budget
    assert asleep.bytes_of(part=Part.VLLM_WEIGHTS, phase="generation") == weights
    assert asleep.bytes_of(part=Part.VLLM_KV_CACHE, phase="generation") == kv
    assert asleep.bytes_of(part=Part.KV_CACHE) == 0 < hf.bytes_of(part=Part.KV_CACHE)
    assert asleep.resident_bytes == hf.resident_bytes
    assert awake.resident_bytes == hf.resident_bytes + weights + kv


def test_vllm_engine_counts_its_weights_and_kv_per_gpu_and_the_file_push_per_node():
    """A known Llama shape, by hand: h=64, L=2, 4 heads (head_dim 16), 2 KV heads, MLP 128,
    vocab 100, untied. Per layer: q 64·64 + k, v 2·64·32 + o 64·64 = 12,288, MLP 3·64·128 = 24,576,
    2 norms 128 → 36,992; N = 2·36,992 + final norm 64 + embedding and head 2·100·64 = 86,848."""
    shape = ModelShape.from_hf_config(
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "vocab_size": 100,
        }
    )
    assert shape.n_params == 86_848
    actor = ModelPlacement(role="actor", shape=shape, trainable=True, zero_stage=2)
    common = dict(models=(actor,), world_size=4, prompt_len=3, response_len=5)
    engine = dict(vllm_kv_cache_gib=0.5, ranks_per_node=4, node_memory_gib=1.0)
    cuda = plan(PlanInput(**common, **engine))  # direct: the default route
    cpu = plan(PlanInput(**common, **engine, vllm_push="file"))
    for p in (cuda, cpu):  # per GPU: the engine's bf16 copy of the weights + its KV budget
        assert p.bytes_of(part=Part.VLLM_WEIGHTS) == 86_848 * 2 == 173_696
        assert p.bytes_of(part=Part.VLLM_KV_CACHE) == GIB // 2
        # the table has a vllm column, so its rows add up to the total again
        assert p.table().splitlines()[2].split()[-2:] == ["vllm", "total"]
        rows = p.breakdown()
        assert rows["actor"]["total"] * GIB + p.overhead_bytes == pytest.approx(p.total_bytes)
    # per node: the file route holds, per rank, the CPU state-dict copy and the /dev/shm file
    assert cpu.inp.vllm_push is PushRoute.file
    assert cpu.node_push_bytes == 4 * 2 * 173_696 and cpu.node_push_fits
    assert cuda.node_push_bytes == 0 and "direct" in cuda.table()
    assert cpu.total_bytes == cuda.total_bytes  # the file route puts nothing more on the GPU
    assert plan(PlanInput(**common, vllm_push="file")).node_push_bytes == 0  # hf decodes


def test_a_file_push_that_cannot_fit_the_node_is_flagged():
    """Llama-2-7B in bf16, 4 ranks: 4 × 2 × 6,738,415,616 × 2 B = 107.8 GB = 100.4 GiB per push."""
    models = remax_models(LLAMA, LLAMA)
    inp = PlanInput(models=models, world_size=4, vllm_kv_cache_gib=8.0, ranks_per_node=4)
    file = replace(inp, vllm_push=PushRoute.file)
    assert plan(file).node_push_bytes == 4 * 2 * 6_738_415_616 * 2
    assert plan(file).node_push_fits  # node memory unknown: not checked
    assert plan(replace(file, node_memory_gib=101.0)).node_push_fits
    assert not plan(replace(file, node_memory_gib=100.0)).node_push_fits
    assert plan(replace(inp, node_memory_gib=1.0)).node_push_fits  # direct: no buffer
    with pytest.raises(ValueError, match="ranks_per_node"):
        replace(inp, ranks_per_node=0)
