"""DeepSpeed engines from the generated config (spec test 20, second half): ZeRO-2 and ZeRO-3 take
the same steps, the ZeRO-3 export loads with ``from_pretrained``, and ZeRO-3 generation gathers the
parameters once per rollout.

2 gloo ranks on CPU, fp32, the client ``torch.optim.AdamW`` (no optimizer op is JIT-built; the
shared-memory comm op is, once per ``TORCH_EXTENSIONS_DIR``).
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from conftest import one_thread
from test_distributed import B, in_turn, spawn

from remax.config import (
    Aggregation,
    DeepSpeedConfig,
    DType,
    ModelConfig,
    OptimConfig,
    RemaxJobConfig,
    TrainConfig,
    deepspeed_json,
)

pytestmark = pytest.mark.filterwarnings("ignore")
ROWS, T = 8, 6


def test_json_is_generated_from_typed_config():
    train = TrainConfig(batch_size=32, micro_batch_size=4)
    optim = OptimConfig(grad_clip=1.0)
    ds = DeepSpeedConfig(enabled=True, zero_stage=3, offload_params=True, offload_optimizer=True)
    out = deepspeed_json(ds, optim=optim, train=train, dtype=DType.bfloat16, world_size=4)
    # 32 prompts over 4 ranks: 8 per rank, micro-batches of 4, 2 accumulation steps.
    assert out["train_batch_size"] == 32 and out["train_micro_batch_size_per_gpu"] == 4
    assert out["gradient_accumulation_steps"] == 2 and out["gradient_clipping"] == 1.0
    assert out["bf16"] == {"enabled": True} and out["zero_optimization"]["stage"] == 3
    assert out["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert out["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    ref = deepspeed_json(
        ds, optim=optim, train=train, dtype=DType.float32, world_size=4, inference=True
    )
    assert "gradient_clipping" not in ref and "offload_optimizer" not in ref["zero_optimization"]
    with pytest.raises(
        ValueError, match=r"train.batch_size=32: is not divisible by the world size 3"
    ):
        deepspeed_json(ds, optim=optim, train=train, dtype=DType.float32, world_size=3)
    with pytest.raises(ValueError, match="needs deepspeed.zero_stage=3"):
        DeepSpeedConfig(zero_stage=2, offload_params=True)


@pytest.mark.parametrize(
    "preset,stage", [("zero0", 0), ("zero2", 2), ("zero3", 3), ("zero3_offload", 3)]
)
def test_hydra_presets_select_the_stage(preset, stage):
    from jobs._config import compose_stage

    cfg = compose_stage("remax", [f"deepspeed={preset}"])
    assert cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == stage
    assert cfg.deepspeed.offload_params == (preset == "zero3_offload")
    assert not compose_stage("remax", []).deepspeed.enabled  # default: plain PyTorch


def _batch(vocab: int):
    g = torch.Generator().manual_seed(7)
    seq = torch.randint(3, vocab, (ROWS, 4 + T), generator=g)
    mask = torch.ones(ROWS, T, dtype=torch.bool)
    for i, n in enumerate([1, 2, 6, 6, 3, 6, 5, 6]):  # unequal lengths: the normaliser matters
        mask[i, n:] = False
    adv = torch.randn(ROWS, generator=g)[:, None].expand(ROWS, T).contiguous()
    return seq, mask, adv


def _policy():
    from remax.models.policy import load_policy

    model, tok = load_policy(
        ModelConfig(hidden_size=32, intermediate_size=64), seed=0, device="cpu"
    )
    return model, tok


def _ds_steps(rank, world, stage, out_dir) -> None:
    import deepspeed

    from remax import distributed
    from remax.algo.logprobs import logprobs_from_logits
    from remax.algo.remax import policy_gradient_loss
    from remax.models.policy import response_logits

    model, tok = _policy()
    train = TrainConfig(batch_size=ROWS, micro_batch_size=ROWS // world)
    optim = OptimConfig(lr=1e-2, grad_clip=1.0)
    ds = DeepSpeedConfig(enabled=True, zero_stage=stage)
    conf = deepspeed_json(ds, optim=optim, train=train, dtype=DType.float32, world_size=world)
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(0.9, 0.95))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=conf)
    seq, mask, adv = _batch(len(tok))
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    losses = []
    for _ in range(2):
        logits = response_logits(engine, seq[rows], torch.ones_like(seq[rows]), 4)
        logp = logprobs_from_logits(logits, seq[rows, 4:])
        denom = mask.sum()  # every rank holds the whole batch's mask here: the global count
        loss = policy_gradient_loss(logp, adv[rows], mask[rows], denominator=denom)
        # DeepSpeed averages gradients over ranks; our loss is already this rank's share of the
        # global mean, so scale by the world size to get the sum.
        engine.backward(loss * world)
        engine.step()
        losses.append(float(distributed.all_reduce_sum(loss.detach().clone())))
    if stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    if rank == 0:
        (out_dir / f"losses_{stage}.json").write_text(json.dumps(losses))
        engine.module.save_pretrained(out_dir / f"export_{stage}", state_dict=state)
    distributed.barrier()


def test_zero2_and_zero3_take_the_same_steps(tmp_path):
    from transformers import AutoModelForCausalLM

    spawn(in_turn, 2, _ds_steps, [(2, tmp_path), (3, tmp_path)])
    l2 = json.loads((tmp_path / "losses_2.json").read_text())
    l3 = json.loads((tmp_path / "losses_3.json").read_text())
    print(f"ZeRO-2 losses {l2}, ZeRO-3 losses {l3}")
    assert l2[0] == pytest.approx(l3[0], rel=1e-6, abs=1e-7)  # same weights, same batch
    assert l2[1] == pytest.approx(l3[1], rel=1e-5, abs=1e-7)  # after one (identical) update
    z2 = AutoModelForCausalLM.from_pretrained(tmp_path / "export_2")
    z3 = AutoModelForCausalLM.from_pretrained(tmp_path / "export_3")  # the consolidated shards
    s2, s3 = z2.state_dict(), z3.state_dict()
    assert s2.keys() == s3.keys()
    diff = max(float((s2[k] - s3[k]).abs().max()) for k in s2)
    print(f"ZeRO-2 vs ZeRO-3 export max |Δ| {diff:.3g}")
    # Two Adam steps at lr 1e-2 on O(0.1) weights; the stages reduce gradients in different
    # bucket orders (fp32), measured 7.8e-7: 1e-5 leaves room for another machine's kernels.
    assert diff <= 1e-5
    untrained, _ = _policy()
    assert any(not torch.equal(untrained.state_dict()[k], s3[k]) for k in s3), "export not trained"


def _generate_timing(rank, world, out_dir) -> None:
    import deepspeed

    from remax import distributed
    from remax.data.batching import collate_prompts
    from remax.rollout import SamplingConfig, generate

    model, tok = _policy()
    train = TrainConfig(batch_size=2 * world, micro_batch_size=2)
    conf = deepspeed_json(
        DeepSpeedConfig(enabled=True, zero_stage=3),
        optim=OptimConfig(),
        train=train,
        dtype=DType.float32,
        world_size=world,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=conf)
    batch = collate_prompts(tok, ["12+34=", "7+8=", "100+1=", "5+55="], 12, "cpu")
    sampling = SamplingConfig(max_new_tokens=16)
    out, times = {}, {}
    for mode in ("per_step", "once", "per_step", "once"):
        torch.manual_seed(0)
        distributed.barrier()
        t0 = time.perf_counter()
        kw = dict(greedy=False, eos_token_id=-1, pad_token_id=tok.pad_token_id)  # never stops
        if mode == "once":
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                ro = generate(engine.module, batch.input_ids, batch.attention_mask, sampling, **kw)
        else:  # ZeRO-3's hooks fetch every layer again at each decoding step
            ro = generate(engine.module, batch.input_ids, batch.attention_mask, sampling, **kw)
        times[mode] = time.perf_counter() - t0
        out[mode] = ro.response
    if rank == 0:
        assert torch.equal(out["once"], out["per_step"])
        (out_dir / "gen_times.json").write_text(json.dumps(times))
    distributed.barrier()


def test_zero3_generation_gathers_once(tmp_path):
    spawn(_generate_timing, 2, tmp_path)
    times = json.loads((tmp_path / "gen_times.json").read_text())
    print(f"ZeRO-3 decode of 4×16 tokens on 2 CPU ranks: {times}")
    assert set(times) == {"once", "per_step"}


def _ds_config(cfg: RemaxJobConfig, stage: int, **kw) -> RemaxJobConfig:
    return dataclasses.replace(cfg, deepspeed=DeepSpeedConfig(enabled=True, zero_stage=stage, **kw))


def _ds_trainer_step(rank, world, cfg, sampled, greedy, out_dir) -> None:
    """This rank's block of the rollout through ``RemaxTrainer.update`` on DeepSpeed engines."""
    from remax.trainers.remax import RemaxTrainer

    trainer = RemaxTrainer(cfg)
    rows = trainer.shard(list(range(sampled.response.shape[0])))
    block = slice(rows[0], rows[-1] + 1)
    metrics = trainer.update(sampled.select(block), greedy.select(block))
    params = {k: v.detach().clone() for k, v in trainer.actor.full_state_dict().items()}
    if rank == 0:
        torch.save(
            {"params": params, "metrics": metrics}, f"{out_dir}/ds_{cfg.deepspeed.zero_stage}.pt"
        )


@pytest.mark.parametrize(
    "stage,extra",
    [(0, {}), (2, {}), (3, {}), (3, {"offload_params": True, "offload_optimizer": True})],
    ids=["zero0", "zero2", "zero3", "zero3_offload"],
)
def test_deepspeed_trainer_step_matches_plain_one_rank(tmp_path, stage, extra):
    """One ReMax step on 2 ranks × B/2 through the trainer's DeepSpeed engines (actor at the given
    ZeRO stage, reference as a ZeRO-3 inference engine) equals 1 plain rank × B.

    The gradient norm is compared too: Adam's first step is nearly scale-free (m/√v ≈ sign g), so
    a gradient scaled by the world size or the accumulation steps would still move the weights
    alike, but not give the same norm. Micro-batches of B/4 per rank: two accumulation steps, the
    case ZeRO-3 gets wrong when the bare module (not the engine) is called.
    """
    from test_distributed import config, single_rank_side

    # Adam's eps at 1e-3 (not 1e-8): its first step moves a weight by lr·g/(|g| + eps), which for
    # |g| near 1e-8 flips with the last bit of g; a larger eps keeps the comparison about the
    # gradient, not about rounding in elements whose gradient is nearly zero.
    cfg = config(Aggregation.token_mean, micro=B // 4)
    cfg = dataclasses.replace(cfg, optim=OptimConfig(lr=1e-3, grad_clip=0.0, eps=1e-3))
    _, sampled, greedy, single = single_rank_side(cfg)
    spawn(_ds_trainer_step, 2, _ds_config(cfg, stage, **extra), sampled, greedy, str(tmp_path))
    ds = torch.load(tmp_path / f"ds_{stage}.pt", weights_only=True)
    diff = max(float((ds["params"][k] - single["params"][k]).abs().max()) for k in single["params"])
    print(f"ZeRO-{stage} {extra}: max |Δparam| vs plain {diff:.3g}")
    # One Adam step at lr 1e-3 on O(0.1) weights; fp32 with the reduction in another order
    # (DeepSpeed's buckets; DeepSpeedCPUAdam's own kernel under offload): measured <= 3e-9.
    assert diff <= 1e-7
    for key in ("reward/mean", "loss/policy", "optim/grad_norm", "kl/mean"):
        assert ds["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-5), key


def _ds_run(rank, world, cfg, stop_after) -> None:
    from test_distributed import _run_stage

    _run_stage(rank, world, cfg, stop_after)


def test_lora_adapters_under_zero3_stop_and_resume_bit_identical(tmp_path):
    """LoRA adapters on a 2-rank ZeRO-3 actor (#22; the base partitioned too, the path of the
    70B preset): a run stopped after step 3 and resumed exports bit-identically to an
    uninterrupted one, and its merged export differs from the base (the adapters trained and
    were merged). ZeRO-2 shares the engine's save and load (the tests above)."""
    stage = 3
    from safetensors.torch import load_file
    from test_distributed import _resume_config

    from remax.config import LoraConfig
    from remax.run_dir import run_dir_for

    def lora(cfg):
        cfg = _ds_config(cfg, stage)
        return dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, lora=LoraConfig(rank=8))
        )

    ref_cfg, cfg = lora(_resume_config(tmp_path / "a")), lora(_resume_config(tmp_path / "b"))
    spawn(_ds_run, 2, ref_cfg, 0)
    spawn(_ds_run, 2, cfg, 3)
    run_dir = run_dir_for(cfg, "remax")
    assert (run_dir / "checkpoints" / "step_3" / "COMPLETE").is_file()
    assert not (run_dir / "summary.json").exists()
    spawn(_ds_run, 2, cfg, 0)
    ref_dir = run_dir_for(ref_cfg, "remax")
    wa, wb = (load_file(d / "export" / "model.safetensors") for d in (ref_dir, run_dir))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not any("lora_" in k for k in wb), "the export is the merged model"
    base = _policy()[0].state_dict()
    assert any(not torch.equal(base[k], wb[k]) for k in wb if k in base)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_run_stop_resume_is_bit_identical_and_exports(tmp_path, stage):
    """A 2-rank DeepSpeed run stopped after step 3 (engine shards in step_3/deepspeed/) and resumed
    finishes bit-identical to an uninterrupted one; its export loads with ``from_pretrained``."""
    from safetensors.torch import load_file
    from test_distributed import _resume_config
    from transformers import AutoModelForCausalLM

    from remax.run_dir import run_dir_for

    ref_cfg = _ds_config(_resume_config(tmp_path / "a"), stage)
    cfg = _ds_config(_resume_config(tmp_path / "b"), stage)
    spawn(_ds_run, 2, ref_cfg, 0)
    spawn(_ds_run, 2, cfg, 3)
    run_dir = run_dir_for(cfg, "remax")
    step3 = run_dir / "checkpoints" / "step_3"
    assert (step3 / "COMPLETE").is_file() and not (run_dir / "summary.json").exists()
    assert not (step3 / "model.safetensors").exists()  # the weights are the engine's shards
    shards = sorted(p.name for p in (step3 / "deepspeed" / "actor").iterdir())
    print(f"ZeRO-{stage} step_3/deepspeed/actor: {shards}")
    assert sum("optim_states" in name for name in shards) == 2  # one optimizer shard per rank
    spawn(_ds_run, 2, cfg, 0)  # resumed from the engine state

    ref_dir = run_dir_for(ref_cfg, "remax")
    wa, wb = (load_file(d / "export" / "model.safetensors") for d in (ref_dir, run_dir))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (ref_dir, run_dir))
    assert sa["eval"] == sb["eval"] and sa["world_size"] == sb["world_size"] == 2
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r, q in zip(rows, ref_rows):
        assert {k: v for k, v in r.items() if k != "time/step_s"} == {
            k: v for k, v in q.items() if k != "time/step_s"
        }
    model = AutoModelForCausalLM.from_pretrained(run_dir / "export")  # consolidated from shards
    untrained, _ = _policy()
    trained = model.state_dict()
    assert all(trained[k].shape == v.shape for k, v in untrained.state_dict().items())
    assert any(not torch.equal(untrained.state_dict()[k], trained[k]) for k in trained)


def _ds_stage_step(rank, world, cfg, out_dir) -> None:
    from test_distributed_stages import trainer_for

    trainer = trainer_for(cfg)
    metrics = trainer.train_step()
    params = {k: v.detach().clone() for k, v in trainer.actor.full_state_dict().items()}
    if rank == 0:
        torch.save({"params": params, "metrics": metrics}, f"{out_dir}/ds_stage.pt")


@pytest.mark.parametrize("stage", ["sft", "reward_model"])
@pytest.mark.parametrize("zero", [2, 3])
def test_sft_and_reward_model_on_deepspeed_match_plain_one_rank(tmp_path, stage, zero):
    """The SFT and RM trainers' step on 2 ranks' DeepSpeed engines equals 1 plain rank's, with two
    micro-batches per rank (gradient accumulation inside the engine; the RM forwards through its
    submodules, not the engine's forward)."""
    from test_distributed_stages import B as SB
    from test_distributed_stages import config, one_step

    cfg = config(stage, micro=SB // 4)
    with one_thread():
        single = one_step(cfg)
    spawn(_ds_stage_step, 2, _ds_config(cfg, zero), str(tmp_path))
    ds = torch.load(tmp_path / "ds_stage.pt", weights_only=True)
    diff = max(float((ds["params"][k] - single["params"][k]).abs().max()) for k in ds["params"])
    print(f"{stage} ZeRO-{zero}: max |Δparam| vs plain {diff:.3g}")
    assert ds["params"].keys() == single["params"].keys()
    # Adam eps 1e-3 (see test_distributed_stages): the step is |Δg|-stable. ZeRO-3 sums in other
    # orders; measured one fp32 ulp at the norm weights (≈ 1: 1.2e-7); 2.5e-7 allows two.
    assert diff <= 2.5e-7
    for key in single["metrics"]:
        assert ds["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-5), key


def test_deepspeed_resume_needs_the_engine_state(tmp_path):
    """A plain checkpoint resumed with deepspeed=... is refused in one line (nothing is lost)."""
    from test_distributed import _resume_config

    from remax.engines import DeepSpeedActor

    step = tmp_path / "step_2"
    step.mkdir()
    actor = object.__new__(DeepSpeedActor)  # no engine needed to read the directory
    actor.name = "actor"
    with pytest.raises(ValueError, match="holds no DeepSpeed engine state"):
        actor.load(step)
    assert _resume_config(tmp_path).deepspeed.enabled is False


def _ds_ppo_step(rank, world, cfg, rollout, out_dir) -> None:
    from test_distributed_stages import trainer_for

    trainer = trainer_for(cfg)
    rows = torch.tensor(trainer.shard(list(range(rollout.response.shape[0]))))
    metrics = trainer.update(rollout.select(rows))
    params = {k: v.detach().clone() for k, v in trainer.actor.full_state_dict().items()}
    critic = trainer.critic_actor.full_state_dict()
    params.update({f"critic.{k}": v.detach().clone() for k, v in critic.items()})
    if rank == 0:
        torch.save({"params": params, "metrics": metrics}, f"{out_dir}/ds_ppo.pt")


@pytest.mark.parametrize("zero", [2, 3])
def test_ppo_on_deepspeed_matches_plain_one_rank(tmp_path, zero):
    """PPO's actor and critic as DeepSpeed engines (each optimizer step one minibatch, two
    micro-batches per rank): 4 actor and 4 critic steps on 2 ranks equal 1 plain rank's."""
    from test_distributed import shorten
    from test_distributed_stages import config, one_step, ppo_probe

    cfg = config("ppo", micro=1)
    probe, rollout = ppo_probe(cfg)
    rollout = shorten(rollout, probe.tokenizer, {0: 2, 1: 3, 4: 5})
    with one_thread():
        single = one_step(cfg, rollout)
    spawn(_ds_ppo_step, 2, _ds_config(cfg, zero), rollout, str(tmp_path))
    ds = torch.load(tmp_path / "ds_ppo.pt", weights_only=True)
    assert ds["params"].keys() == single["params"].keys()
    assert any(k.startswith("critic.") for k in ds["params"])
    diff = max(float((ds["params"][k] - single["params"][k]).abs().max()) for k in ds["params"])
    print(f"ppo ZeRO-{zero}: max |Δparam| vs plain {diff:.3g}")
    assert diff <= 2.5e-7  # as for SFT/RM: two fp32 ulps at weights ≈ 1, over 4 Adam steps
    for key in ("loss/policy", "loss/value", "optim/grad_norm", "optim/critic_grad_norm"):
        assert ds["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-5), key


def _ppo_run(rank, world, cfg, stop_after) -> None:
    from test_distributed import StopAfter

    from jobs._stage import run_stage

    run_stage("ppo", cfg, stop=StopAfter(stop_after) if stop_after else None)


def test_ppo_deepspeed_stop_resume_is_bit_identical(tmp_path):
    """Both PPO engines (actor and critic) checkpoint into step_<N>/deepspeed/ and resume exactly."""
    from safetensors.torch import load_file
    from test_distributed_stages import config

    from remax.config import CheckpointConfig
    from remax.run_dir import run_dir_for

    def cfg_at(root):
        cfg = _ds_config(config("ppo", micro=1, root=str(root)), 2)
        return dataclasses.replace(
            cfg,
            train=dataclasses.replace(cfg.train, max_steps=3),
            checkpoint=CheckpointConfig(every_steps=1),
        )

    ref_cfg, cfg = cfg_at(tmp_path / "a"), cfg_at(tmp_path / "b")
    spawn(_ppo_run, 2, ref_cfg, 0)
    spawn(_ppo_run, 2, cfg, 2)  # stopped after step 2
    run_dir = run_dir_for(cfg, "ppo")
    engines = sorted(
        p.name for p in (run_dir / "checkpoints" / "step_2" / "deepspeed").iterdir() if p.is_dir()
    )
    assert engines == ["actor", "critic"] and not (run_dir / "summary.json").exists()
    spawn(_ppo_run, 2, cfg, 0)
    wa, wb = (
        load_file(d / "export" / "model.safetensors")
        for d in (run_dir_for(ref_cfg, "ppo"), run_dir)
    )
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ref = [
        json.loads(x)
        for x in (run_dir_for(ref_cfg, "ppo") / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["optim/critic_grad_norm"] for r in rows] == [r["optim/critic_grad_norm"] for r in ref]
