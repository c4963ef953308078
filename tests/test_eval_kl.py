"""The RL eval's KL and the early stop (issue #19 items 3 and 5).

- The early stop reads the release's quantity: the exact full-vocabulary KL per token along the
  eval answers, Σ_v π(v)(log π(v) − log π_ref(v)) of the raw softmax, not the sampled log-ratio of
  answers drawn with top-p (which reads high).
- ``logprob_dist=sampling_adjusted`` in bf16: a sampled token outside the nucleus recomputed in
  training is counted (``rollout/outside_nucleus``) and scored finitely; the loss and the eval KL
  stay finite.
"""

from __future__ import annotations

import math

import torch

from remax.algo.sampling import filter_logits
from remax.config import (
    DataConfig,
    EvalDecoding,
    LogConfig,
    LogprobDist,
    ModelConfig,
    RemaxAlgoConfig,
    RemaxJobConfig,
    TrainConfig,
    WandbMode,
)
from remax.config.base import DType
from remax.preemption import StopRequest
from remax.trainers import rl_eval
from remax.trainers.remax import RemaxTrainer, response_logits

LOG = LogConfig(wandb_mode=WandbMode.disabled, progress=False)


def _trainer(dtype=DType.float32, **algo) -> RemaxTrainer:
    return RemaxTrainer(
        RemaxJobConfig(
            model=ModelConfig(hidden_size=32, intermediate_size=64, dtype=dtype),
            data=DataConfig(num_train=64, num_eval=64, max_response_len=5),
            train=TrainConfig(batch_size=8, micro_batch_size=4, max_steps=4, eval_every=1),
            log=LOG,
            algo=RemaxAlgoConfig(**algo),
            eval_prompts=64,
        )
    )


def _exact_kl_per_token(policy, reference, ro) -> torch.Tensor:
    """(B,) Σ_t Σ_v π(log π − log π_ref) / length, from full forwards, in float64."""
    seq, att = ro.sequences, ro.attention_mask
    pos = (att.cumsum(-1) - 1).clamp(min=0)  # left padding does not shift the prompt

    def logp(model):
        logits = model(input_ids=seq, attention_mask=att, position_ids=pos).logits
        return torch.log_softmax(logits.double(), -1)[:, ro.prompt_len - 1 : -1]  # (B, T, V)

    with torch.no_grad():
        lp, lq = logp(policy), logp(reference)
    per_position = (lp.exp() * (lp - lq)).sum(-1)  # (B, T): every token of the vocabulary
    m = ro.response_mask
    return torch.where(m, per_position, 0.0).sum(-1) / m.sum(-1)


def test_early_stop_reads_the_exact_full_vocab_kl_along_the_eval_answers():
    # A tiny LM (vocabulary of a few dozen tokens, 5-token answers): the KL over the vocabulary is
    # enumerated exactly. Answers are drawn with top-p 0.9, as the release's eval.
    trainer = _trainer(top_p=0.9, eval_decoding=EvalDecoding.sampled, early_stop_kl=1e3)
    setup = trainer.setup
    setup.prompts = setup.prompts._replace(
        eval=setup.prompts.eval[:16], eval_raw=setup.prompts.eval_raw[:16]
    )
    with torch.no_grad():  # move the policy away from the reference
        head = trainer.model.get_output_embeddings().weight
        head.add_(0.5 * torch.randn(head.shape, generator=torch.Generator().manual_seed(0)))
    answers, decode = [], setup.decode
    setup.decode = lambda *args: answers.append(decode(*args)) or answers[-1]
    trainer.step = 1
    assert trainer.should_stop_early(StopRequest()) is False
    per_answer = torch.cat(
        [_exact_kl_per_token(trainer.model, setup.reference, a) for a in answers]
    )
    assert per_answer.numel() == len(setup.prompts.eval)
    expected = float(per_answer.mean())
    assert expected > 0.05, "the perturbed head is measurably away from the reference"
    # fp32 logits, the KL summed over ~30 tokens in float32: ~1e-7 relative error.
    assert abs(trainer.last_eval_kl - expected) <= 1e-5
    # The sampled estimate (kept as a metric) is another number on these answers.
    sampled = float(rl_eval.evaluate_policy(setup, trainer.model)["kl_sampled_token"].mean())
    assert abs(sampled - expected) > 1e-3


def _force_outside_nucleus(trainer, ro):
    """The greedy rollout ``ro`` (argmax tokens: inside every nucleus) with the last token of each
    full-length row replaced by its least likely non-EOS token, and the number replaced."""
    with torch.no_grad():
        logits = response_logits(trainer.model, ro)  # (B, T, V), bf16
    last = logits[:, -1].float()
    last[:, trainer.tokenizer.eos_token_id] = math.inf  # an EOS would change the answer's end
    rows = ro.response_mask.all(-1)  # the last token ends no answer: nothing after it moves
    response = ro.response.clone()
    response[rows, -1] = last.argmin(-1)[rows]
    nucleus = filter_logits(logits[:, -1], temperature=1.0, top_p=0.9, top_k=0)
    outside = nucleus.gather(-1, response[:, -1:]).squeeze(-1) == -math.inf
    assert bool(outside[rows].all()) and not bool(outside[~rows].any())
    return ro._replace(response=response), int(rows.sum())


def test_sampling_adjusted_in_bf16_counts_tokens_outside_the_nucleus_and_stays_finite():
    trainer = _trainer(dtype=DType.bfloat16, top_p=0.9, logprob_dist=LogprobDist.sampling_adjusted)
    prompts, raw = trainer.setup.prompts.train[:8], trainer.setup.prompts.train_raw[:8]
    _, greedy = trainer.rollout(prompts)
    forced, n_forced = _force_outside_nucleus(trainer, greedy)
    assert n_forced >= 1, "some greedy answer runs to max_response_len"
    metrics = trainer.update(forced, greedy, raw)  # today: −A·log π = −A·(−inf), an inf loss
    assert math.isfinite(metrics["loss/policy"]) and math.isfinite(metrics["optim/grad_norm"])
    assert metrics["rollout/outside_nucleus"] == n_forced
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    # The eval scores the forced answers: today's (log π − log π_ref)·mask is −inf − (−inf) = NaN.
    trainer.setup.decode = lambda ids, mask, greedy: forced
    ev = rl_eval.evaluate_policy(trainer.setup, trainer.model, prompts, raw)
    for key in ("kl", "kl_token", "kl_sampled", "kl_sampled_token"):
        assert torch.isfinite(ev[key]).all(), key
