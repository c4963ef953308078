"""Reward-model end index, reference KL at init, export round trip."""

from __future__ import annotations

import copy

import torch

from remax.algo.kl import kl_penalty
from remax.models.policy import response_logprobs
from remax.models.reward import score
from remax.rollout import SamplingConfig, generate


def test_reward_is_read_at_the_end_index_and_ignores_padding_after_it(reward_model):
    ids = torch.tensor([[5, 6, 7, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    at_eos = score(reward_model, ids, mask, torch.tensor([3]))
    # Whatever sits after the end token (padding, garbage, more tokens) cannot change the score.
    garbage = score(
        reward_model,
        torch.tensor([[5, 6, 7, 0, 9, 9]]),
        torch.tensor([[1, 1, 1, 1, 1, 1]]),
        torch.tensor([3]),
    )
    shorter = score(reward_model, ids[:, :4], mask[:, :4], torch.tensor([3]))
    assert torch.allclose(at_eos, garbage, atol=1e-6) and torch.allclose(at_eos, shorter, atol=1e-6)
    # Reading elsewhere gives another value: the index is really used.
    assert not torch.allclose(at_eos, score(reward_model, ids, mask, torch.tensor([2])))


def test_reward_equals_a_manual_head_at_the_end_token(reward_model):
    ids = torch.tensor([[3, 4, 5, 0], [0, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    end = torch.tensor([3, 3])
    got = score(reward_model, ids, mask, end)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = reward_model.model(
        input_ids=ids, attention_mask=mask, position_ids=pos
    ).last_hidden_state
    want = reward_model.score(hidden[torch.arange(2), end]).squeeze(-1)
    assert torch.allclose(got, want, atol=1e-6)


def test_kl_to_reference_is_exactly_zero_at_init(policy, tokenizer):
    """Spec test 9: the reference is a copy of the initial policy, so every log-ratio is 0."""
    reference = copy.deepcopy(policy)
    batch = tokenizer(["abc=", "ponm="], padding=True, return_tensors="pt")
    torch.manual_seed(0)
    ro = generate(
        policy,
        batch.input_ids,
        batch.attention_mask,
        SamplingConfig(max_new_tokens=6),
        greedy=False,
        eos_token_id=0,
        pad_token_id=0,
    )
    lp = response_logprobs(policy, ro.sequences, ro.attention_mask, ro.prompt_len)
    ref = response_logprobs(reference, ro.sequences, ro.attention_mask, ro.prompt_len)
    for estimator in ("k1", "k2", "k3"):
        assert torch.count_nonzero(kl_penalty(lp, ref, estimator=estimator)) == 0


def test_tiny_export_round_trips_through_auto_classes(tmp_path, policy, reward_model, tokenizer):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    policy.save_pretrained(tmp_path / "p")
    tokenizer.save_pretrained(tmp_path / "p")
    reward_model.save_pretrained(tmp_path / "r")
    tok = AutoTokenizer.from_pretrained(tmp_path / "p")
    assert tok.padding_side == "left" and tok.pad_token_id == tok.eos_token_id == 0
    p2 = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    r2 = AutoModelForSequenceClassification.from_pretrained(tmp_path / "r").eval()
    ids = torch.tensor([[2, 3, 4, 0]])
    assert torch.equal(p2(input_ids=ids).logits, policy(input_ids=ids).logits)
    mask = torch.ones_like(ids)
    assert torch.equal(
        score(r2, ids, mask, torch.tensor([3])), score(reward_model, ids, mask, torch.tensor([3]))
    )
