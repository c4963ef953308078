"""The one sampler: greedy is greedy and prompt-only, EOS and padding handled, log-probs aligned."""

from __future__ import annotations

import pytest
import torch

from remax.data.batching import collate_prompts
from remax.models.policy import position_ids, response_logprobs
from remax.rollout import SamplingConfig, generate

PROMPTS = ["abcab=", "ponmlkj=", "hgh=", "iijjkop="]


def _decode(model, tokenizer, prompts, greedy, sampling=None, **kw):
    batch = collate_prompts(tokenizer, prompts, 12, "cpu")
    sampling = sampling or SamplingConfig(max_new_tokens=8, **kw)
    return generate(
        model,
        batch.input_ids,
        batch.attention_mask,
        sampling,
        greedy=greedy,
        eos_token_id=0,
        pad_token_id=0,
    )


def _forward_logits(model, ro):
    mask = ro.attention_mask
    return model(
        input_ids=ro.sequences, attention_mask=mask, position_ids=position_ids(mask)
    ).logits


def test_greedy_tokens_are_the_argmax_of_the_training_forward(policy, tokenizer):
    ro = _decode(policy, tokenizer, PROMPTS, greedy=True)
    logits = _forward_logits(policy, ro)[:, ro.prompt_len - 1 : -1]  # column t scores token P + t
    argmax = logits.argmax(-1)
    assert bool(((argmax == ro.response) | ~ro.response_mask).all())


def test_greedy_equals_hf_generate_token_for_token(policy, tokenizer):
    ro = _decode(policy, tokenizer, PROMPTS, greedy=True)
    batch = collate_prompts(tokenizer, PROMPTS, 12, "cpu")
    hf = policy.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        do_sample=False,
        max_new_tokens=8,
        eos_token_id=0,
        pad_token_id=0,
    )[:, batch.input_ids.shape[1] :]
    T = min(hf.shape[1], ro.response.shape[1])
    ours = torch.where(ro.response_mask, ro.response, 0)[:, :T]
    assert torch.equal(ours, hf[:, :T])


def test_greedy_ignores_sampling_knobs_and_rng(policy, tokenizer):
    base = _decode(policy, tokenizer, PROMPTS, greedy=True)
    torch.manual_seed(123)
    other = _decode(policy, tokenizer, PROMPTS, greedy=True, temperature=0.3, top_p=0.5, top_k=3)
    assert torch.equal(base.response, other.response)
    assert torch.equal(base.response_mask, other.response_mask)


def test_greedy_rows_are_prompt_only_in_a_mixed_batch(policy, tokenizer):
    """A prompt's baseline must not depend on the sampled rows decoded beside it (spec test 7)."""
    alone = _decode(policy, tokenizer, PROMPTS, greedy=True)
    torch.manual_seed(7)
    mixed_prompts = PROMPTS + PROMPTS
    greedy = torch.tensor([False] * 4 + [True] * 4)
    mixed = _decode(policy, tokenizer, mixed_prompts, greedy=greedy, temperature=1.0)
    T = alone.response.shape[1]
    assert torch.equal(mixed.response[4:, :T], alone.response)
    assert not mixed.response_mask[4:, T:].any()


def test_sampling_is_reproducible_from_the_seed_and_varies_without_it(policy, tokenizer):
    torch.manual_seed(3)
    a = _decode(policy, tokenizer, PROMPTS * 4, greedy=False)
    torch.manual_seed(3)
    b = _decode(policy, tokenizer, PROMPTS * 4, greedy=False)
    c = _decode(policy, tokenizer, PROMPTS * 4, greedy=False)
    assert torch.equal(a.response, b.response)
    assert not torch.equal(a.response, c.response)


def test_left_padding_does_not_change_the_greedy_response(policy, tokenizer):
    short = _decode(policy, tokenizer, ["hgh="], greedy=True)
    padded = _decode(policy, tokenizer, ["hgh=", "abcdefghijk="], greedy=True)  # pads "hgh=" by 8
    T = short.response.shape[1]
    assert torch.equal(padded.response[0, :T], short.response[0])


class _EosBias(torch.nn.Module):
    """Wraps a policy and adds ``bias`` to the EOS logit (+large: stop at once; −inf: never stop)."""

    def __init__(self, model, bias: float) -> None:
        super().__init__()
        self.model, self.bias = model, bias

    def forward(self, cache=None, **kw):
        out = self.model(cache=cache, **kw)
        out.logits[..., 0] += self.bias
        return out


def test_eos_ends_the_response_is_kept_and_pads_after(policy, tokenizer):
    torch.manual_seed(2)
    ro = _decode(policy, tokenizer, PROMPTS * 16, greedy=False)
    is_eos = ro.response == 0
    cols = torch.arange(ro.response.shape[1])
    first = torch.where(is_eos.any(-1), is_eos.int().argmax(-1), ro.response.shape[1] - 1)
    assert is_eos.any(-1).sum() > 3, "the check needs rows that stop early"
    assert torch.equal(ro.response_mask, cols[None] <= first[:, None])
    assert torch.equal(ro.end_index, ro.prompt_len + first)
    assert (ro.response[~ro.response_mask] == 0).all()  # pad after the first EOS


def test_immediate_eos_gives_a_one_token_response(policy, tokenizer):
    ro = _decode(_EosBias(policy, 1e4), tokenizer, PROMPTS, greedy=False)
    assert ro.response.shape[1] == 1 and (ro.response == 0).all() and ro.response_mask.all()
    assert (ro.end_index == ro.prompt_len).all()


def test_no_eos_keeps_every_token_and_ends_at_the_last(policy, tokenizer):
    ro = _decode(_EosBias(policy, float("-inf")), tokenizer, PROMPTS, greedy=False)
    assert ro.response.shape[1] == 8 and ro.response_mask.all()
    assert (ro.end_index == ro.sequences.shape[1] - 1).all()


def test_top_k_one_sampling_equals_greedy(policy, tokenizer):
    greedy = _decode(policy, tokenizer, PROMPTS, greedy=True)
    torch.manual_seed(5)
    sampled = _decode(policy, tokenizer, PROMPTS, greedy=False, top_k=1)
    assert torch.equal(sampled.response, greedy.response)


def test_response_logprobs_match_a_slow_loop(policy, tokenizer):
    """Spec test 14: log π(a_t | x, a_<t) from one forward equals a token-by-token recomputation."""
    torch.manual_seed(11)
    ro = _decode(policy, tokenizer, PROMPTS, greedy=False)
    fast = response_logprobs(policy, ro.sequences, ro.attention_mask, ro.prompt_len)
    for b in range(len(PROMPTS)):
        prompt = ro.prompt_ids[b][ro.prompt_mask[b]]
        for t in range(int(ro.lengths[b])):
            prefix = torch.cat([prompt, ro.response[b, :t]])[None]
            logits = policy(input_ids=prefix).logits[0, -1].double()
            slow = torch.log_softmax(logits, -1)[ro.response[b, t]]
            assert fast[b, t].item() == pytest.approx(
                slow.item(), abs=1e-5
            )  # fp32 forward vs fp64 softmax


# ---- the rollout engines: one protocol ----


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_every_rollout_engine_provides_the_protocol(engine):
    """``RolloutEngine``'s calls, with its parameters, on each engine the config can choose."""
    import inspect

    from remax.rollout import RolloutEngine

    if engine == "hf":
        from remax.rollout.hf import HFEngine as cls
    else:  # the module imports vLLM only when an engine is built
        from remax.rollout.vllm import VLLMEngine as cls

    for name in ("generate", "weights_updated", "close"):
        want = inspect.signature(getattr(RolloutEngine, name)).parameters
        got = inspect.signature(getattr(cls, name)).parameters
        assert [(p.name, p.kind) for p in got.values()] == [
            (p.name, p.kind) for p in want.values()
        ], f"{cls.__name__}.{name}"


def test_the_hf_engine_decodes_as_the_sampler(policy, tokenizer):
    """``HFEngine`` is ``generate`` on the actor's module (nothing else: same rows, same RNG)."""
    from remax.config.rollout import RolloutConfig
    from remax.rollout import as_actor, build_rollout_engine

    class _Tok:  # the token ids the engine reads off the tokenizer
        eos_token_id, pad_token_id = 0, 0

    engine = build_rollout_engine(
        RolloutConfig(), as_actor(policy), _Tok(), max_model_len=32, seed=0
    )
    batch = collate_prompts(tokenizer, PROMPTS, 12, "cpu")
    flags = torch.tensor([True, False, True, False])
    torch.manual_seed(3)
    ro = engine.generate(
        batch.input_ids, batch.attention_mask, SamplingConfig(max_new_tokens=8), greedy=flags
    )
    torch.manual_seed(3)
    want = _decode(policy, tokenizer, PROMPTS, greedy=flags)
    assert torch.equal(ro.response, want.response) and torch.equal(
        ro.response_mask, want.response_mask
    )
