"""LoRA adapters (``model.lora``, ``remax.models.lora``): merged exports, the reference as the actor
with its adapters off (no second copy), adapter-only checkpoints, exact resume, a refused base,
and DeepSpeed ZeRO-2/3 steps equal to a plain rank's.

Tiny Llama (hidden 32), rank 4, a few steps each.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_resume import STEPS, StopAt, _assert_identical, _config, _run

from remax.config import Aggregation, LoraConfig, OptimConfig
from remax.models import lora
from remax.models.policy import load_policy

pytestmark = pytest.mark.filterwarnings("ignore")
RANK = 4
CPU = torch.device("cpu")


def _lora(cfg, rank: int = RANK, **optim):
    model = dataclasses.replace(cfg.model, lora=LoraConfig(rank=rank))
    return dataclasses.replace(cfg, model=model, optim=OptimConfig(**optim))


def _base(cfg):
    """The model ``cfg.model`` loads, without adapters (the tiny random init of the seed)."""
    plain = dataclasses.replace(cfg.model, lora=LoraConfig())
    return load_policy(plain, seed=cfg.seed, device=CPU)[0]


def test_export_is_the_base_with_the_adapters_merged(tmp_path):
    """``export/`` loads with AutoModelForCausalLM as a plain model and equals PEFT's own merge of
    ``export/adapter/`` into the base (max |Δ| < 1e-6 in fp32)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _lora(_config("sft", tmp_path), lr=1e-2)
    run_dir, _ = _run("sft", cfg)
    export = AutoModelForCausalLM.from_pretrained(run_dir / "export").state_dict()
    base = _base(cfg)
    assert export.keys() == base.state_dict().keys()  # no adapter keys: a plain HF model
    adapter = load_file(run_dir / "export" / "adapter" / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    merged = PeftModel.from_pretrained(base, run_dir / "export" / "adapter").merge_and_unload()
    merged = merged.state_dict()
    diff = max(float((export[k] - merged[k]).abs().max()) for k in export)
    moved = max(float((export[k] - _base(cfg).state_dict()[k]).abs().max()) for k in export)
    print(f"export vs PEFT merge: {diff:.3g}; vs the base: {moved:.3g}")
    assert diff < 1e-6
    assert moved > 1e-3  # the adapters were trained: the merge is not the base itself


def _remax_trainer(cfg):
    from remax.trainers.remax import RemaxTrainer

    return RemaxTrainer(cfg)


def _tensors(trainer) -> set[int]:
    """data_ptr of every parameter the trainer's models and reference hold."""
    modules = [v for v in vars(trainer).values() if isinstance(v, torch.nn.Module)]
    ref = trainer.setup.reference
    modules.append(ref.model if isinstance(ref, lora.AdaptersOff) else ref)
    return {p.data_ptr() for m in modules for p in m.parameters()}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_reference_is_the_actor_with_adapters_off(tmp_path):
    """No second copy: the reference adds no parameter tensor (a full-FT trainer's deep copy
    does). Its logits equal the base model's at step 0 and after a step, while the actor's move."""
    cfg = _lora(_config("remax", tmp_path), lr=1e-2)
    trainer = _remax_trainer(cfg)
    own = {p.data_ptr() for p in trainer.model.parameters()}
    assert _tensors(trainer) == own
    full = _remax_trainer(_lora(_config("remax", tmp_path / "full"), rank=0))
    full_own = {p.data_ptr() for p in full.model.parameters()}
    assert len(_tensors(full)) == 2 * len(full_own)  # the control: a deep copy doubles them

    ids = torch.randint(3, len(trainer.tokenizer), (4, 10))
    base = _logits(_base(cfg), ids)
    assert torch.equal(_logits(trainer.setup.reference, ids), base)
    assert torch.equal(_logits(trainer.model, ids), base)  # B = 0: adapters start as identity
    for _ in range(2):  # the first step moves B only; the second moves the output
        trainer.train_step()
    assert torch.equal(_logits(trainer.setup.reference, ids), base)
    assert (_logits(trainer.model, ids) - base).abs().max() > 1e-4
    assert all(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" in n)


def test_checkpoint_holds_the_adapters_and_resume_is_bit_identical(tmp_path):
    """A LoRA checkpoint holds the adapter tensors alone, a fraction of a full one; a run stopped
    at step 3 and resumed exports bit-identically to an uninterrupted one."""
    cfg = _lora(_config("remax", tmp_path / "b"), lr=1e-2)
    ref_dir, _ = _run("remax", _lora(_config("remax", tmp_path / "a"), lr=1e-2))
    run_dir, summary = _run("remax", cfg, stop=StopAt(3))
    assert summary is None
    step3 = run_dir / "checkpoints" / "step_3"
    saved = load_file(step3 / "model.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    # The engine's files (weights, optimizer) against a full checkpoint's: every weight (4 bytes
    # each) and Adam's two moments of each. state.pt (RNG, counters) is the same for both.
    full = 3 * 4 * sum(p.numel() for p in _base(cfg).parameters())
    lora_bytes = sum(
        (step3 / f).stat().st_size for f in ("model.safetensors", "actor_optimizer.pt")
    )
    print(f"checkpoint bytes: LoRA {lora_bytes}, a full one at least {full}")
    assert lora_bytes < full / 3
    _, summary = _run("remax", cfg)
    assert summary["step"] == STEPS
    _assert_identical(ref_dir, run_dir)


def test_reward_model_trains_the_score_head_fully(tmp_path):
    """RM stage (with gradient checkpointing): adapters on the backbone, the new ``score`` head
    trained whole; both are in the checkpoint and in export/adapter/, which PEFT merges into the
    base to equal export/ (loaded with AutoModelForSequenceClassification)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from remax.models.reward import load_reward_model

    cfg = _lora(_config("reward_model", tmp_path), lr=1e-2)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, grad_checkpointing=True))
    run_dir, _ = _run("reward_model", cfg)
    saved = load_file(run_dir / "checkpoints" / f"step_{STEPS}" / "model.safetensors")
    assert "score.weight" in saved and all(".lora_" in k for k in set(saved) - {"score.weight"})
    export = AutoModelForSequenceClassification.from_pretrained(run_dir / "export", num_labels=1)
    export = export.state_dict()
    plain = dataclasses.replace(cfg.model, lora=LoraConfig(), grad_checkpointing=False)
    base = load_reward_model(plain, seed=cfg.seed, device=CPU)[0]
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, run_dir / "export" / "adapter").merge_and_unload()
    merged = merged.state_dict()
    assert export.keys() == merged.keys()
    assert max(float((export[k] - merged[k]).abs().max()) for k in export) < 1e-6
    for key in ("score.weight", "model.layers.0.self_attn.q_proj.weight"):  # head, adapted
        assert (export[key] - before[key]).abs().max() > 1e-4, key
    assert torch.equal(export["model.embed_tokens.weight"], before["model.embed_tokens.weight"])


def test_resume_on_another_base_is_refused(tmp_path, capsys):
    """Adapters checkpointed on one base, resumed with changed weights at the same model.path:
    one ``error:`` line (what, the hashes, the fix), exit 2, and the run dir untouched."""
    from tiny_exports import save_tiny_exports

    from jobs._stage import run_stage

    sft, _ = save_tiny_exports(tmp_path / "exports")
    cfg = _lora(_config("remax", tmp_path / "runs"), lr=1e-2)
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, path=str(sft), num_heads=4, num_kv_heads=2)
    )
    run_dir, summary = _run("remax", cfg, stop=StopAt(2))
    assert summary is None and (run_dir / "checkpoints" / "step_2").is_dir()
    state = load_file(sft / "model.safetensors")
    state["lm_head.weight"] = state["lm_head.weight"] + 1e-3  # e.g. the SFT stage was rerun
    save_file(state, sft / "model.safetensors", metadata={"format": "pt"})
    before = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_stage("remax", cfg)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1
    assert "SHA-256" in errors[0] and "same base model" in errors[0]
    after = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    assert after == before


def _adapt_moved(model, cfg, **kw):
    """``lora.adapt`` with B drawn too (PEFT starts B at 0), so the first step's adapters are
    not the identity and the reference (adapters off) differs from the actor."""
    model = _ADAPT(model, cfg, **kw)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


_ADAPT = lora.adapt


def _lora_step(cfg, sampled, greedy) -> dict:
    from remax.trainers.remax import RemaxTrainer

    trainer = RemaxTrainer(cfg)
    rows = trainer.shard(list(range(sampled.response.shape[0])))
    block = slice(rows[0], rows[-1] + 1)
    metrics = trainer.update(sampled.select(block), greedy.select(block))
    params = {k: v.detach().clone() for k, v in trainer.actor.full_state_dict().items()}
    return {"params": params, "metrics": metrics}


def _ds_lora_steps(rank, world, cfg, sampled, greedy, out_dir) -> None:
    from test_deepspeed import _ds_config

    lora.adapt = _adapt_moved
    for zero in (2, 3):
        out = _lora_step(_ds_config(cfg, zero), sampled, greedy)
        if rank == 0:
            torch.save(out, f"{out_dir}/lora_{zero}.pt")


def test_zero2_and_zero3_lora_step_matches_plain_one_rank(tmp_path, monkeypatch):
    """One ReMax LoRA step (KL to the adapters-off reference in the reward) on 2 gloo ranks at
    ZeRO-2 and at ZeRO-3 equals 1 plain rank's: test_deepspeed's pattern and tolerance."""
    from test_distributed import B, config, single_rank_side, spawn

    monkeypatch.setattr(lora, "adapt", _adapt_moved)
    cfg = _lora(config(Aggregation.token_mean, micro=B // 4), lr=1e-3, grad_clip=0.0, eps=1e-3)
    _, sampled, greedy, single = single_rank_side(cfg, _lora_step)
    assert single["metrics"]["kl/mean"] != 0  # the reference is not the actor
    spawn(_ds_lora_steps, 2, cfg, sampled, greedy, str(tmp_path))
    for zero in (2, 3):
        ds = torch.load(tmp_path / f"lora_{zero}.pt", weights_only=True)
        assert ds["params"].keys() == single["params"].keys()
        diff = max(float((ds["params"][k] - single["params"][k]).abs().max()) for k in ds["params"])
        print(f"LoRA ZeRO-{zero}: max |Δparam| vs plain {diff:.3g}")
        assert diff <= 1e-7  # test_deepspeed's bound for one Adam step at lr 1e-3 in fp32
        for key in ("reward/mean", "loss/policy", "optim/grad_norm", "kl/mean"):
            assert ds["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-5), key


def test_vllm_push_hands_over_the_merged_weights(tmp_path):
    """rollout.engine=vllm serves the plain model: both push routes (file, direct) hand it the
    adapters merged under the base's own keys, as export/ holds them (no vLLM needed here)."""
    from remax.engines import TorchActor
    from remax.rollout.vllm import VLLMEngine

    cfg = _lora(_config("remax", tmp_path))
    model = _adapt_moved(_base(cfg), cfg.model.lora, seed=0)
    engine = object.__new__(VLLMEngine)  # the push paths alone, without starting vLLM
    engine.actor, engine.weights_dir = TorchActor(model, cfg.optim, 1), tmp_path
    want, _ = lora.export_weights(model, None)
    assert want.keys() == _base(cfg).state_dict().keys()
    engine._write_weights()
    pushed = {"file": load_file(tmp_path / "model.safetensors"), "direct": {}}
    pushed["direct"] = dict(engine._direct_weights())
    for route, got in pushed.items():
        assert got.keys() == want.keys(), route
        assert all(torch.equal(got[k], want[k]) for k in want), route


@pytest.mark.parametrize("critic_lora", [False, True])
def test_ppo_actor_gets_adapters_and_the_critic_behind_its_switch(tmp_path, critic_lora):
    """PPO: the actor trains adapters and its reference is the actor with them off (no copy); the
    critic trains every weight, or with ``algo.critic_lora`` adapters plus its full value head."""
    from test_ppo_trainer import _cfg

    from remax.config import PPOAlgoConfig
    from remax.engines import trained_state
    from remax.trainers.ppo import PPOTrainer

    algo = PPOAlgoConfig(kl_coef=0.05, critic_lora=critic_lora)
    cfg = _lora(_cfg(tmp_path, algo=algo), lr=1e-2)
    trainer = PPOTrainer(cfg)
    assert isinstance(trainer.setup.reference, lora.AdaptersOff)
    assert trainer.setup.reference.model is trainer.model
    assert all(".lora_" in k for k in trained_state(trainer.model))
    critic = set(trained_state(trainer.critic))
    if critic_lora:
        assert "score.weight" in critic and all(".lora_" in k for k in critic - {"score.weight"})
    else:
        assert critic == set(trainer.critic.state_dict())  # every weight
    ids = torch.randint(3, len(trainer.tokenizer), (2, 8))
    base = _logits(_base(cfg), ids)
    for _ in range(2):
        trainer.train_step()
    assert torch.equal(_logits(trainer.setup.reference, ids), base)
    assert (_logits(trainer.model, ids) - base).abs().max() > 1e-4
